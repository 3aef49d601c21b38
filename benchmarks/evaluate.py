"""lm-eval loglikelihood throughput of our adapter: batched requests against the same adapter one request at a time.

Both sides answer the same few-shot multiple-choice requests (a context of a few lines, four candidate next
lines: what quill_nextline asks at 5 shots) through `QuillLM.loglikelihood`, with the same model, and must
give the same log-likelihoods. Ours batches eval.batch_size requests per forward pass (sorted by length;
the choices of one item share their context's forward pass); the baseline sets batch_size=1, which is how a
naive lm-eval model class scores. For reference, lm-eval's own Hugging Face model (`HFLM`) scores the same
requests on the same weights exported with save_pretrained, at batch size 1 and eval.batch_size: what a user
without quill's adapter would run.

Model: artifacts/model if it exists, else a randomly initialised params.yaml model (or `--preset NAME`)
over data/tokenizer (the speed does not depend on the weights). Requests: built from data/clean/test.jsonl if it exists, else
from synthetic text.

Run: python -m benchmarks.evaluate [--requests 64] [--repeats 2] [--preset cpu] [--no-hf]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_engine(preset: str | None = None):
    """(engine, description, Hugging Face folder holding the same weights)."""
    from model import GPT, Engine, GPTConfig, save_pretrained
    from pipelines.params import load_params

    if preset is None and (Path("artifacts/model") / "config.json").is_file():
        return Engine.from_pretrained("artifacts/model"), "artifacts/model", Path("artifacts/model")
    params = load_params()
    tokenizer = Path("data/tokenizer/tokenizer.json")
    if not tokenizer.is_file():
        tokenizer = synthetic_tokenizer()
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer)).get_vocab_size()
    torch.manual_seed(0)
    if preset is None:  # the CPU default of params.yaml
        config = params.model.config(vocab)
        name = f"random params.yaml model ({config.n_embd} wide)"
    else:
        config = GPTConfig.from_preset(preset, vocab_size=vocab)
        name = f"random {preset} preset"
    model = GPT(config).eval()
    folder = save_pretrained(model, Path(tempfile.mkdtemp(prefix="bench-eval-")) / "model", tokenizer_dir=Path(tokenizer).parent)
    return Engine(model, tokenizer), name, folder


def synthetic_tokenizer() -> Path:
    from pipelines.params import TokenizerParams
    from pipelines.tokenizer import save_tokenizer, train_tokenizer

    out = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    save_tokenizer(train_tokenizer(iter(synthetic_texts(200)), TokenizerParams(vocab_size=4096)), out)
    return out / "tokenizer.json"


def synthetic_texts(n: int) -> list[str]:
    from tests.conftest import make_document

    rng = random.Random(0)
    return [make_document(rng) for _ in range(n)]


def build_requests(n: int, block_size: int) -> list[tuple[str, str]]:
    """(context, continuation) pairs: ~block_size/4 words of context lines, four candidate lines each."""
    test = Path("data/clean/test.jsonl")
    texts = [json.loads(line)["text"] for line in open(test)] if test.is_file() else synthetic_texts(50)
    lines = [line.strip() for t in texts for line in t.splitlines() if len(line.split()) >= 4]
    rng = random.Random(0)
    out = []
    while len(out) < n:
        start = rng.randrange(max(1, len(lines) - 40))
        context, words = [], 0
        while words < block_size // 2 and start + len(context) < len(lines):
            context.append(lines[start + len(context)])
            words += len(context[-1].split())
        for _ in range(4):
            out.append(("\n".join(context), "\n" + rng.choice(lines)))
    return out[:n]


def main() -> int:
    from lm_eval.api.instance import Instance

    from pipelines.lm_eval_adapter import QuillLM
    from pipelines.params import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--preset", help="a random model of this preset instead of artifacts/model or params.yaml's")
    parser.add_argument("--no-hf", action="store_true", help="skip the lm-eval HFLM reference")
    args = parser.parse_args()

    engine, source, folder = build_engine(args.preset)
    batch_size = load_params().eval.batch_size
    pairs = build_requests(args.requests, engine.config.block_size)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]

    def timed(*lms) -> list[tuple[float, list]]:
        """(best seconds, results) per model; the models take turns, so load changes on this VM hit all of them."""
        best = [(float("inf"), None)] * len(lms)
        for _ in range(args.repeats):
            for k, lm in enumerate(lms):
                started = time.perf_counter()
                result = lm.loglikelihood(requests, disable_tqdm=True)
                best[k] = (min(best[k][0], time.perf_counter() - started), result)
        return best

    lms = [QuillLM(engine=engine, batch_size=batch_size), QuillLM(engine=engine, batch_size=1)]
    hf_sizes = [] if args.no_hf else [1, batch_size]
    lms += [hflm(folder, bs) for bs in hf_sizes]
    for lm in lms:
        lm.loglikelihood(requests[:8], disable_tqdm=True)  # warm-up
    (ours_s, ours), (base_s, base), *hf_runs = timed(*lms)
    worst = max(abs(a[0] - b[0]) for a, b in zip(ours, base))
    if worst > 1e-3:
        print(f"evaluate benchmark: batched and one-by-one log-likelihoods differ by {worst}", file=sys.stderr)
        return 1
    ours_rps, base_rps = len(requests) / ours_s, len(requests) / base_s
    n_tokens = sum(len(engine.encode(c + x)) for c, x in pairs)
    print(f"model: {source}; {len(requests)} requests, {n_tokens / len(requests):.0f} tokens each on average; "
          f"batched (batch_size={batch_size}) {ours_s:.2f} s, one by one {base_s:.2f} s; max |diff| {worst:.2e}",
          file=sys.stderr)
    hf = {bs: (seconds, max(abs(a[0] - b[0]) for a, b in zip(result, ours))) for bs, (seconds, result) in zip(hf_sizes, hf_runs)}
    for bs, (seconds, diff) in hf.items():
        print(f"lm-eval HFLM on the same weights, batch_size={bs}: {seconds:.2f} s ({seconds / ours_s:.2f}x our batched time); "
              f"max |diff| {diff:.2e}", file=sys.stderr)
    print(json.dumps({"benchmark": "evaluate", "ours": round(ours_rps, 2), "baseline": round(base_rps, 2),
                      "unit": "requests/s", "ratio": round(ours_rps / base_rps, 2), "batch_size": batch_size,
                      **{f"ratio_vs_hflm_batch{bs}": round(seconds / ours_s, 2) for bs, (seconds, _) in hf.items()},
                      "requests": len(requests), "threads": torch.get_num_threads(), "model": source}))
    return 0


def hflm(folder: Path, batch_size: int):
    """lm-eval's own Hugging Face model over the same weights (exported with save_pretrained)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), device="cpu", batch_size=batch_size)


if __name__ == "__main__":
    sys.exit(main())
