"""train_and_deploy end to end, the way a team uses it: a real `prefect server start`, the deployments served by
`python -m flows.deploy` from a tiny workspace, runs created through the REST API exactly as the UI's Run,
Retry and Resume buttons do, real DVC stages and a real MLflow store.

The tests run in order on one workspace (about ten minutes): a run from the Run button; bad parameters
refused; an injected failure in evaluate, then a retry that does not redo the data or training work;
a train stage killed mid-run, retried by its task and resumed from its checkpoint; an approval pause resumed
through the API while a second run is refused by the workspace lock; an approval nobody answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from mlflow import MlflowClient

from tests.helpers.workspace import prefect_server, quill_env, ray_head, stop, tiny_workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
MODEL = "quill-test"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(workspace, env, API client) with the four deployments served from the workspace."""
    root = tiny_workspace(tmp_path_factory.mktemp("flows") / "ws")
    with prefect_server(root.parent / "prefect") as prefect, ray_head() as ray:
        env = quill_env(root, **prefect, **ray)
        log = open(root.parent / "deploy.log", "w")
        served = subprocess.Popen(
            [sys.executable, "-m", "flows.deploy"],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        api = httpx.Client(base_url=prefect["PREFECT_API_URL"], timeout=30)
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                assert served.poll() is None, (root.parent / "deploy.log").read_text()
                found = api.post("/deployments/filter", json={}).json()
                if len(found) == 4:
                    break
                time.sleep(1)
            else:
                pytest.fail("flows.deploy did not create its four deployments within 120 s")
            yield root, env, api
        finally:
            api.close()
            stop(served)
            log.close()
            subprocess.run(
                [sys.executable, "-m", "pipelines.serve", "shutdown"],
                cwd=root,
                env=env,
                timeout=120,
                capture_output=True,
            )


def deployment_id(api: httpx.Client, flow: str) -> str:
    return api.get(f"/deployments/name/{flow}/quill").json()["id"]


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


def wait(api: httpx.Client, run_id: str, until: set[str], timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = api.get(f"/flow_runs/{run_id}").json()
        if run["state"]["type"] in until | TERMINAL:
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} still {run['state']} after {timeout} s")


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


def summary_of(api: httpx.Client, run_id: str) -> str:
    """The run's Markdown summary artifact."""
    artifacts = api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
    return next(a["data"] for a in artifacts if a["key"] == "train-and-deploy-summary")


def mlflow(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")


def test_run_button_runs_the_pipeline_and_registers_a_champion(stack):
    root, _, api = stack
    response = run_button(api, {"overrides": {"train": {"max_steps": 8}}, "deploy": False})
    assert response.status_code == 201, response.text
    run = wait(api, response.json()["id"], set())
    assert run["state"]["type"] == "COMPLETED", logs(api, run["id"])
    version = mlflow(root).get_model_version_by_alias(MODEL, "champion")
    assert str(version.version) == "1"
    registered = json.loads((root / "artifacts" / "registered.json").read_text())
    assert registered["promoted"] and registered["version"] == "1"
    training = mlflow(root).get_run(registered["run_id"])
    assert training.data.tags["quill.flow_run_id"] == run["id"]
    assert json.loads(training.data.tags["quill.overrides"]) == {"train.max_steps": 8}
    artifacts = api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).json()
    kinds = {a["key"]: a for a in artifacts}
    assert kinds["train-progress"]["data"] == 100.0
    summary = kinds["train-and-deploy-summary"]["data"]
    assert "quill-test v1 promoted to **champion**" in summary and "`train.max_steps` | `8`" in summary
    # the override lives in dvc.lock, not in the user's params.yaml
    assert subprocess.run(["git", "diff", "--quiet", "params.yaml"], cwd=root).returncode == 0
    assert "max_steps: 8" in (root / "dvc.lock").read_text()


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"overrides": {"train": {"max_steps": 0}}}, "max_steps"),
        ({"overrides": {"train": {"max_stepz": 3}}}, "max_stepz"),
        ({"overrides": {"train": {"seed": "seven"}}}, "seven"),
    ],
)
def test_bad_parameters_are_refused_before_a_run_exists(stack, parameters, named):
    _, _, api = stack
    response = run_button(api, parameters)
    assert response.status_code == 409 and named in response.text, response.text


