"""The evaluate stage (pipelines/evaluate/stage.py): sample generations' BLEU and ROUGE-L, the stage end to end,
and its bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines.common.params import EvalParams


# -- sample generations' BLEU and ROUGE-L --------------------------------------------------------------------------
def test_sample_scores_are_bleu_and_rouge_l_worked_out_by_hand():
    """One generation off by a word, one exact, one without a reference: BLEU and ROUGE-L as worked out by hand."""
    from pipelines.evaluate.stage import generate_samples

    generations = {"p1": "the cat sat on the mat", "p2": "all the world is a stage", "p3": "anything"}

    class FixedEngine:
        def generate(self, prompts, params):
            return [SimpleNamespace(text=generations[p]) for p in prompts]

    rows = [
        {"prompt": "p1", "reference": "the cat sat on a mat today"},
        {"prompt": "p2", "reference": "all the world is a stage"},
        {"prompt": "p3", "reference": None},
    ]
    got = generate_samples(FixedEngine(), rows, max_tokens=8, seed=0)
    # p1: matching 1- to 4-grams 5/6, 3/5, 2/4, 1/3, and 6 words against 7 (brevity penalty e^(1 - 7/6)):
    # BLEU = e^(1 - 7/6) (1/12)^(1/4). ROUGE-L: the longest common subsequence "the cat sat on mat" is 5 words,
    # precision 5/6, recall 5/7: F = 2 P R / (P + R) = 10/13
    assert got["rows"][0]["bleu"] == pytest.approx(100 * math.exp(1 - 7 / 6) * (1 / 12) ** 0.25, abs=1e-4)
    assert got["rows"][0]["rougeL"] == pytest.approx(10 / 13, abs=1e-4)
    assert (got["rows"][1]["bleu"], got["rows"][1]["rougeL"]) == (pytest.approx(100.0), pytest.approx(1.0))
    assert got["rows"][2]["bleu"] is None and got["rows"][2]["rougeL"] is None
    assert [r["generation"] for r in got["rows"]] == list(generations.values())
    # corpus BLEU pools the counts: 11/12, 8/10, 6/8, 4/6 and 12 words against 13; ROUGE-L is the rows' mean
    assert got["bleu"] == pytest.approx(100 * math.exp(1 - 13 / 12) * (11 / 30) ** 0.25, abs=1e-4)
    assert got["rougeL"] == pytest.approx((10 / 13 + 1) / 2, abs=1e-4)


# -- the stage, end to end, and its bad inputs ---------------------------------------------------------------------
SMALL = EvalParams(
    num_fewshot=[0, 1],
    max_items=6,
    batch_size=8,
    stride=32,
    sample_prompts=["The king"],
    samples_from_test=1,
    sample_max_tokens=8,
    ngram_order=3,
)


@pytest.fixture
def in_project(project, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the project as cwd, with its own SQLite tracking store."""
    import shutil

    work = tmp_path / "proj"
    for sub in ("data", "artifacts"):
        shutil.copytree(project / sub, work / sub)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    return work


@pytest.mark.slow
@pytest.mark.integration
def test_evaluate_stage_writes_metrics_reports_and_mlflow(in_project):
    from pipelines.common.tracking import mlflow_client
    from pipelines.evaluate.stage import evaluate

    m = evaluate(SMALL)
    on_disk = json.loads(Path("metrics/eval.json").read_text())
    assert on_disk["test_bpb"] == pytest.approx(m["test_bpb"])
    assert on_disk["num_fewshot"] == "0,1"
    assert set(on_disk["quill_cloze"]) == {"0shot", "1shot"} and set(on_disk["quill_perplexity"]) == {"0shot"}
    assert {"acc", "acc_norm"} <= set(on_disk["quill_nextline"]["1shot"])
    assert on_disk["quill_perplexity"]["0shot"]["bits_per_byte"] == pytest.approx(on_disk["test_bpb"], rel=1e-5)
    assert on_disk["reference"]["ngram_bpb"] > 0 and on_disk["reference"]["uniform_bpb"] > on_disk["test_bpb"] * 0.5
    assert on_disk["samples"]["count"] == 2
    for f in (
        "reports/eval/report.md",
        "reports/eval/samples.json",
        "reports/eval/lm_eval/0shot.json",
        "reports/eval/lm_eval/1shot.json",
        "plots/eval/attention.png",
        "plots/eval/bpb.csv",
    ):
        assert Path(f).is_file(), f
    evaluated = json.loads(Path("reports/eval/evaluated.json").read_text())
    assert "model_sha256" not in on_disk and evaluated["test_window_stride"] == 32
    run = mlflow_client().get_run(evaluated["mlflow_run_id"])
    assert run.data.metrics["eval.test_bpb"] == pytest.approx(on_disk["test_bpb"])
    assert "eval.quill_cloze.1shot.acc" in run.data.metrics


def run_main(module) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = module.main([])
    return code, err.getvalue()


def test_missing_model_folder_fails_fast_with_one_line(in_project):
    import shutil

    from pipelines.evaluate import stage as evaluate

    Path("params.yaml").write_text("data:\n  sources: [{type: local, path: x}]\n")
    shutil.rmtree("artifacts/model")
    code, err = run_main(evaluate)
    assert code == 1 and "no model in artifacts/model" in err and "dvc repro train" in err
    assert len(err.strip().splitlines()) == 1 and not Path("metrics/eval.json").exists()


def test_tokenizer_mismatch_fails_fast(in_project):
    from pipelines.evaluate import stage as evaluate

    Path("params.yaml").write_text("data:\n  sources: [{type: local, path: x}]\n")
    meta = json.loads(Path("data/tokens/meta.json").read_text())
    meta["tokenizer_sha256"] = "0" * 64
    Path("data/tokens/meta.json").write_text(json.dumps(meta))
    code, err = run_main(evaluate)
    assert code == 1 and "tokenizer mismatch" in err and not Path("metrics/eval.json").exists()


def test_incompatible_model_folder_fails_fast(in_project):
    from pipelines.evaluate import stage as evaluate

    Path("params.yaml").write_text("data:\n  sources: [{type: local, path: x}]\n")
    Path("artifacts/model/config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, err = run_main(evaluate)
    assert code == 1 and "not a model quill can load" in err


@pytest.mark.slow
def test_unknown_task_fails_fast(in_project):
    from pipelines.evaluate import stage as evaluate

    Path("params.yaml").write_text(
        "data:\n  sources: [{type: local, path: x}]\neval:\n  tasks: [quill_cloze, no_such_task]\n"
    )
    code, err = run_main(evaluate)
    assert code == 1 and "unknown lm-eval task(s) in eval.tasks: no_such_task" in err


def test_unreachable_tracking_server_fails_fast(in_project, monkeypatch):
    import socket

    from pipelines.evaluate import stage as evaluate

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    Path("params.yaml").write_text("data:\n  sources: [{type: local, path: x}]\n")
    code, err = run_main(evaluate)
    assert code == 1 and f"http://127.0.0.1:{port} is unreachable" in err and not Path("metrics/eval.json").exists()
