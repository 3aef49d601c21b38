"""evaluate: sliding-window bits per byte, the lm-eval adapter, the task pack, the reference models, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lm_eval.utils import get_rolling_token_windows

from model import GPT, Engine, GPTConfig
from model.scoring import rolling_loglikelihood, rolling_windows
from pipelines.common.params import EvalParams
from pipelines.evaluate.lm_eval_adapter import QuillLM, split_documents
from pipelines.evaluate.ngram import ByteNgram, uniform_bpb
from pipelines.evaluate.task_pack import TASKS, build_task_pack
from tests.helpers.paths import REPO
from tests.helpers.projects import make_project


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("evalproj"))


@pytest.fixture(scope="module")
def engine(project) -> Engine:
    return Engine.from_pretrained(project / "artifacts/model")


def held_out_docs(project) -> list[list[int]]:
    meta = json.loads((project / "data/tokens/meta.json").read_text())
    tokens = np.fromfile(project / "data/tokens/test.bin", dtype=meta["dtype"])
    return split_documents(tokens, meta["eot_id"])


# --- sliding windows -------------------------------------------------------------------------------


@pytest.mark.parametrize("n,block_size,stride", [(1, 4, 2), (4, 4, 4), (5, 4, 4), (10, 4, 2), (10, 4, 1), (100, 16, 5)])
def test_every_token_scored_once_with_bounded_context(n, block_size, stride):
    scored = []
    for start, end, n_scored in rolling_windows(n, block_size, stride):
        assert 0 <= start < end and end - start <= block_size and 1 <= n_scored <= end - start
        scored += list(range(end - n_scored, end))  # target t[i] is predicted at x position i
    assert scored == list(range(n))


def naive_loglik(model, doc: list[int], prefix: int, stride: int) -> float:
    """Hand computation: each token's logprob with the context the window rule gives it, one forward each."""
    bs = model.config.block_size
    x = [prefix, *doc]
    total = 0.0
    for start, end, n_scored in rolling_windows(len(doc), bs, stride):
        for i in range(end - n_scored, end):  # predict x[i + 1] from x[start : i + 1]
            with torch.no_grad():
                logits, _ = model(torch.tensor([x[start : i + 1]]))
            total += torch.log_softmax(logits[0, -1], -1)[x[i + 1]].item()
    return total


