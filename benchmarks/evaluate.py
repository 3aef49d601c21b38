"""lm-eval loglikelihood throughput of our adapter: batched against the same adapter one request at a time.

The requests are exactly those the evaluate stage sends with params.yaml's `eval` settings: the task pack is
built from the clean test and validation splits, and every loglikelihood request lm-eval makes for
`eval.tasks` at each `eval.num_fewshot` is recorded (token ids included), then scored through
`QuillLM._loglikelihood_tokens` with the same model, and the results must agree. Ours batches
eval.batch_size requests per forward pass (sorted by length; the choices of one item share their context's
forward pass); the baseline sets batch_size=1, which is how a naive lm-eval model class scores. For
reference, lm-eval's own Hugging Face model (`HFLM`) scores the same token ids on the same weights exported
with save_pretrained, at batch size 1 and eval.batch_size: what a user without quill's adapter would run.
The scorers take turns each repeat, so this VM's load swings hit all of them.

Model: artifacts/model if it exists, else a randomly initialised params.yaml model (or `--preset NAME`)
over data/tokenizer (the speed does not depend on the weights). Texts: data/clean/{test,val}.jsonl if they
exist, else synthetic text.

Run: python -m benchmarks.evaluate [--repeats 3] [--max-items 200] [--preset cpu] [--no-hf]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


def build_engine(preset: str | None = None):
    """(engine, description, Hugging Face folder holding the same weights)."""
    from model import GPT, Engine, GPTConfig, save_pretrained
    from pipelines.common.params import load_params

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
    folder = save_pretrained(
        model, Path(tempfile.mkdtemp(prefix="bench-eval-")) / "model", tokenizer_dir=Path(tokenizer).parent
    )
    return Engine(model, tokenizer), name, folder


def synthetic_tokenizer() -> Path:
    from pipelines.common.params import TokenizerParams
    from pipelines.tokenize.stage import save_tokenizer, train_tokenizer

    out = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    save_tokenizer(train_tokenizer(iter(synthetic_texts(200)), TokenizerParams(vocab_size=4096)), out)
    return out / "tokenizer.json"


def synthetic_texts(n: int) -> list[str]:
    from tests.conftest import make_document

    rng = random.Random(0)
    return [make_document(rng) for _ in range(n)]


def record_requests(engine, params, max_items: int) -> dict[str, list]:
    """{"<task>:<k>shot": lm-eval's loglikelihood requests ((context, continuation), context ids, continuation ids)}
    for the pack the evaluate stage builds, at each eval.num_fewshot."""
    import contextlib
    import io

    from pipelines.common.benchmarks import run_lm_eval
    from pipelines.common.clean_split import read_texts
    from pipelines.common.lm_eval_adapter import QuillLM
    from pipelines.common.task_pack import build_task_pack

    clean = Path("data/clean")
    if (clean / "test.jsonl").is_file() and (clean / "val.jsonl").is_file():
        test, val = read_texts(clean / "test.jsonl"), read_texts(clean / "val.jsonl")
    else:
        texts = synthetic_texts(60)
        test, val = texts[:50], texts[50:]
    work = Path(tempfile.mkdtemp(prefix="bench-eval-pack-"))
    build_task_pack(test, val, work / "tasks", max_items, params.seed)
    recorded: dict[str, list] = {}

    class Recorder(QuillLM):
        key = ""

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            recorded.setdefault(self.key, []).extend(requests)
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [0.0] * len(requests)

    lm = Recorder(engine=engine, batch_size=params.batch_size)
    tasks = [t for t in params.tasks if t != "quill_perplexity"]  # rolling perplexity is not loglikelihood
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        for task in tasks:
            for k in params.num_fewshot:
                lm.key = f"{task}:{k}shot"
                run_lm_eval(lm, [task], [k], work / "tasks", params.limit, params.seed, work / "results")
    return recorded


def main() -> int:
    from pipelines.common.lm_eval_adapter import QuillLM
    from pipelines.common.params import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-items", type=int, help="items per pack task (default: eval.max_items)")
    parser.add_argument("--preset", help="a random model of this preset instead of artifacts/model or params.yaml's")
    parser.add_argument("--no-hf", action="store_true", help="skip the lm-eval HFLM reference")
    args = parser.parse_args()

    params = load_params().eval
    engine, source, folder = build_engine(args.preset)
    recorded = record_requests(engine, params, args.max_items or params.max_items)
    requests = [r for rs in recorded.values() for r in rs]
    names = ["ours (batched)", "ours (one by one)"] + (
        [] if args.no_hf else ["HFLM batch 1", f"HFLM batch {params.batch_size}"]
    )
    lms = [QuillLM(engine=engine, batch_size=params.batch_size), QuillLM(engine=engine, batch_size=1)]
    lms += [] if args.no_hf else [hflm(folder, 1), hflm(folder, params.batch_size)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation notice (the stage logs it)
        for lm in lms:
            lm._loglikelihood_tokens(requests[:8], disable_tqdm=True)  # warm-up
        seconds = {name: float("inf") for name in names}
        results = {}
        for _ in range(args.repeats):
            for name, lm in zip(names, lms):
                started = time.perf_counter()
                results[name] = lm._loglikelihood_tokens(requests, disable_tqdm=True)
                seconds[name] = min(seconds[name], time.perf_counter() - started)
    ours = results["ours (batched)"]
    for name in names[1:]:
        worst = max(abs(a[0] - b[0]) for a, b in zip(results[name], ours))
        if worst > 1e-3:
            print(f"evaluate benchmark: {name} and ours (batched) log-likelihoods differ by {worst}", file=sys.stderr)
            return 1
    tokens = sum(len(c) + len(x) for _, c, x in requests) / len(requests)
    print(
        f"model: {source}; {len(requests)} requests ({', '.join(f'{k} {len(v)}' for k, v in recorded.items())}), "
        f"{tokens:.0f} tokens each on average before truncation",
        file=sys.stderr,
    )
    for name in names:
        print(
            f"  {name}: {seconds[name]:.2f} s ({seconds[name] / seconds[names[0]]:.2f}x ours batched)", file=sys.stderr
        )
    ours_rps, base_rps = len(requests) / seconds[names[0]], len(requests) / seconds[names[1]]
    print(
        json.dumps(
            {
                "benchmark": "evaluate",
                "ours": round(ours_rps, 2),
                "baseline": round(base_rps, 2),
                "unit": "requests/s",
                "ratio": round(ours_rps / base_rps, 2),
                "batch_size": params.batch_size,
                **{
                    f"ratio_vs_hflm_batch{bs}": round(seconds[n] / seconds[names[0]], 2)
                    for bs, n in zip([1, params.batch_size], names[2:])
                },
                "num_fewshot": params.num_fewshot,
                "requests": len(requests),
                "threads": torch.get_num_threads(),
                "model": source,
            }
        )
    )
    return 0


def hflm(folder: Path, batch_size: int):
    """lm-eval's own Hugging Face model over the same weights (exported with save_pretrained)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), device="cpu", batch_size=batch_size)


if __name__ == "__main__":
    sys.exit(main())