def test_bad_overrides_are_refused_on_the_command_line_before_any_work(stack):
    root, env, _ = stack
    before = (root / "dvc.lock").read_text()
    result = subprocess.run(
        [sys.executable, "-m", "flows.train_and_deploy", "--set", "train.lr=fast"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "'train.lr': Input should be a valid number" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "flows.train_and_deploy", "--set", "other.thing=1"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "unknown key 'other'" in result.stderr
    assert (root / "dvc.lock").read_text() == before


def test_a_failed_evaluate_is_retried_without_redoing_data_or_training(stack):
    root, _, api = stack
    entry = root / "pipelines" / "evaluate" / "__main__.py"
    original = entry.read_text()
    entry.write_text('raise SystemExit("injected failure in evaluate")\n')
    try:
        response = run_button(api, {"overrides": {"train": {"max_steps": 9}}, "deploy": False})
        run = wait(api, response.json()["id"], set())
    finally:
        entry.write_text(original)
    assert run["state"]["type"] == "FAILED"
    assert "injected failure in evaluate" in run["state"]["message"] + logs(api, run["id"])
    trained = task_runs(api, run["id"])["train"][-1]
    assert trained["state"]["type"] == "COMPLETED"
    model_file = root / "artifacts" / "model" / "model.safetensors"
    stamp = model_file.stat().st_mtime_ns
    train_runs = len(mlflow(root).search_runs([mlflow(root).get_experiment_by_name("quill").experiment_id]))

    # the UI's Retry button: the failed run goes back to Scheduled and the served deployment runs it again
    retry = api.post(
        f"/flow_runs/{run['id']}/set_state",
        json={"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True},
    )
    assert retry.status_code in (200, 201), retry.text
    run = wait(api, run["id"], set())
    assert run["state"]["type"] == "COMPLETED", logs(api, run["id"])
    assert model_file.stat().st_mtime_ns == stamp  # not retrained
    assert len(mlflow(root).search_runs([mlflow(root).get_experiment_by_name("quill").experiment_id])) == train_runs
    text = logs(api, run["id"])
    for stage in ("ingest", "clean", "tokenize", "train"):
        assert f"Stage '{stage}' didn't change, skipping" in text
    assert "Running stage 'evaluate'" in text and json.loads((root / "artifacts/registered.json").read_text())


def train_process(root: Path) -> psutil.Process | None:
    """The workspace's running `python -m pipelines.train`, if any."""
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        if proc.info["cwd"] == str(root) and "pipelines.train" in (proc.info["cmdline"] or []):
            return proc
    return None


def test_a_killed_train_is_retried_by_the_task_and_resumes_its_checkpoint(stack):
    """A SIGKILL of the train stage mid-run (an OOM kill, a lost node): the train task's retry runs it again and
    it resumes from the checkpoint the killed attempt wrote, in the same MLflow run. A second Run click meanwhile
    queues behind it (the deployment's concurrency limit) and then finds nothing to redo."""
    root, _, api = stack
    experiment = mlflow(root).get_experiment_by_name("quill").experiment_id
    train_runs = len(mlflow(root).search_runs([experiment]))
    overrides = {"train": {"max_steps": 400, "checkpoint_every": 4}}
    earlier = set((root / "checkpoints").glob("*/step-*.ckpt"))  # finished runs of other configurations
    response = run_button(api, {"overrides": overrides, "deploy": False})
    run_id = response.json()["id"]
    deadline = time.time() + 300
    while time.time() < deadline:
        proc = train_process(root)
        if proc and set((root / "checkpoints").glob("*/step-*.ckpt")) - earlier:
            break
        assert api.get(f"/flow_runs/{run_id}").json()["state"]["type"] not in TERMINAL, logs(api, run_id)
        time.sleep(0.2)
    else:
        pytest.fail(f"no checkpoint of the train stage within 300 s:\n{logs(api, run_id)}")
    # a second click while this run trains (only now: the runner may start queued runs in either order)
    queued = run_button(api, {"overrides": overrides, "deploy": False}).json()["id"]
    proc.kill()
    run = wait(api, run_id, set(), timeout=600)
    assert run["state"]["type"] == "COMPLETED", logs(api, run_id)
    text = logs(api, run_id)
    trained = task_runs(api, run_id)["train"]
    assert sum(t["run_count"] for t in trained) == 2, (trained, text)  # the killed attempt and its retry
    assert "train: resuming from checkpoints/" in text, text
    assert len(mlflow(root).search_runs([experiment])) == train_runs + 1  # both attempts log to one MLflow run

    # the second click waited for the deployment's one slot (the workspace lock would have failed an overlap)
    second = wait(api, queued, set(), timeout=600)
    assert second["state"]["type"] == "COMPLETED", logs(api, queued)
    assert second["start_time"] >= run["end_time"], (second["start_time"], run["end_time"])
    assert "Stage 'train' didn't change, skipping" in logs(api, queued)


def test_approval_pause_is_resumed_through_the_api_and_holds_the_workspace(stack):
    root, env, api = stack
    versions_before = len(mlflow(root).search_model_versions(f"name='{MODEL}'"))
    response = run_button(api, {"overrides": {"train": {"max_steps": 10}}, "require_approval": True, "deploy": False})
    run = wait(api, response.json()["id"], {"PAUSED"})
    assert run["state"]["type"] == "PAUSED", logs(api, run["id"])
    paused = json.loads((root / "artifacts/registered.json").read_text())  # registered, waiting as challenger
    assert paused["version"] == str(versions_before + 1) and not paused["promoted"]
    assert (
        paused["aliases"] == ["challenger"]
        and "champion" not in mlflow(root).get_model_version(MODEL, paused["version"]).aliases
    )

    # a second run meanwhile is refused with a message (the paused run holds the workspace)
    second = subprocess.run(
        [sys.executable, "-m", "flows.train_and_deploy", "--no-deploy"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
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


def test_an_unanswered_approval_leaves_the_version_challenger(stack):
    """The new version is registered as challenger before the pause; with no answer it stays so, and the run
    completes (nothing failed: the flow resumes itself at the deadline with a refusal)."""
    root, _, api = stack
    champion_before = mlflow(root).get_model_version_by_alias(MODEL, "champion").version
    versions_before = len(mlflow(root).search_model_versions(f"name='{MODEL}'"))
    response = run_button(
        api,
        {
            "overrides": {"train": {"max_steps": 11}},
            "require_approval": True,
            "approval_timeout_s": 10,
            "deploy": False,
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


def test_promote_model_and_evaluate_model_from_their_deployments(stack):
    root, _, api = stack

    def run(flow: str, parameters: dict) -> dict:
        response = run_button(api, parameters, flow)
        assert response.status_code == 201, response.text
        done = wait(api, response.json()["id"], set())
        assert done["state"]["type"] == "COMPLETED", logs(api, done["id"])
        return done

    run("promote_model", {"version": "1", "redeploy": False})
    champion = mlflow(root).get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1" and "promote_model flow run" in champion.tags["quill.promoted_by"]
    evaluated = run("evaluate_model", {"model": "champion"})
    artifacts = api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [evaluated["id"]]}}}).json()
    assert "quill-test v1 on the current data" in artifacts[0]["data"] and "test_bpb" in artifacts[0]["data"]


def test_the_run_button_deploys_the_champion_and_the_endpoint_answers(stack):
    root, _, api = stack
    response = run_button(api, {})  # the form's defaults: deploy the champion
    run = wait(api, response.json()["id"], set(), timeout=600)
    assert run["state"]["type"] == "COMPLETED", logs(api, run["id"])
    champion = str(mlflow(root).get_model_version_by_alias(MODEL, "champion").version)
    port = yaml.safe_load((root / "params.yaml").read_text())["serve"]["port"]
    url = f"http://127.0.0.1:{port}"
    listing = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert str(listing["data"][0]["version"]) == champion, listing
    completion = httpx.post(f"{url}/v1/completions", json={"prompt": "The king", "max_tokens": 4}, timeout=60)
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"] is not None
    summary = summary_of(api, run["id"])
    assert f"**Endpoint:** {MODEL} (version {champion}) at {url}" in summary
