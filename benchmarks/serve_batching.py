"""Serving: continuous batching vs one request at a time and vs static batching, HTTP overhead, a load run.

    python -m benchmarks.serve_batching [--quick] [--stream-interval N] [--dtype bfloat16] [--compile]
                                        [--no-high-throughput]

One run, one machine: a random-weight model of the `cpu` preset (4 layers, 256 wide, 256-token context) behind
three apps on one local Ray Serve: `cb` (continuous batching, 16 slots), `off` (one sequence at a time) and
`static` (a batch runs to completion, like `@serve.batch`). Each replica has Ray's default of one CPU (so one
torch thread). Ray starts the way `python -m pipelines.serve` starts it: in Ray Serve's high-throughput mode
(HAProxy ingress straight to the replicas) unless --no-high-throughput. Prints one JSON line; `ours`/`baseline`
are generated tokens/s of 16 streaming clients against `cb` / `off`, counted by the clients (the streams' usage)
and by the replica (/stats).

The HTTP overhead compares a 1-token completion over HTTP with the same engine call (same model, prompt and
torch threads as a replica) measured first, in this process before Ray starts, so nothing else competes for
the CPU while it is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import ray
import torch
import yaml
from ray import serve
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model import GPT, Engine, GPTConfig, SamplingParams, save_pretrained
from pipelines.common.params import ServeParams
from pipelines.serve import AppArgs, app, ray_start_env
from pipelines.serve.engine_process import compile_settings

REPO = Path(__file__).resolve().parents[1]
REPLICA_CPUS = 1  # serve.num_cpus_per_replica of every app (Ray gives its torch that many threads)
TEXT = ["To be, or not to be, that is the question.", "All the world's a stage, and all the men and women players."]
PROMPT = "To be, or not to be"


def make_model(root: Path) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(
        TEXT * 3,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    (root / "tok").mkdir(parents=True)
    tok.save(str(root / "tok" / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("cpu", vocab_size=tok.get_vocab_size())
    return save_pretrained(GPT(cfg).eval(), root / "model", tokenizer_dir=root / "tok")


def params_file(root: Path, name: str, **serve) -> str:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["serve"].update(serve)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


async def stream_tokens(c: httpx.AsyncClient, prefix: str, max_tokens: int) -> tuple[int, float]:
    """(tokens, seconds) of one streaming completion; tokens from its usage (an event may hold several)."""
    t0, n = time.perf_counter(), 0
    body = {
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0.8,
    }
    async with c.stream("POST", f"{prefix}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith('data: {"') and '"usage"' in line:
                n = json.loads(line[6:])["usage"]["completion_tokens"]
    return n, time.perf_counter() - t0


async def throughput(c, prefix: str, clients: int, max_tokens: int) -> tuple[float, float]:
    """Generated tokens/s of concurrent streaming clients: (as the clients count, as the replica counts)."""
    before = (await c.get(f"{prefix}/stats")).json()["generated_tokens"]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(stream_tokens(c, prefix, max_tokens) for _ in range(clients)))
    dt = time.perf_counter() - t0
    after = (await c.get(f"{prefix}/stats")).json()["generated_tokens"]
    return sum(n for n, _ in results) / dt, (after - before) / dt


async def short_latency_mixed(c, prefix: str, pairs: int, long_tokens: int, rounds: int = 3) -> tuple[float, float]:
    """p50 latency of 8-token requests on the idle server and sent while as many long ones run: (idle, mixed).

    Each round times `pairs` short requests alone, then a mixed round, so that the machine's speed, which drifts
    over minutes on a shared VM, weighs on both alike."""

    async def short(delay):
        await asyncio.sleep(delay)
        return (await stream_tokens(c, prefix, 8))[1]

    idle: list[float] = []
    mixed: list[float] = []
    for _ in range(rounds):
        idle += [await short(0) for _ in range(pairs)]
        longs = [stream_tokens(c, prefix, long_tokens) for _ in range(pairs)]
        results = await asyncio.gather(*longs, *(short(0.05 + 0.02 * i) for i in range(pairs)))
        mixed += results[pairs:]
    return statistics.median(idle), statistics.median(mixed)


async def load(c, clients: int, total: int) -> int:
    errors, left = 0, total

    async def worker():
        nonlocal errors, left
        while left > 0:
            left -= 1
            r = await c.post("/cb/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
            errors += r.status_code != 200

    await asyncio.gather(*(worker() for _ in range(clients)))
    return errors


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def direct_one_token(folder: Path, threads: int, dtype: str, compile: bool, n: int = 200) -> list[float]:
    """Seconds per 1-token completion called on the engine directly, with a replica's torch threads, dtype and
    compilation (the warm-up calls compile)."""
    torch.set_num_threads(threads)
    engine = Engine.from_pretrained(folder, dtype=dtype, compile=compile)
    sp = SamplingParams(max_tokens=1, temperature=0)
    times = []
    with compile_settings() if compile else contextlib.nullcontext():  # as in the engine process
        for _ in range(20):
            engine.generate([PROMPT], sp)
        for _ in range(n):
            t0 = time.perf_counter()
            engine.generate([PROMPT], sp)
            times.append(time.perf_counter() - t0)
    return times


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller runs (a smoke test of the benchmark)")
    ap.add_argument("--stream-interval", type=int, default=1, help="serve.stream_interval of every app")
    ap.add_argument("--dtype", default="auto", help="serve.dtype of every app (auto: float32, as saved)")
    ap.add_argument("--compile", action="store_true", help="serve.compile of every app")
    ap.add_argument(
        "--no-high-throughput", action="store_true", help="serve.high_throughput: false (Ray's Python proxy)"
    )
    opts = ap.parse_args()
    quick = opts.quick
    long_tokens, load_total = (64, 200) if quick else (200, 2000)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = make_model(root)
        # before Ray starts: a quiet process
        direct = direct_one_token(folder, threads=REPLICA_CPUS, dtype=opts.dtype, compile=opts.compile)
        port = free_port()
        high_throughput = not opts.no_high_throughput
        os.environ.update(ray_start_env(ServeParams(high_throughput=high_throughput)))  # as the CLI starts Ray
        ray.init(
            address="local",  # never someone else's Ray on this machine
            num_cpus=6,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for name, kw, static in (
                ("cb", {"max_batch_size": 16}, False),
                ("off", {"max_batch_size": 1}, False),
                ("static", {"max_batch_size": 16}, True),
            ):
                kw.update(
                    num_cpus_per_replica=REPLICA_CPUS,
                    stream_interval=opts.stream_interval,
                    dtype=opts.dtype,
                    compile=opts.compile,
                )
                nowhere = f"sqlite:///{root / 'no-registry.db'}"  # no registry: no chat model beside the folder
                params = params_file(root, name, **kw)
                args = AppArgs(model=str(folder), params_file=params, static_batching=static, tracking_uri=nowhere)
                serve.run(app(args), name=name, route_prefix=f"/{name}")
            result = asyncio.run(measure(f"http://127.0.0.1:{port}", long_tokens, load_total, direct))
            result.update(
                stream_interval=opts.stream_interval,
                dtype=opts.dtype,
                compile=opts.compile,
                high_throughput=high_throughput,
            )
        finally:
            serve.shutdown()
            ray.shutdown()
    print(json.dumps(result))


async def measure(url: str, long_tokens: int, load_total: int, direct: list[float]) -> dict:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        for prefix in ("/cb", "/off", "/static"):  # warm-up: first requests pay for lazy initialisation
            await throughput(c, prefix, 2, 8)
        threads = (await c.get("/cb/stats")).json()["torch_threads"]
        ours, ours_server = await throughput(c, "/cb", 16, 64)
        baseline, baseline_server = await throughput(c, "/off", 16, 64)

        idle, mixed_cb = await short_latency_mixed(c, "/cb", 8, long_tokens)
        _, mixed_static = await short_latency_mixed(c, "/static", 8, long_tokens)

        http = []
        for _ in range(len(direct)):
            t0 = time.perf_counter()
            r = await c.post("/cb/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, "temperature": 0})
            http.append(time.perf_counter() - t0)
            r.raise_for_status()

        await load(c, 32, 200)  # warm-up for the memory baseline
        warm = (await c.get("/cb/stats")).json()
        t0 = time.perf_counter()
        errors = await load(c, 32, load_total)
        load_s = time.perf_counter() - t0
        after = (await c.get("/cb/stats")).json()
    ms = 1000
    return {
        "benchmark": "serve_batching",
        "ours": round(ours, 1),
        "baseline": round(baseline, 1),
        "unit": "generated tokens/s, 16 streaming clients (continuous batching vs one at a time)",
        "ratio": round(ours / baseline, 2),
        "server_tokens_per_s": round(ours_server, 1),
        "server_tokens_per_s_baseline": round(baseline_server, 1),
        "short_p50_idle_ms": round(idle * ms, 1),
        "short_p50_mixed_continuous_ms": round(mixed_cb * ms, 1),
        "short_p50_mixed_static_ms": round(mixed_static * ms, 1),
        "mixed_continuous_vs_idle": round(mixed_cb / idle, 2),
        "mixed_static_vs_idle": round(mixed_static / idle, 2),
        "long_max_tokens": long_tokens,
        "one_token_http_p50_ms": round(statistics.median(http) * ms, 2),
        "one_token_http_p99_ms": round(percentile(http, 0.99) * ms, 2),
        "one_token_direct_p50_ms": round(statistics.median(direct) * ms, 2),
        "one_token_direct_p99_ms": round(percentile(direct, 0.99) * ms, 2),
        "http_overhead_p50_ms": round((statistics.median(http) - statistics.median(direct)) * ms, 2),
        "http_overhead_p99_ms": round((percentile(http, 0.99) - percentile(direct, 0.99)) * ms, 2),
        "load_requests": load_total,
        "load_clients": 32,
        "load_errors": errors,
        "load_s": round(load_s, 1),
        "rss_warm_mb": round(warm["rss_bytes"] / 2**20, 1),
        "rss_after_mb": round(after["rss_bytes"] / 2**20, 1),
        "rss_drift": round(after["rss_bytes"] / warm["rss_bytes"] - 1, 3),
        "pss_warm_mb": round(warm["pss_bytes"] / 2**20, 1),  # shared pages counted once
        "pss_drift": round(after["pss_bytes"] / warm["pss_bytes"] - 1, 3),
        "machine": f"{os.cpu_count()} CPUs, {threads} torch thread(s) per replica, torch {torch.__version__}",
    }


if __name__ == "__main__":
    main()
