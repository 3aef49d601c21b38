"""The Markdown a flow run leaves in the Prefect UI: what each stage did, the evaluation, the registry decision.

The per-stage lines are pipelines/summary.py's (the same ones `make run` prints); this adds what only the
flow knows: which stages DVC skipped, the overrides, the champion-vs-challenger numbers, links, the endpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows.overrides import check
from flows.stack import alive, recorded
from pipelines.common.layout import PROJECT
from pipelines.common.params import ParamsError
from pipelines.summary import summary_rows

REGISTERED = PROJECT.registered  # the register stage's output


def mlflow_ui(tracking_uri: str) -> tuple[str, str]:
    """(base URL of the MLflow UI for this store, how to open it: "open <url>", after starting it if need be)."""
    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/")
    elif (running := recorded().get("mlflow-ui")) and alive(running):
        url = running["url"]  # the UI `make run` started (flows/stack.py), on the port it found free
    else:
        url = "http://127.0.0.1:5000"
        return url, f"`.venv/bin/mlflow ui --backend-store-uri {tracking_uri}`, then open {url}"
    return url, f"open {url}"


def registered() -> dict[str, Any] | None:
    return json.loads(REGISTERED.read_text()) if REGISTERED.is_file() else None


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def params_values(keys: list[str]) -> dict[str, Any]:
    """params.yaml's value of each dotted key (its default where the file leaves it out); "?" where it has none."""
    try:
        tree = check({}).model_dump(mode="json")
    except (ParamsError, OSError):
        return dict.fromkeys(keys, "?")
    values = {}
    for key in keys:
        node: Any = tree
        for part in key.split("."):
            node = node.get(part, "?") if isinstance(node, dict) else "?"
        values[key] = node
    return values


def summary_markdown(
    ran: dict[str, bool],
    overrides: dict[str, Any],
    reg: dict[str, Any] | None,
    experiment_id: str | None,
    tracking_uri: str,
    approval: str | None,
    served: str | None,
    chat: dict[str, Any] | None = None,
    flow: str = "train_and_deploy",
) -> str:
    """The run's summary: stages (ran or skipped), overrides, evaluation, registry decision, links, endpoint."""

    def status(stage: str) -> str:
        return ("ran" if ran[stage] else "up to date (skipped by DVC)") if stage in ran else ""

    rows = summary_rows(Path("."))
    described = {stage for stage, _ in rows}
    lines = [f"# quill: {flow}", "", "| stage | this run | result |", "|---|---|---|"]
    lines += [f"| {stage} | {status(stage)} | |" for stage in ran if stage not in described]
    lines += [f"| {stage} | {status(stage)} | {_cell(text)} |" for stage, text in rows]
    lines += ["", "## Overrides of params.yaml for this run", ""]
    if overrides:
        # the Run form sends every knob (at params.yaml's value unless changed): the third column tells them apart
        file = params_values(list(overrides))
        lines += ["| key | this run | params.yaml |", "|---|---|---|"]
        for k, v in overrides.items():
            lines.append(f"| `{k}` | `{json.dumps(v)}` | {'same' if file[k] == v else f'`{json.dumps(file[k])}`'} |")
        lines += ["", "Recorded in dvc.lock with each output they made; params.yaml itself is unchanged."]
    else:
        lines.append("none: params.yaml as committed")
    if approval:
        lines += ["", f"**Approval:** {approval}"]
    if reg:
        base, how = mlflow_ui(tracking_uri)
        lines += [
            "",
            "## Registry",
            "",
            "| | version | test_bpb |",
            "|---|---|---|",
            f"| this model | v{reg['version']} | {reg['test_bpb']:.4f} |",
        ]
        champ = reg.get("champion_test_bpb")
        if reg.get("champion_version"):
            numbers = f"{champ:.4f} (this model {reg['test_bpb'] - champ:+.4f})" if champ is not None else "?"
            lines.append(f"| champion before | v{reg['champion_version']} | {numbers} |")
        verdict = "promoted to **champion**" if reg["promoted"] else "kept as **challenger**"
        lines += ["", f"{reg['model_name']} v{reg['version']} {verdict}: {reg['why']}", ""]
        version_link = f"{base}/#/models/{reg['model_name']}/versions/{reg['version']}"
        lines.append(f"- MLflow model version: [{reg['model_name']} v{reg['version']}]({version_link})")
        if experiment_id is not None:
            lines.append(f"- MLflow run: [{reg['run_id']}]({base}/#/experiments/{experiment_id}/runs/{reg['run_id']})")
        lines.append(f"- MLflow UI: {how}")
    else:
        lines += ["", "## Registry", "", "not registered in this run"]
    if chat:
        base, _ = mlflow_ui(tracking_uri)
        verdict = "promoted to **champion**" if chat["promoted"] else "kept as **challenger**"
        link = f"{base}/#/models/{chat['model_name']}/versions/{chat['version']}"
        lines += [
            "",
            "## Chat model",
            "",
            f"[{chat['model_name']} v{chat['version']}]({link}) (response_bpb {chat['response_bpb']:.4f}) {verdict}: "
            f"{chat['why']}",
        ]
    lines += ["", f"**Endpoint:** {served}" if served else "**Endpoint:** not deployed by this run"]
    return "\n".join(lines) + "\n"


def print_outcome(registrations: list[dict[str, Any] | None], served: str | None, tracking_uri: str) -> None:
    """A flow's last lines on the command line: each registration's decision, the endpoint, the MLflow UI."""
    for reg in registrations:
        if reg:
            print(f"registered {reg['model_name']} v{reg['version']} ({', '.join(reg['aliases'])}): {reg['why']}")
    print(f"served: {served or 'not deployed'}")
    print(f"MLflow: {mlflow_ui(tracking_uri)[1]}")
