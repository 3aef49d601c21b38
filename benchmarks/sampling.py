"""Sampled decoding against greedy: the sort-free sampler (model/sampler.py) and the path it replaced, side by side.

The model `make run` trains (params.yaml's `model` section and tokenizer vocab), with random init, exported with
save_pretrained and loaded back as the server loads it; torch threads as the process has them. Two loads:

- `Engine.generate`, batch 16, 64 new tokens each (ignore_eos): greedy, then sampled (temperature 0.8, top_p 0.95,
  a seed) with the new sampler and with the old path (a full sort for top_p, then torch.multinomial).
- the continuous-batching `Scheduler` with 16 requests, each with its own seed (what the server runs): greedy, then
  sampled with the new sampler and with the old path (one multinomial per seeded row, each with its generator).

A random-init model's next-token distribution is nearly flat: top_p 0.95 keeps ~95 % of the vocabulary, so no
shortcut through a few top candidates would help (the sampler's cost does not depend on the nucleus' size). The old
path is kept here, as it was, to time it.

    python -m benchmarks.sampling            # ~40 s on 2 cores
    python -m benchmarks.sampling --quick    # smaller, for a smoke run

Ends with one JSON line: {"benchmark": "sampling", "ours": sampled tok/s, "baseline": greedy tok/s (each the best
of 15 runs), "ratio": sampled / greedy (the median of 15 back-to-back pairs; the lower of engine and scheduler;
target >= 0.8), ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

import model.engine
import model.scheduler
from benchmarks.generate import bench_config, word_tokenizer
from model import GPT, Engine, SamplingParams, Scheduler, save_pretrained
from model.sampler import SamplingRows, Uniforms

BATCH, NEW_TOKENS, PROMPT_TOKENS = 16, 64, 32
SAMPLED = dict(temperature=0.8, top_p=0.95)


# -- the path the sampler replaced (model/sampling.py's filter_logits and the multinomial draws, as they were) --------
def old_filter_logits(x: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    if params.top_k and params.top_k < x.size(-1):
        kth = x.topk(params.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        drop[:, 0] = False
        x = x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
    if params.min_p > 0.0:
        probs = x.softmax(dim=-1)
        x = x.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return x


def old_engine_sample(gen: torch.Generator) -> Callable:
    """Engine.generate's old draw: one multinomial over the batch from the request's generator."""

    def draw(x: torch.Tensor, rows: SamplingRows, uniforms: Uniforms) -> torch.Tensor:
        p = rows.params[0]
        probs = torch.softmax(old_filter_logits(x / p.temperature, p), dim=-1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)

    return draw


def old_scheduler_sample(gens: list[torch.Generator]) -> Callable:
    """The Scheduler's old draw for seeded rows sharing their controls: one distribution, a multinomial per row."""

    def draw(x: torch.Tensor, rows: SamplingRows, uniforms: Uniforms) -> torch.Tensor:
        p = rows.params[0]
        probs = torch.softmax(old_filter_logits(x / p.temperature, p), dim=-1)
        nxt = torch.empty(x.size(0), dtype=torch.long)
        for j in range(x.size(0)):
            nxt[j] = torch.multinomial(probs[j : j + 1], 1, generator=gens[j])[0, 0]
        return nxt

    return draw


# -- the loads ----------------------------------------------------------------------------------------------------
def engine_run(engine: Engine, prompts: list[list[int]], new_tokens: int, sampled: bool, old: bool = False) -> float:
    """Seconds for one Engine.generate of the batch."""
    params = SamplingParams(
        max_tokens=new_tokens, ignore_eos=True, **(dict(SAMPLED, seed=0) if sampled else dict(temperature=0.0))
    )
    old_path = mock.patch.object(model.engine, "sample", old_engine_sample(torch.Generator().manual_seed(0)))
    with old_path if old else contextlib.nullcontext():
        t0 = time.perf_counter()
        out = engine.generate(prompts, params)
        dt = time.perf_counter() - t0
    assert all(len(c.token_ids) == new_tokens for c in out)
    return dt


