"""register: the pyfunc model round-trips through the registry; champion/challenger rules against a real
tracking store (SQLite, and a real `mlflow server` over HTTP); concurrent registrations."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.common.params import RegistryParams
from tests.helpers.projects import make_project

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "quill-test"
PARAMS_YAML = "data:\n  sources: [{type: local, path: x}]\nregistry:\n  model_name: quill-test\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("regproj"))


@pytest.fixture
def proj(built, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the project as cwd with its own SQLite store."""
    work = tmp_path / "proj"
    for sub in ("data", "artifacts"):
        shutil.copytree(built / sub, work / sub)
    (work / "params.yaml").write_text(PARAMS_YAML)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    return work


def new_run() -> str:
    from pipelines.common import tracking

    client = tracking.mlflow_client()
    return client.create_run(tracking.get_or_create_experiment(client), run_name="evaluate").info.run_id


def write_eval(bpb: float, run_id: str, data_sha: str | None = None, model_sha: str | None = None) -> None:
    """metrics/eval.json as the evaluate stage writes it (the numbers are chosen by the test)."""
    from pipelines.common.hashing import content_hash

    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/eval.json").write_text(json.dumps({
        "test_bpb": bpb, "test_loss": bpb * 2, "test_ppl": 100.0,
        "quill_cloze": {"0shot": {"acc": 0.25}, "5shot": {"acc": 0.5}},
        "reference": {"uniform_bpb": 9.0, "ngram_bpb": 3.0, "ngram_order": 3},
    }))
    Path("reports/eval").mkdir(parents=True, exist_ok=True)
    Path("reports/eval/evaluated.json").write_text(json.dumps({
        "model_sha256": model_sha or content_hash("artifacts/model/model.safetensors"), "test_window_stride": 32,
        "test_data_sha256": data_sha or content_hash("data/clean/test.jsonl"), "mlflow_run_id": run_id,
        "tokenizer_sha256": "abc",
    }))


def registered() -> dict:
    return json.loads(Path("artifacts/registered.json").read_text())


def champion_version(client) -> str:
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def test_promotion_rules_first_worse_better_forced(proj):
    from pipelines.common.tracking import mlflow_client
    from pipelines.register.stage import register

    client = mlflow_client()
    params = RegistryParams(model_name=NAME, min_improvement=0.05)
    run_id = new_run()

    write_eval(3.0, run_id)
    r = register(params)
    assert r["version"] == "1" and r["promoted"] and r["aliases"] == ["champion"] and "first model" in r["why"]
    assert registered() == r and r["run_id"] == run_id and r["model_uri"] == f"models:/{NAME}/1"
    v1 = client.get_model_version(NAME, "1")
    assert v1.tags["promoted"] == "true" and v1.tags["test_bpb"] == "3" and v1.tags["run_id"] == run_id
    assert {"git_commit", "training_run_id", "parameters", "quill_cloze.0shot.acc", "promotion_reason"} <= set(v1.tags)
    assert any(k.startswith("dvc_hash.data/clean") for k in v1.tags)
    assert v1.description.startswith(f"# {NAME} v1") and "## Limitations" in v1.description

    write_eval(2.98, run_id)  # better, but by less than min_improvement
    r = register(params)
    assert r["version"] == "2" and not r["promoted"] and r["aliases"] == ["challenger"]
    assert "< registry.min_improvement" in r["why"] and champion_version(client) == "1"
    assert client.get_model_version(NAME, "2").tags["promoted"] == "false"

    write_eval(2.5, run_id)  # better by 0.5
    r = register(params)
    assert r["promoted"] and r["champion_version"] == "1" and r["champion_test_bpb"] == pytest.approx(3.0)
    assert champion_version(client) == "3" and r["aliases"] == ["champion"]
    assert "same test split" in r["why"]

    write_eval(4.0, run_id)  # much worse, but forced
    r = register(params.model_copy(update={"force_promote": True}))
    assert r["promoted"] and r["forced"] and "forced by registry.force_promote" in r["why"]
    assert champion_version(client) == "4" and client.get_model_version(NAME, "4").tags["forced"] == "true"
    assert len({v.version for v in client.search_model_versions(f"name='{NAME}'")}) == 4


def test_a_training_run_missing_from_the_store_is_named_not_fatal(proj, capsys):
    """The model was trained against another store: registration goes on, the card leaves out its metrics."""
    from pipelines.common.tracking import mlflow_client
    from pipelines.register.stage import register

    missing = "0" * 32
    Path("artifacts/model/quill_run.json").write_text(json.dumps({"mlflow_run_id": missing}))
    write_eval(3.0, new_run())
    r = register(RegistryParams(model_name=NAME))
    assert r["version"] == "1" and r["promoted"]
    assert f"training run {missing} is not in" in capsys.readouterr().err
    assert mlflow_client().get_model_version(NAME, "1").tags["training_run_id"] == missing


