"""quill on a Ray cluster the way an operator deploys it, and scored the way a user evaluates it: the session's
Ray cluster (docker-compose.yml's head command on loopback) stands in for it, `python -m pipelines.serve config` writes the Serve config that
`serve deploy` (or a KubeRay RayService's serveConfigV2) takes, Ray's metrics agent exports quill's Prometheus
metrics, and lm-eval's `local-completions` scores a quill task pack against the endpoint with the same numbers
as the in-process adapter."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import lm_eval
import lm_eval.models.openai_completions  # noqa: F401  (registers local-completions; quill's model fills the registry)
import psutil
import pytest
import yaml
from lm_eval.tasks import TaskManager
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.util.state import list_workers

from pipelines.common.lm_eval_adapter import QuillLM
from pipelines.common.task_pack import build_task_pack
from pipelines.serve import AppArgs, app
from pipelines.serve.metrics import LATENCY_BUCKETS
from tests.helpers.paths import VENV_BIN, run_module
from tests.helpers.projects import make_project
from tests.helpers.services import wait_for
from tests.helpers.serving import delete_apps, write_params

pytestmark = pytest.mark.integration

TASKS = ["quill_cloze", "quill_nextline"]
LIMIT = 6  # items per task


def read_split(project: Path, split: str) -> list[str]:
    return [json.loads(line)["text"] for line in open(project / f"data/clean/{split}.jsonl")]


@pytest.fixture(scope="module")
def cluster(shared_ray):
    """A tiny quill project (block_size 256: every task item fits) in the session's Ray cluster's working directory
    (as an operator's image holds it: the config's relative paths and the params.yaml the app builder reads resolve
    there), deployed with `serve deploy` of the generated config; the app is deleted when the module is done."""
    project = make_project(shared_ray["home"], block_size=256)
    write_params(project / "params.yaml", port=shared_ray["serve_port"], max_batch_size=8)
    env = {**os.environ, **shared_ray["env"]}  # `serve` sends the cluster's token to its dashboard
    config = run_module("pipelines.serve", project, "config", "--model", "artifacts/model", check=True).stdout
    (project / "serve.yaml").write_text(config)
    serve_cli = [str(VENV_BIN / "serve")]
    try:
        deploy = subprocess.run(
            [*serve_cli, "deploy", "serve.yaml", "--address", shared_ray["dashboard"]],
            cwd=project, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert deploy.returncode == 0, deploy.stderr

        def running():
            out = subprocess.run(
                [*serve_cli, "status", "--address", shared_ray["dashboard"]],
                cwd=project, env=env, capture_output=True, text=True, timeout=60,
            ).stdout  # fmt: skip
            return yaml.safe_load(out)["applications"]["quill"]["status"] == "RUNNING" and out

        wait_for(running, 180, "quill RUNNING in `serve status`", every=1)
        yield {
            "project": project,
            "url": shared_ray["url"],
            "config": config,
            "metrics": shared_ray["metrics"],
            "dashboard": shared_ray["dashboard"],
        }
    finally:
        delete_apps("quill")


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster["url"], timeout=120) as c:
        yield c


def test_serve_deploy_of_the_generated_config_serves_completions(cluster, http):
    # Ray's high-throughput mode is the cluster's environment, not the config's: a comment says so (the session's
    # cluster was started with it, as docker-compose.yml's head is)
    assert cluster["config"].startswith(
        "# serve.high_throughput: start Ray's processes with RAY_SERVE_ENABLE_HA_PROXY=1"
    )
    [application] = yaml.safe_load(cluster["config"])["applications"]
    assert application["import_path"] == "pipelines.serve:app" and application["args"]["model"] == "artifacts/model"
    assert http.get("/health").json()["status"] == "ok"
    [card] = http.get("/v1/models").json()["data"]
    assert card["id"] == "model" and card["uri"] == str(cluster["project"] / "artifacts/model")
    r = http.post("/v1/completions", json={"prompt": "The king", "max_tokens": 5, "ignore_eos": True}).json()
    assert r["usage"]["completion_tokens"] == 5 and isinstance(r["choices"][0]["text"], str)


def scrape(url: str) -> dict[str, list]:
    """Prometheus samples by name (ray_quill_* only)."""
    text = httpx.get(url, timeout=10).text
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_quill_"):
                out.setdefault(s.name, []).append(s)
    return out


def total(samples: dict[str, list], name: str, **labels) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture
def metered(cluster):
    """An app of this test's own (`metered`, the project's model and params) on the same cluster: (client, the Ray
    worker id of its replica). Ray labels every series with the worker that recorded it, so the replica's series
    count exactly this test's requests (other tests' requests to `quill` may be exported late)."""
    project = cluster["project"]
    args = AppArgs(model=str(project / "artifacts/model"), params_file=str(project / "params.yaml"))
    try:
        serve.run(app(args), name="metered", route_prefix="/metered")
        with httpx.Client(base_url=cluster["url"] + "/metered", timeout=120) as c:
            replica = psutil.Process(c.get("/stats").json()["engine_pid"]).ppid()  # the engine is its child
            [worker] = list_workers(address=cluster["dashboard"], filters=[("pid", "=", replica)])
            yield c, worker.worker_id
    finally:
        delete_apps("metered")


def test_prometheus_metrics_count_requests_tokens_and_latencies(cluster, metered):
    metered, worker_id = metered
    mine = {"WorkerId": worker_id}
    waited = []
    for i in range(4):
        started = time.monotonic()
        r = metered.post("/v1/completions", json={"prompt": f"The king {i}", "max_tokens": 6, "ignore_eos": True})
        waited.append(time.monotonic() - started)
        assert r.json()["usage"]["completion_tokens"] == 6
    assert metered.post("/v1/completions", json={"prompt": "x", "max_tokens": -1}).status_code == 400
    assert metered.get("/health").status_code == 200

    def exported():  # Ray's agent exports every few seconds
        m = scrape(cluster["metrics"])
        ok = total(m, "ray_quill_requests_total", route="/v1/completions", status="200", **mine)
        tokens = total(m, "ray_quill_generated_tokens_total", **mine)
        firsts = total(m, "ray_quill_time_to_first_token_seconds_count", **mine)
        refused = total(m, "ray_quill_requests_total", route="/v1/completions", status="400", **mine)
        health = total(m, "ray_quill_requests_total", route="/health", status="200", **mine)
        # the replica records each request as it answers, so the export that carries the last completion
        # may still lack the later 400 and /health: wait for every count asserted below
        return m if ok >= 4 and tokens >= 24 and firsts >= 4 and refused >= 1 and health >= 1 else None

    m = wait_for(
        exported, 60, "the metered app's request, refusal, health, token and first-token counts exported", every=1
    )
    assert total(m, "ray_quill_requests_total", route="/v1/completions", status="200", **mine) == 4
    assert total(m, "ray_quill_requests_total", route="/v1/completions", status="400", **mine) == 1
    assert total(m, "ray_quill_requests_total", route="/health", status="200", **mine) >= 1
    assert total(m, "ray_quill_generated_tokens_total", **mine) == 24
    assert total(m, "ray_quill_time_to_first_token_seconds_count", **mine) == 4
    # each request's first token came after it arrived and before its answer reached this client: the four
    # times to first token add up to more than nothing and to no more than the four round trips took
    ttft = total(m, "ray_quill_time_to_first_token_seconds_sum", **mine)
    assert 0 < ttft <= sum(waited), (ttft, waited)
    # every first token fell in a bucket at or below the slowest round trip's
    slowest = min(b for b in LATENCY_BUCKETS + [float("inf")] if b >= max(waited))
    within = [
        s.value
        for s in m["ray_quill_time_to_first_token_seconds_bucket"]
        if all(s.labels.get(k) == v for k, v in mine.items()) and float(s.labels["le"]) == slowest
    ]
    assert sum(within) == 4, (within, waited)
    assert total(m, "ray_quill_time_per_output_token_seconds_count", **mine) == 4
    assert total(m, "ray_quill_time_per_output_token_seconds_sum", **mine) > 0
    for gauge in ("ray_quill_queue_length", "ray_quill_running_batch_size"):
        values = [s.value for s in m.get(gauge, []) if all(s.labels.get(k) == v for k, v in mine.items())]
        assert values, f"{gauge} not exported"
        assert all(0 <= v <= 8 for v in values)  # serve.max_batch_size in this module's params


def test_lm_eval_local_completions_matches_the_in_process_adapter(cluster):
    project = cluster["project"]
    pack = project / "pack"
    build_task_pack(read_split(project, "test"), read_split(project, "val"), pack, max_items=LIMIT, seed=3)
    kw = dict(tasks=TASKS, num_fewshot=0, limit=LIMIT, log_samples=True, bootstrap_iters=0)
    served = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={cluster['url']}/v1/completions,model=model,tokenizer_backend=remote,batch_size=4",
        task_manager=TaskManager(include_path=str(pack)),
        **kw,
    )
    local = lm_eval.simple_evaluate(
        model=QuillLM(pretrained=str(project / "artifacts/model"), batch_size=4),
        task_manager=TaskManager(include_path=str(pack)),
        **kw,
    )
    for task in TASKS:
        a, b = served["samples"][task], local["samples"][task]
        assert len(a) == len(b) == LIMIT
        for x, y in zip(a, b, strict=True):
            assert x["doc_id"] == y["doc_id"]
            lls_served = [r[0] for r in x["filtered_resps"]]
            lls_local = [r[0] for r in y["filtered_resps"]]
            assert lls_served == pytest.approx(lls_local, abs=1e-3)
        for metric, value in local["results"][task].items():  # acc, acc_norm, perplexity (= exp(-mean ll): rel)
            if isinstance(value, float):
                assert served["results"][task][metric] == pytest.approx(value, rel=1e-3, abs=1e-3), (task, metric)