def scheduler_run(engine: Engine, prompts: list[list[int]], new_tokens: int, sampled: bool, old: bool = False) -> float:
    """Seconds for one request per prompt (each with its own seed when sampled) through one Scheduler, from the first
    add to the last token."""
    sched = Scheduler(engine, max_batch_size=BATCH)
    old_path = mock.patch.object(
        model.scheduler, "sample", old_scheduler_sample([torch.Generator().manual_seed(i) for i in range(len(prompts))])
    )
    with old_path if old else contextlib.nullcontext():
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            kw = dict(SAMPLED, seed=i) if sampled else dict(temperature=0.0)
            sched.add(p, SamplingParams(max_tokens=new_tokens, ignore_eos=True, **kw))
        tokens = 0
        while sched.has_work():
            tokens += len(sched.step())
        dt = time.perf_counter() - t0
    assert tokens == len(prompts) * new_tokens
    return dt


def measure(run: Callable, engine: Engine, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """tokens/s of greedy, sampled (new) and sampled (old): the best of `repeats` runs of each. The ratios are the
    medians of each repeat's own ratios: a repeat runs the three back to back (in turn forwards and backwards), so
    this VM's slow spells, which come and go over seconds, hit both sides of a ratio alike."""
    cases = {"greedy": dict(sampled=False), "sampled": dict(sampled=True), "sampled_old": dict(sampled=True, old=True)}
    for kw in cases.values():
        run(engine, prompts, new_tokens, **kw)  # warm-up
    times = {name: [] for name in cases}
    for i in range(repeats):
        for name in list(cases)[:: 1 if i % 2 == 0 else -1]:
            times[name].append(run(engine, prompts, new_tokens, **cases[name]))

    def ratio(a: str, b: str) -> float:  # tokens/s of a over b
        return round(statistics.median(tb / ta for ta, tb in zip(times[a], times[b])), 2)

    return {
        **{name: round(len(prompts) * new_tokens / min(t), 1) for name, t in times.items()},
        "ratio": ratio("sampled", "greedy"),
        "ratio_old": ratio("sampled_old", "greedy"),
        "new_vs_old": ratio("sampled", "sampled_old"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    args = ap.parse_args()
    new_tokens, repeats = (16, 1) if args.quick else (NEW_TOKENS, 15)  # this VM's timings jitter

    torch.manual_seed(0)
    cfg = bench_config("params")
    work = Path(tempfile.mkdtemp(prefix="quill-bench-"))
    folder = save_pretrained(
        GPT(cfg).eval(), work / "model", tokenizer_dir=word_tokenizer(cfg.vocab_size, work / "tok")
    )
    engine = Engine.from_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, cfg.vocab_size, (BATCH, PROMPT_TOKENS), generator=g).tolist()

    results = {}
    for name, run in (("engine", engine_run), ("scheduler", scheduler_run)):
        results[name] = r = measure(run, engine, prompts, new_tokens, repeats)
        print(
            f"{name}: greedy {r['greedy']} tok/s, sampled {r['sampled']} tok/s (ratio {r['ratio']}), "
            f"old sampled path {r['sampled_old']} tok/s (ratio {r['ratio_old']}); new/old {r['new_vs_old']}x",
            flush=True,
        )
    worst = min(results, key=lambda k: results[k]["ratio"])
    print(
        json.dumps(
            {
                "benchmark": "sampling",
                "ours": results[worst]["sampled"],
                "baseline": results[worst]["greedy"],
                "unit": "tokens/s",
                "ratio": results[worst]["ratio"],
                "headline": worst,
                **{f"{k}_{name}": v for name, r in results.items() for k, v in r.items()},
                "sampling": SAMPLED,
                "batch": BATCH,
                "new_tokens": new_tokens,
                "prompt_tokens": PROMPT_TOKENS,
                "vocab_size": cfg.vocab_size,
                "n_embd": cfg.n_embd,
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