@pytest.mark.parametrize("stride", [64, 24, 7])
def test_rolling_loglikelihood_equals_token_by_token_computation(engine, project, stride):
    docs = [d[:150] for d in held_out_docs(project)[:2]]
    got = rolling_loglikelihood(engine.model, docs, 0, stride=stride, batch_size=3)
    want = [naive_loglik(engine.model, d, 0, stride) for d in docs]
    assert got == pytest.approx(want, rel=1e-5)


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_per_byte(project):
    """All-zero weights give logits of 0: every token costs log2(V) bits, so bpb = tokens * log2(V) / bytes."""
    from pipelines.common.heldout import held_out

    vocab = json.loads((project / "data/tokens/meta.json").read_text())["vocab_size"]
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=vocab))
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    docs = [[5, 6, 7] * 50, [9, 10]]  # 152 tokens; longer than block_size, so several windows
    got = held_out(model.eval(), docs, 0, n_bytes=300, stride=16, batch_size=4, desc=None)
    assert got["test_bpb"] == pytest.approx(152 * math.log2(vocab) / 300, rel=1e-6)
    assert got["test_loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert got["test_ppl"] == pytest.approx(vocab, rel=1e-5)


def test_held_out_bpb_by_hand_on_fixture(engine, project):
    """bpb = -(sum of every test token's natural-log prob) / ln 2 / (UTF-8 bytes of the test text)."""
    from pipelines.common.heldout import held_out

    docs = held_out_docs(project)[:3]  # the naive computation runs one forward per token
    texts = [json.loads(line)["text"] for line in open(project / "data/clean/test.jsonl")][:3]
    n_bytes = sum(len(t.encode()) for t in texts)
    got = held_out(engine.model, docs, 0, n_bytes, stride=32, batch_size=8, desc=None)
    by_hand = -sum(naive_loglik(engine.model, d, 0, 32) for d in docs) / math.log(2) / n_bytes
    assert got["test_bpb"] == pytest.approx(by_hand, rel=1e-5)
    assert got["test_tokens"] == sum(len(d) for d in docs)


# --- the lm-eval adapter ---------------------------------------------------------------------------


def instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def direct_loglik(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    with torch.no_grad():
        logits, _ = model(torch.tensor([(ctx + cont)[:-1]]))
    logp = torch.log_softmax(logits[0, len(ctx) - 1 :], -1)
    target = torch.tensor(cont)
    return logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


PAIRS = [
    ("The king", " is dead"),
    ("", "hello world"),
    ("And so", " to bed."),
    ("x" * 400, " long context"),
    ("Ünïcödé café", " — naïve 🎉"),
    ("a b c d e f g", " h"),
]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_adapter_loglikelihood_equals_direct_computation(engine, batch_size):
    lm = QuillLM(engine=engine, batch_size=batch_size)
    with pytest.warns(
        UserWarning, match=r"^1 of 6 loglikelihood requests \(\d+ tokens on average\) exceed the model's context"
    ):
        got = lm.loglikelihood(instances("loglikelihood", PAIRS), disable_tqdm=True)
    assert (lm.truncated_requests, lm.loglikelihood_requests) == (1, 6)  # what the evaluate stage logs
    bs = engine.config.block_size
    for (ctx, cont), (ll, greedy) in zip(PAIRS, got):
        ctx_ids = engine.encode(ctx) if ctx else [engine.eos_token_id]
        whole = engine.encode(ctx + cont) if ctx else ctx_ids + engine.encode(cont)
        cont_ids = whole[len(ctx_ids) :]
        seq = (ctx_ids + cont_ids)[-(bs + 1) :]  # left truncation, like Hugging Face's lm-eval model
        want = direct_loglik(engine.model, seq[: len(seq) - len(cont_ids)], cont_ids)
        assert ll == pytest.approx(want[0], rel=1e-4, abs=1e-4)
        assert greedy == want[1]


def lm_eval_windows_loglik(model, doc: list[int], prefix: int, stride: int) -> float:
    """Independent of model.scoring: lm-eval's own rolling windows (what its Hugging Face model scores, here with
    `stride` new tokens per window), each a plain forward pass summing the log-softmax of its predicted tokens."""
    T = model.config.block_size
    total = 0.0
    for inputs, predicted in get_rolling_token_windows(doc, prefix, max_seq_len=T, context_len=T - stride + 1):
        with torch.no_grad():
            logits, _ = model(torch.tensor([inputs]))
        logp = torch.log_softmax(logits[0, -len(predicted) :], -1)  # the last len(predicted) positions
        total += logp.gather(1, torch.tensor(predicted)[:, None]).sum().item()
    return total


def test_adapter_rolling_equals_held_out_and_generate_stops(engine, project):
    """loglikelihood_rolling against lm-eval's windows scored by plain forward passes; generate_until below."""
    lm = QuillLM(engine=engine, batch_size=4, stride=16)
    texts = [json.loads(line)["text"] for line in open(project / "data/clean/test.jsonl")][:3] + ["To be."]
    docs = [engine.encode(t) for t in texts]
    assert min(len(d) for d in docs[:3]) > 3 * engine.config.block_size and len(docs[3]) < 16  # many windows, one
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    want = [lm_eval_windows_loglik(engine.model, d, engine.eos_token_id, stride=16) for d in docs]
    assert got == pytest.approx(want, rel=1e-5)
    # and the held-out metric's function scores the same (the evaluate stage fills the adapter's cache with it)
    assert rolling_loglikelihood(engine.model, docs, engine.eos_token_id, 16, 8) == pytest.approx(want, rel=1e-5)


def successor_model(vocab_size: int) -> GPT:
    """A model whose greedy next token is always the last token's id + 1: every token embeds to its own one-hot
    vector, attention and MLP add nothing (zero weights), and the head's row v reads component v - 1."""
    n_embd = 8 * math.ceil(vocab_size / 8)  # room for the one-hot vectors; head_dim stays even
    cfg = GPTConfig.from_preset("tiny", vocab_size=vocab_size, n_embd=n_embd, tie_embeddings=False)
    model = GPT(cfg).eval()
    eye = torch.eye(vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, :vocab_size] = eye
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight[:, :vocab_size] = eye.roll(1, dims=0)  # row v is e_(v-1)
    return model


def test_adapter_generate_until_stops_at_until_and_at_max_gen_toks(project):
    """Greedy on a model that counts up through the token ids: the tokenizer's byte tokens then spell the
    alphabet, so each output is known before generating it ("The" ends in "e": f, g, h, ...; "A": B, C, ...)."""
    vocab = json.loads((project / "data/tokens/meta.json").read_text())["vocab_size"]
    engine = Engine(successor_model(vocab), project / "data/tokenizer")
    ids = engine.encode("The king")
    with torch.no_grad():
        logits, _ = engine.model(torch.tensor([ids]))
    assert logits[0].argmax(-1).tolist() == [t + 1 for t in ids]  # the construction holds at every position
    assert engine.decode([engine.encode("The")[-1] + i for i in range(1, 6)]) == "fghij"
    assert engine.decode([engine.encode("A")[-1] + i for i in range(1, 6)]) == "BCDEF"

    lm = QuillLM(engine=engine, batch_size=4)
    requests = [
        ("The", {"until": ["jk"], "max_gen_toks": 20}),  # the stop string cuts: fghi|jk...
        ("A", {"until": ["Q"], "max_gen_toks": 5}),  # max_gen_toks cuts first: BCDEF, Q would be the 16th
        ("A", {"until": ["Q"], "max_gen_toks": 20}),  # the same stop string with room to reach it
        ("The", {"until": ["\n"], "max_gen_toks": 3}),  # two prompts of different lengths in one batch
        ("A", {"until": ["\n"], "max_gen_toks": 3}),
    ]
    outs = lm.generate_until(instances("generate_until", requests), disable_tqdm=True)
    assert outs == ["fghi", "BCDEF", "BCDEFGHIJKLMNOP", "fgh", "BCD"]


# --- the task pack ---------------------------------------------------------------------------------


def read_split(project: Path, split: str) -> list[str]:
    return [json.loads(line)["text"] for line in open(project / f"data/clean/{split}.jsonl")]


def test_task_pack_is_deterministic_and_well_formed(project, tmp_path):
    test, val = read_split(project, "test"), read_split(project, "val")
    a = build_task_pack(test, val, tmp_path / "a", max_items=5, seed=7)
    b = build_task_pack(test, val, tmp_path / "b", max_items=5, seed=7)
    c = build_task_pack(test, val, tmp_path / "c", max_items=5, seed=8)
    assert a == b and set(a) == set(TASKS) and a["quill_perplexity"] == len(test)
    for f in sorted((tmp_path / "a").iterdir()):
        other = (tmp_path / "b" / f.name).read_text()
        assert f.read_text().replace(str(tmp_path / "a"), "X") == other.replace(str(tmp_path / "b"), "X")
    assert c == a  # the same number of items per task, drawn differently:
    assert any(
        (tmp_path / "a" / f.name).read_text().replace(str(tmp_path / "a"), "X")
        != (tmp_path / "c" / f.name).read_text().replace(str(tmp_path / "c"), "X")
        for f in (tmp_path / "a").iterdir()
    )
    assert (tmp_path / "a/quill_cloze.test.jsonl").read_text() != (tmp_path / "c/quill_cloze.test.jsonl").read_text()
    for line in open(tmp_path / "a/quill_cloze.test.jsonl"):
        item = json.loads(line)
        assert item["target"].startswith(" ") and item["target"].strip().isalpha() or "'" in item["target"]
        assert item["context"] == item["context"].rstrip()
    for line in open(tmp_path / "a/quill_nextline.test.jsonl"):
        item = json.loads(line)
        assert len(set(item["choices"])) == 4
        assert item["context"] + "\n" + item["choices"][item["label"]] in test[item["doc"]]
    assert [json.loads(x)["text"] for x in open(tmp_path / "a/quill_perplexity.test.jsonl")] == test


def test_rolling_task_agrees_with_held_out_metric(engine, project, tmp_path):
    """quill_perplexity through lm-eval gives the held-out bits per byte (same windows, same documents)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pipelines.common.heldout import held_out

    test = read_split(project, "test")
    build_task_pack(test, read_split(project, "val"), tmp_path / "pack", max_items=5, seed=1)
    lm = QuillLM(engine=engine, batch_size=8, stride=24)
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=["quill_perplexity"],
        num_fewshot=0,
        log_samples=False,
        task_manager=TaskManager(include_path=str(tmp_path / "pack")),
        bootstrap_iters=0,
    )
    task = res["results"]["quill_perplexity"]
    meta = json.loads((project / "data/tokens/meta.json").read_text())
    ref = held_out(engine.model, held_out_docs(project), 0, meta["splits"]["test"]["bytes"], 24, 8, desc=None)
    assert task["bits_per_byte,none"] == pytest.approx(ref["test_bpb"], rel=1e-5)
    assert task["byte_perplexity,none"] == pytest.approx(2 ** ref["test_bpb"], rel=1e-5)


# --- reference models ------------------------------------------------------------------------------


def test_byte_ngram_is_normalised_and_beats_uniform(project):
    train, test = read_split(project, "train"), read_split(project, "test")
    lm = ByteNgram.fit([t.encode() for t in train], order=4)
    probs = [2 ** lm.log2_probs(b"the k" + bytes([b]))[-1] for b in range(256)]
    assert sum(probs) == pytest.approx(1.0, abs=1e-9)
    assert lm.bits_per_byte([t.encode() for t in test]) < 8.0
    assert ByteNgram.fit([b"abab" * 100], 2).bits_per_byte([b"abab"]) < 1.0
    assert uniform_bpb(10, 20, 256) == pytest.approx(4.0)


# --- sample generations' BLEU and ROUGE-L --------------------------------------------------------


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


# --- the stage, end to end, and its bad inputs -----------------------------------------------------

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


@pytest.mark.slow
def test_lm_eval_command_line_runs_a_quill_model(project, tmp_path):
    """`--model quill` from lm-eval's own CLI (which asks for device cuda by default) on a CPU-only machine."""
    build_task_pack(read_split(project, "test"), read_split(project, "val"), tmp_path / "tasks", max_items=5, seed=7)
    code = "import sys, pipelines.evaluate.lm_eval_adapter, lm_eval.__main__ as m; sys.argv[0] = 'lm_eval'; m.cli_evaluate()"
    out = tmp_path / "cli-out"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--model",
            "quill",
            "--model_args",
            f"pretrained={project / 'artifacts/model'}",
            "--tasks",
            "quill_cloze",
            "--include_path",
            str(tmp_path / "tasks"),
            "--limit",
            "3",
            "--batch_size",
            "4",
            "--output_path",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [results] = list(out.rglob("results_*.json"))
    assert "quill_cloze" in json.loads(results.read_text())["results"]
