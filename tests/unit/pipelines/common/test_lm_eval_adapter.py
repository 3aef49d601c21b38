"""The lm-eval adapter (pipelines/common/lm_eval_adapter.py): loglikelihood, loglikelihood_rolling and
generate_until against direct computations, and lm-eval's own command line running a quill model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from lm_eval.utils import get_rolling_token_windows

from model import GPT, Engine, GPTConfig
from model.scoring import rolling_loglikelihood
from pipelines.common.lm_eval_adapter import QuillLM
from pipelines.common.task_pack import build_task_pack
from tests.helpers.evaluation import read_split
from tests.helpers.paths import REPO


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


@pytest.mark.slow
def test_lm_eval_command_line_runs_a_quill_model(project, tmp_path):
    """`--model quill` from lm-eval's own CLI (which asks for device cuda by default) on a CPU-only machine."""
    build_task_pack(read_split(project, "test"), read_split(project, "val"), tmp_path / "tasks", max_items=5, seed=7)
    code = (
        "import sys, pipelines.common.lm_eval_adapter, lm_eval.__main__ as m; sys.argv[0] = 'lm_eval'; m.cli_evaluate()"
    )
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