def test_changed_test_split_reevaluates_the_champion(proj):
    from model import Engine
    from pipelines.common.heldout import held_out, read_texts
    from pipelines.register.stage import register

    params = RegistryParams(model_name=NAME, min_improvement=0.01)
    run_id = new_run()
    write_eval(1.0, run_id, data_sha="sha256:old-split")  # the champion's recorded figure is on another split
    assert register(params)["promoted"]

    engine = Engine.from_pretrained("artifacts/model")
    texts = read_texts(Path("data/clean/test.jsonl"))
    true_bpb = held_out(engine.model, [engine.encode(t) for t in texts], engine.eos_token_id,
                        sum(len(t.encode()) for t in texts), 32, 8, desc=None)["test_bpb"]
    write_eval(true_bpb - 0.5, run_id)  # on the current split, better than the champion really is there
    r = register(params)
    assert r["promoted"] and "re-evaluated on the current test split" in r["why"]
    assert r["champion_test_bpb"] == pytest.approx(true_bpb, rel=1e-4)  # not the stale 1.0


def test_pyfunc_model_round_trips_and_generates(proj):
    import mlflow

    from model import Engine, SamplingParams
    from pipelines.register.pyfunc_model import HF_MODEL_PATH
    from pipelines.register.stage import register

    write_eval(3.0, new_run())
    register(RegistryParams(model_name=NAME))
    uri = f"models:/{NAME}@champion"
    loaded = mlflow.pyfunc.load_model(uri)
    out = loaded.predict({"prompt": ["The king", "And"]}, params={"max_tokens": 6, "temperature": 0.0})
    engine = Engine.from_pretrained("artifacts/model")
    want = engine.generate(["The king", "And"], SamplingParams(max_tokens=6, temperature=0.0))
    assert out["text"].tolist() == [c.text for c in want]
    assert out["completion_tokens"].tolist() == [len(c.token_ids) for c in want]
    assert {p.name for p in loaded.metadata.get_params_schema().params} >= {"max_tokens", "temperature", "top_p", "seed"}
    folder = Path(mlflow.artifacts.download_artifacts(uri)) / HF_MODEL_PATH  # what a server fetches
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    seeded = [loaded.predict(["The"], params={"max_tokens": 8, "seed": 3})["text"][0] for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_stale_or_missing_evaluation_registers_nothing(proj):
    from pipelines.common.tracking import mlflow_client
    from pipelines.register import stage as reg

    code, err = _main(reg)
    assert code == 1 and "metrics/eval.json missing" in err
    write_eval(3.0, new_run(), model_sha="sha256:another-model")
    code, err = _main(reg)
    assert code == 1 and "describes another model" in err
    assert mlflow_client().search_registered_models() == []
    assert not Path("artifacts/registered.json").exists()


def _main(module) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = module.main()
    return code, err.getvalue()


# --- a real tracking server over HTTP --------------------------------------------------------------


@pytest.fixture
def mlflow_server(tmp_path) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--serve-artifacts", "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()}") from None
                time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_http_server_concurrent_registrations_give_one_champion(proj, mlflow_server, monkeypatch):
    import mlflow

    from pipelines.common.tracking import mlflow_client

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    write_eval(3.0, new_run())
    copies = []
    for i in range(2):  # two checkouts registering the same name at the same time
        other = proj.parent / f"copy{i}"
        for sub in ("artifacts", "metrics", "reports"):
            shutil.copytree(proj / sub, other / sub)
        (other / "params.yaml").write_text(PARAMS_YAML)
        copies.append(other)
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    procs = [subprocess.Popen([sys.executable, "-m", "pipelines.register"], cwd=c, text=True,
                              env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1]), **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in copies]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads((c / "artifacts/registered.json").read_text()) for c in copies]
    assert sorted(r["version"] for r in results) == ["1", "2"]
    assert sum(r["promoted"] for r in results) == 1  # same metrics: the second does not beat the first
    winner = next(r for r in results if r["promoted"])
    client = mlflow_client(mlflow_server)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == winner["version"]
    assert all(m.name == NAME for m in client.search_registered_models())  # the lock is gone

    mlflow.set_tracking_uri(mlflow_server)
    out = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(["The"], params={"max_tokens": 4})
    assert len(out) == 1 and out["finish_reason"][0] in ("length", "stop")


def test_register_refuses_unreachable_server(proj, monkeypatch):
    from pipelines.register import stage as reg

    write_eval(3.0, "no-run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    code, err = _main(reg)
    assert code == 1 and "unreachable" in err and not Path("artifacts/registered.json").exists()
