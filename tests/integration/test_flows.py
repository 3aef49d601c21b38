"""train_and_deploy end to end, the way a team uses it: a real Prefect server, the deployments served by
`python -m flows.deploy` from a tiny workspace, runs created through the REST API exactly as the UI's Run,
Retry and Resume buttons do, real DVC stages, a real MLflow store and the session's Ray cluster.

The workspace and the first Run-button run (the `champion` fixture: the whole pipeline, v1 champion) are the
session's (tests/conftest.py); each test here starts from whatever state the workspace is in and asserts only
what its own runs did, so they pass alone and in any order: bad parameters refused; an injected failure in
evaluate, then a retry that does not redo the data or training work (and a killed run's overrides put back by
that run); a train stage killed mid-run, retried by its task and resumed from its checkpoint; an approval pause
resumed through the API while a second run is refused by the workspace lock; an approval nobody answers;
promote_model and evaluate_model; the Run button's defaults deploying the champion.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from tests.helpers.prefect_api import (
    TERMINAL,
    artifacts,
    completed,
    logs,
    run_button,
    state,
    summary_of,
    task_runs,
    wait,
)
from tests.helpers.services import wait_for

# end to end: the first test here may also wait for the session's services and the Run button's first run
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "quill-test"


def mlflow(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")


def cli(root: Path, env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m flows.train_and_deploy ...` in the workspace, as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "flows.train_and_deploy", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_run_button_runs_the_pipeline_and_registers_a_champion(champion, flow_stack):
    """What the first Run (the `champion` fixture) left: the snapshot is the workspace as that run ended."""
    api, run, root = flow_stack["api"], champion["run"], champion["snapshot"]
    text = logs(api, run["id"])
    stages = ("ingest", "clean", "tokenize", "train", "evaluate", "register")
    for stage in (*stages, "chat_data", "finetune", "chat_eval", "chat_register"):
        assert f"Running stage '{stage}'" in text and f"\n{stage}: ran in " in text, stage
    assert "To track the changes with git" not in text and "%|" not in text  # no DVC hints, no redrawn bars
    assert "Add type hints" not in text  # MLflow's warning about the pyfunc model's predict
    version = mlflow(root).get_model_version_by_alias(MODEL, "champion")
    assert str(version.version) == "1"
    registered = json.loads((root / "artifacts" / "registered.json").read_text())
    assert registered["promoted"] and registered["version"] == "1"
    training = mlflow(root).get_run(registered["run_id"])
    assert training.data.tags["quill.flow_run_id"] == run["id"]
    assert json.loads(training.data.tags["quill.overrides"]) == {"train.max_steps": 8}
    kinds = artifacts(api, run["id"])
    assert kinds["train-progress"]["data"] == 100.0 and kinds["finetune-progress"]["data"] == 100.0
    chat = json.loads((root / "artifacts" / "chat_registered.json").read_text())
    assert chat["model_name"] == f"{MODEL}-chat" and chat["promoted"] and chat["version"] == "1"
    summary = kinds["train-and-deploy-summary"]["data"]
    assert "quill-test v1 promoted to **champion**" in summary and "`train.max_steps` | `8`" in summary
    # the override lives in dvc.lock, not in the user's params.yaml
    assert subprocess.run(["git", "diff", "--quiet", "params.yaml"], cwd=root).returncode == 0
    assert "max_steps: 8" in (root / "dvc.lock").read_text()


def test_the_run_form_shows_params_yaml_and_follows_the_file(flow_stack):
    """train_and_deploy's deployment offers params.yaml's values (model.preset a choice of the presets), and
    `flows.deploy` renews them when the file changes."""
    api, params = flow_stack["api"], flow_stack["root"] / "params.yaml"

    def deployment() -> dict:
        return api.get("/deployments/name/train_and_deploy/train-and-deploy").json()

    found = deployment()
    assert found["parameters"]["overrides"]["model"] == {"preset": "tiny"}
    assert found["parameters"]["overrides"]["train"]["seed"] == 7
    preset = found["parameter_openapi_schema"]["definitions"]["ModelKnobs"]["properties"]["preset"]
    assert {"tiny", "cpu"} <= set(preset["anyOf"][0]["enum"])
    original = params.read_bytes()
    try:
        params.write_text(params.read_text().replace("  seed: 7\n", "  seed: 8\n"))
        wait_for(lambda: deployment()["parameters"]["overrides"]["train"]["seed"] == 8, 30, "the form at seed 8")
    finally:
        params.write_bytes(original)
    wait_for(lambda: deployment()["parameters"]["overrides"]["train"]["seed"] == 7, 30, "the form back at seed 7")


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"overrides": {"train": {"max_steps": 0}}}, "max_steps"),
        ({"overrides": {"train": {"max_stepz": 3}}}, "max_stepz"),
        ({"overrides": {"train": {"seed": "seven"}}}, "seven"),
    ],
)
def test_bad_parameters_are_refused_before_a_run_exists(flow_stack, parameters, named):
    api = flow_stack["api"]
    before = len(api.post("/flow_runs/filter", json={}).json())
    response = run_button(api, parameters)
    assert response.status_code == 409 and named in response.text, response.text
    assert len(api.post("/flow_runs/filter", json={}).json()) == before


def test_bad_overrides_are_refused_on_the_command_line_before_any_work(flow_stack):
    root, env = flow_stack["root"], flow_stack["env"]
    lock = root / "dvc.lock"
    before = lock.read_text() if lock.exists() else None
    result = cli(root, env, "--set", "train.lr=fast")
    assert result.returncode == 2 and "'train.lr': Input should be a valid number" in result.stderr
    result = cli(root, env, "--set", "other.thing=1")
    assert result.returncode == 2 and "unknown key 'other'" in result.stderr
    assert (lock.read_text() if lock.exists() else None) == before


# A flow run SIGKILLed while `dvc repro <stage>` runs with its overrides written into params.yaml
KILLED_INSIDE_OVERRIDES = """
import os, signal
from flows.overrides import overridden
with overridden({"train.max_steps": 99, "eval.stride": 16}):
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_next_run_puts_params_back_and_a_failed_evaluate_is_retried_without_retraining(champion, flow_stack):
    """A run killed while its overrides are in params.yaml leaves them there; the next run puts the user's file
    back before any work. That run fails in evaluate (injected): the UI's Retry runs it again without redoing the
    data or training work."""
    root, env, api = flow_stack["root"], flow_stack["env"], flow_stack["api"]
    original_params = (root / "params.yaml").read_bytes()
    killed = subprocess.run([sys.executable, "-c", KILLED_INSIDE_OVERRIDES], cwd=root, env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert b"max_steps: 99" in (root / "params.yaml").read_bytes()  # what the killed run left behind
    entry = root / "pipelines" / "evaluate" / "__main__.py"
    original = entry.read_text()
    entry.write_text('raise SystemExit("injected failure in evaluate")\n')
    try:
        response = run_button(api, {"overrides": {"train": {"max_steps": 9}}, "deploy": False, "finetune": False})
        run = wait(api, response.json()["id"], set())
    finally:
        entry.write_text(original)
    assert (root / "params.yaml").read_bytes() == original_params
    assert "params.yaml held a killed run's overrides: the original is back" in logs(api, run["id"])
    assert "max_steps: 99" not in (root / "dvc.lock").read_text()
    assert run["state"]["type"] == "FAILED"
    assert "injected failure in evaluate" in run["state"]["message"] + logs(api, run["id"])
    trained = task_runs(api, run["id"])["train"][-1]
    assert trained["state"]["type"] == "COMPLETED"
    model_file = root / "artifacts" / "model" / "model.safetensors"
    stamp = model_file.stat().st_mtime_ns
    experiment = mlflow(root).get_experiment_by_name("quill").experiment_id
    train_runs = len(mlflow(root).search_runs([experiment]))

    # the UI's Retry button: the failed run goes back to Scheduled and the served deployment runs it again
    retry = api.post(
        f"/flow_runs/{run['id']}/set_state",
        json={"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True},
    )
    assert retry.status_code in (200, 201), retry.text
    run = wait(api, run["id"], set())
    assert run["state"]["type"] == "COMPLETED", logs(api, run["id"])
    assert model_file.stat().st_mtime_ns == stamp  # not retrained
    assert len(mlflow(root).search_runs([experiment])) == train_runs
    text = logs(api, run["id"])
    for stage in ("ingest", "clean", "tokenize", "train"):
        assert f"Stage '{stage}' didn't change, skipping" in text
    assert "Running stage 'evaluate'" in text and json.loads((root / "artifacts/registered.json").read_text())


def workspace_process(root: Path, marker: str) -> psutil.Process | None:
    """The workspace's running process whose command line holds `marker` (e.g. `pipelines.train`), if any."""
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        if proc.info["cwd"] == str(root) and marker in " ".join(proc.info["cmdline"] or []):
            return proc
    return None


def test_a_killed_train_is_retried_by_the_task_and_resumes_its_checkpoint(champion, flow_stack):
    """A SIGKILL of the train stage mid-run (an OOM kill, a lost node): the train task's retry runs it again and
    it resumes from the checkpoint the killed attempt wrote, in the same MLflow run. A second Run click meanwhile
    queues behind it (the deployment's concurrency limit) and then finds nothing to redo.

    The train stage is frozen (SIGSTOP) the moment its first checkpoint appears, so it cannot finish before the
    kill however fast or slow the machine is; a dozen steps leave the poll a margin of seconds."""
    root, api = flow_stack["root"], flow_stack["api"]
    experiment = mlflow(root).get_experiment_by_name("quill").experiment_id
    train_runs = len(mlflow(root).search_runs([experiment]))
    overrides = {"train": {"max_steps": 12, "checkpoint_every": 2}}
    earlier = set((root / "checkpoints").glob("*/step-*.ckpt"))  # finished runs of other configurations
    run_id = run_button(api, {"overrides": overrides, "deploy": False, "finetune": False}).json()["id"]
    deadline = time.monotonic() + 240
    while True:
        proc = workspace_process(root, "pipelines.train")
        if proc and set((root / "checkpoints").glob("*/step-*.ckpt")) - earlier:
            proc.suspend()
            break
        assert state(api, run_id) not in TERMINAL, logs(api, run_id)
        assert time.monotonic() < deadline, f"no checkpoint of the train stage within 240 s:\n{logs(api, run_id)}"
        time.sleep(0.05)
    steps = sorted(p.name for p in (root / "checkpoints").glob("*/step-*.ckpt") if p not in earlier)
    assert steps and steps[-1] < "step-00000012", steps  # frozen mid-run, before its last step
    # a second click while this run trains: it waits for the deployment's one slot
    queued = run_button(api, {"overrides": overrides, "deploy": False, "finetune": False}).json()["id"]
    proc.kill()
    run = wait(api, run_id, set())
    assert run["state"]["type"] == "COMPLETED", logs(api, run_id)
    text = logs(api, run_id)
    trained = task_runs(api, run_id)["train"]
    assert sum(t["run_count"] for t in trained) == 2, (trained, text)  # the killed attempt and its retry
    assert "train: resuming from checkpoints/" in text, text
    assert len(mlflow(root).search_runs([experiment])) == train_runs + 1  # both attempts log to one MLflow run

    # the second click waited for the deployment's one slot (the workspace lock would have failed an overlap)
    second = wait(api, queued, set())
    assert second["state"]["type"] == "COMPLETED", logs(api, queued)
    assert second["start_time"] >= run["end_time"], (second["start_time"], run["end_time"])
    assert "Stage 'train' didn't change, skipping" in logs(api, queued)


def test_approval_pause_is_resumed_through_the_api_and_holds_the_workspace(champion, flow_stack):
    root, env, api = flow_stack["root"], flow_stack["env"], flow_stack["api"]
    versions_before = len(mlflow(root).search_model_versions(f"name='{MODEL}'"))
    response = run_button(
        api, {"overrides": {"train": {"max_steps": 10}}, "require_approval": True, "deploy": False, "finetune": False}
    )
    run = wait(api, response.json()["id"], {"PAUSED"})
    assert run["state"]["type"] == "PAUSED", logs(api, run["id"])
    paused = json.loads((root / "artifacts/registered.json").read_text())  # registered, waiting as challenger
    assert paused["version"] == str(versions_before + 1) and not paused["promoted"]
    assert (
        paused["aliases"] == ["challenger"]
        and "champion" not in mlflow(root).get_model_version(MODEL, paused["version"]).aliases
    )

    # a second run meanwhile is refused with a message (the paused run holds the workspace)
    second = cli(root, env, "--no-deploy", "--no-finetune", timeout=300)
    assert second.returncode == 1 and "another pipeline run holds this workspace" in second.stderr, second.stderr

    # the reviewer's form, submitted as the UI does
    resumed = api.post(
        f"/flow_runs/{run['id']}/resume", json={"run_input": {"approve": True, "force": True, "comment": "looks fine"}}
    )
    assert resumed.status_code in (200, 201) and resumed.json()["status"] == "ACCEPT", resumed.text
    run = wait(api, run["id"], set())
    assert run["state"]["type"] == "COMPLETED", logs(api, run["id"])
    assert len(mlflow(root).search_model_versions(f"name='{MODEL}'")) == versions_before + 1
    registered = json.loads((root / "artifacts/registered.json").read_text())
    assert not registered["promoted"] and registered["would_promote"] == ("awaiting a reviewer" in registered["why"])
    champion = mlflow(root).get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == registered["version"]  # the reviewer forced it
    assert "approved (forced) in train_and_deploy flow run" in champion.tags["quill.promoted_by"]
    assert "challenger" not in champion.aliases


def test_an_unanswered_approval_leaves_the_version_challenger(champion, flow_stack):
    """The new version is registered as challenger before the pause; with no answer it stays so, and the run
    completes (nothing failed: the flow resumes itself at the deadline with a refusal)."""
    root, api = flow_stack["root"], flow_stack["api"]
    champion_before = mlflow(root).get_model_version_by_alias(MODEL, "champion").version
    versions_before = len(mlflow(root).search_model_versions(f"name='{MODEL}'"))
    response = run_button(
        api,
        {
            "overrides": {"train": {"max_steps": 11}},
            "require_approval": True,
            "approval_timeout_s": 10,
            "deploy": False,
            "finetune": False,
        },
    )
    run = wait(api, response.json()["id"], set())
    assert run["state"]["type"] == "COMPLETED", logs(api, run["id"])
    assert "no answer within 10 s: v" in summary_of(api, run["id"])
    registered = json.loads((root / "artifacts/registered.json").read_text())
    assert registered["version"] == str(versions_before + 1) and not registered["promoted"]
    assert registered["would_promote"] == ("awaiting a reviewer" in registered["why"])
    assert mlflow(root).get_model_version_by_alias(MODEL, "champion").version == champion_before
    assert str(mlflow(root).get_model_version_by_alias(MODEL, "challenger").version) == registered["version"]


def test_promote_model_and_evaluate_model_from_their_deployments(champion, flow_stack):
    root, api = flow_stack["root"], flow_stack["api"]
    completed(api, run_button(api, {"version": "1", "redeploy": False}, "promote_model"))
    promoted = mlflow(root).get_model_version_by_alias(MODEL, "champion")
    assert str(promoted.version) == "1" and "promote_model flow run" in promoted.tags["quill.promoted_by"]
    evaluated = completed(api, run_button(api, {"model": "champion"}, "evaluate_model"))
    [card] = artifacts(api, evaluated["id"]).values()
    assert "quill-test v1 on the current data" in card["data"] and "test_bpb" in card["data"]


def test_the_run_button_deploys_the_champion_and_the_endpoint_answers(champion, flow_stack, shared_ray):
    """The first Run (the `champion` fixture) deployed v1 on the session's Ray Serve (the workspace's serve.port is
    its port) and smoke-tested it; the fixture asked the endpoint before deleting the app."""
    base, chat = champion["models"]["data"]  # both champions, the base model first
    assert base["id"] == MODEL and str(base["version"]) == "1", base
    assert chat["id"] == f"{MODEL}-chat" and str(chat["version"]) == "1", chat
    reply = champion["chat"]
    assert reply["model"] == f"{MODEL}-chat" and reply["choices"][0]["message"]["role"] == "assistant", reply
    completion = champion["completion"]
    assert completion["usage"]["completion_tokens"] == 4 and completion["choices"][0]["finish_reason"] == "length"
    assert completion["model"] == MODEL and isinstance(completion["choices"][0]["text"], str)
    summary = summary_of(flow_stack["api"], champion["run"]["id"])
    assert f"**Endpoint:** {MODEL} (version 1) at {shared_ray['url']}" in summary
    assert "completed 'The king' with" in summary and f"{MODEL}-chat (version 1) answered it with" in summary
    assert "## Chat model" in summary and "chat_eval" in summary and "response_bpb" in summary
