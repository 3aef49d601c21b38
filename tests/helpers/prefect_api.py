"""Talking to a real Prefect server's REST API the way its UI does: the Run button, a run's state, task runs, logs
and artifacts. Every wait polls the server and fails naming what it waited for."""

from __future__ import annotations

import time

import httpx

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def deployment_id(api: httpx.Client, flow: str) -> str:
    from flows.deploy import DEPLOYMENTS  # heavy (Prefect): only the tests that press Run import it

    return api.get(f"/deployments/name/{flow}/{DEPLOYMENTS[flow]}").json()["id"]


def post(api: httpx.Client, url: str, body: dict) -> httpx.Response:
    """POST, again after a 503: the SQLite-backed server answers so while busy, as the UI then shows."""
    for _ in range(10):
        response = api.post(url, json=body)
        if response.status_code != 503:
            return response
        time.sleep(2)
    return response


def run_button(api: httpx.Client, parameters: dict, flow: str = "train_and_deploy") -> httpx.Response:
    """What the UI's Run button sends: a flow run of the deployment with the form's parameters."""
    return post(
        api,
        f"/deployments/{deployment_id(api, flow)}/create_flow_run",
        {"parameters": parameters, "state": {"type": "SCHEDULED"}},
    )


def state(api: httpx.Client, run_id: str) -> str:
    return api.get(f"/flow_runs/{run_id}").json()["state"]["type"]


def wait(api: httpx.Client, run_id: str, until: set[str], timeout: float = 240) -> dict:
    """The flow run once its state is in `until` or terminal; AssertionError with its logs at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api.get(f"/flow_runs/{run_id}").json()
        if run["state"]["type"] in until | TERMINAL:
            return run
        time.sleep(0.5)
    raise AssertionError(
        f"flow run {run_id} still {run['state']['type']} after {timeout} s, not {sorted(until | TERMINAL)}:\n"
        f"{logs(api, run_id)[-3000:]}"
    )


def completed(api: httpx.Client, response: httpx.Response, timeout: float = 240) -> dict:
    """The run a Run-button response created, waited for; AssertionError with its logs unless it COMPLETED."""
    assert response.status_code == 201, response.text
    run = wait(api, response.json()["id"], set(), timeout)
    assert run["state"]["type"] == "COMPLETED", logs(api, run["id"])
    return run


def task_runs(api: httpx.Client, run_id: str) -> dict[str, list[dict]]:
    runs = api.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
    out: dict[str, list[dict]] = {}
    for run in sorted(runs, key=lambda r: r["expected_start_time"]):
        out.setdefault(run["name"].rsplit("-", 1)[0], []).append(run)
    return out


def logs(api: httpx.Client, run_id: str) -> str:
    """Every log line of the run, in order (the API answers at most 200 per page)."""
    entries: list[dict] = []
    while True:
        page = api.post(
            "/logs/filter",
            json={
                "logs": {"flow_run_id": {"any_": [run_id]}},
                "sort": "TIMESTAMP_ASC",
                "limit": 200,
                "offset": len(entries),
            },
        ).json()
        entries += page
        if len(page) < 200:
            return "\n".join(e["message"] for e in entries)


def artifacts(api: httpx.Client, run_id: str) -> dict[str, dict]:
    """The run's artifacts by key."""
    found = api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
    return {a["key"]: a for a in found}


def summary_of(api: httpx.Client, run_id: str) -> str:
    """The run's Markdown summary artifact."""
    return artifacts(api, run_id)["train-and-deploy-summary"]["data"]
