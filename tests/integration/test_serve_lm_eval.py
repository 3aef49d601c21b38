"""quill on a Ray cluster the way an operator deploys it, and scored the way a user evaluates it: a loopback
`ray start --head` stands in for the cluster, `python -m pipelines.serve config` writes the Serve config that
`serve deploy` (or a KubeRay RayService's serveConfigV2) takes, Ray's metrics agent exports quill's Prometheus
metrics, and lm-eval's `local-completions` scores a quill task pack against the endpoint with the same numbers
as the in-process adapter."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import lm_eval
import lm_eval.models.openai_completions  # noqa: F401  (registers local-completions; quill's model fills the registry)
import pytest
import yaml
from lm_eval.tasks import TaskManager
from prometheus_client.parser import text_string_to_metric_families

from pipelines.evaluate.lm_eval_adapter import QuillLM
from pipelines.evaluate.task_pack import build_task_pack
from tests.helpers.paths import VENV_BIN, free_port, run_module
from tests.helpers.projects import make_project
from tests.helpers.serving import ray_head, ray_tmpdir, wait_for, write_params

pytestmark = pytest.mark.integration

TASKS = ["quill_cloze", "quill_nextline"]
LIMIT = 6  # items per task


def read_split(project: Path, split: str) -> list[str]:
    return [json.loads(line)["text"] for line in open(project / f"data/clean/{split}.jsonl")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A tiny quill project (block_size 256: every task item fits) deployed with `serve deploy` of the generated
    config onto `ray start --head` (run in the project, whose params.yaml the app builder reads)."""
    project = make_project(tmp_path_factory.mktemp("lmeval"), block_size=256)
    port = free_port()
    write_params(project / "params.yaml", port=port, max_batch_size=8)
    with ray_tmpdir() as tmp, ray_head(tmp, cwd=project) as head:
        config = run_module("pipelines.serve", project, "config", "--model", "artifacts/model", check=True).stdout
        (project / "serve.yaml").write_text(config)
        serve_cli = [str(VENV_BIN / "serve")]
        deploy = subprocess.run(
            [*serve_cli, "deploy", "serve.yaml", "--address", head["dashboard"]],
            cwd=project, env=head["env"], capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert deploy.returncode == 0, deploy.stderr

        def running():
            out = subprocess.run(
                [*serve_cli, "status", "--address", head["dashboard"]],
                cwd=project, env=head["env"], capture_output=True, text=True, timeout=60,
            ).stdout  # fmt: skip
            return yaml.safe_load(out)["applications"]["quill"]["status"] == "RUNNING" and out

        wait_for(running, 180, "quill RUNNING in `serve status`", every=2)
        yield {"project": project, "url": f"http://127.0.0.1:{port}", "config": config, **head}


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster["url"], timeout=120) as c:
        yield c


def test_serve_deploy_of_the_generated_config_serves_completions(cluster, http):
    # Ray's high-throughput mode is the cluster's environment, not the config's: a comment says so (this cluster
    # runs without it, as `ray start` does by default, and serves all the same)
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


def test_prometheus_metrics_count_requests_tokens_and_latencies(cluster, http):
    before = scrape(cluster["metrics"])
    ok0 = total(before, "ray_quill_requests_total", route="/v1/completions", status="200")
    tokens0 = total(before, "ray_quill_generated_tokens_total")
    ttft0 = total(before, "ray_quill_time_to_first_token_seconds_count")
    generated = 0
    for i in range(4):
        r = http.post("/v1/completions", json={"prompt": f"The king {i}", "max_tokens": 6, "ignore_eos": True})
        generated += r.json()["usage"]["completion_tokens"]
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1}).status_code == 400
    assert generated == 24

    def exported():  # Ray's agent exports every few seconds
        m = scrape(cluster["metrics"])
        ok = total(m, "ray_quill_requests_total", route="/v1/completions", status="200")
        return m if ok >= ok0 + 4 and total(m, "ray_quill_generated_tokens_total") >= tokens0 + generated else None

    m = wait_for(exported, 60, "quill's request and token counters exported", every=2)
    assert total(m, "ray_quill_requests_total", route="/v1/completions", status="400") >= 1
    assert total(m, "ray_quill_requests_total", route="/health", status="200") >= 1
    assert total(m, "ray_quill_time_to_first_token_seconds_count") >= ttft0 + 4
    ttft_mean = total(m, "ray_quill_time_to_first_token_seconds_sum") / total(
        m, "ray_quill_time_to_first_token_seconds_count"
    )
    tpot_mean = total(m, "ray_quill_time_per_output_token_seconds_sum") / total(
        m, "ray_quill_time_per_output_token_seconds_count"
    )
    assert 0 < ttft_mean < 30 and 0 < tpot_mean < 5  # seconds, a tiny model on a CPU
    for gauge in ("ray_quill_queue_length", "ray_quill_running_batch_size"):
        assert m.get(gauge), f"{gauge} not exported"
        assert all(0 <= s.value <= 8 for s in m[gauge])  # serve.max_batch_size in this module's params


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
