"""Served sampling against served greedy, quill's engine in-process, and `transformers serve` as the peer.

    python -m benchmarks.serve               # about 3 minutes on 2 cores
    python -m benchmarks.serve --num-cpus 2  # serve.num_cpus_per_replica (torch threads of the replica's engine)
    python -m benchmarks.serve --quick       # smaller, for a smoke run
    python -m benchmarks.serve --two-models  # and the app with a second (chat) model: what its hop costs

One model folder for every endpoint: the model `make run` trains (params.yaml's `model` section and tokenizer
vocab), random init, exported with save_pretrained beside a word-level tokenizer (`w<id>` is token <id>, so a
prompt is the same tokens for both servers). One load for every endpoint: 16 clients (httpx, async) share 64
completions of a 32-token prompt, 64 new tokens each, non-streaming; greedy (temperature 0) or sampled
(temperature 0.8, top_p 0.95, each request its own seed). The endpoints, one at a time:

- quill's engine in-process: `Engine.generate` in batches of 16 (benchmarks/sampling.py's `engine_run`: one seed
  per batch), with the torch threads the replica's engine gets, timed first while nothing else runs.
- quill served, started as a user starts it: `python -m pipelines.serve --model <folder>` (its own local Ray and
  HAProxy ingress, in a scratch directory with a copy of params.yaml: a free serve.port, --num-cpus), with
  QUILL_API_KEY set; stopped with `python -m pipelines.serve shutdown`. Greedy and sampled rounds alternate.
- `transformers serve --continuous-batching` on the same folder (forced model, a free port, torch threads as the
  replica's). It cannot sample: under continuous batching its generation config is the first request's, for
  every request (temperature and top_p of later requests are ignored, `seed` only seeds the process once), so
  it runs greedy only. It has no ignore_eos: a `generation_config` without an eos_token_id turns EOS off there.

Per endpoint: tokens/s of the load (completion tokens from the responses' usage over the wall time; the best of
the rounds), p50 request latency under that load (the same round), and p50 idle latency of one 16-token
completion. The peer's rounds come after quill's (one endpoint at a time), so slow spells of a shared VM can
weigh on one side; served sampled/greedy is the median of back-to-back pairs.

With --two-models, then quill served with the same weights also as its chat model (`--chat-model`, a copy of the
folder under another name): greedy rounds answered by the base model (the ingress replica itself) alternate with
greedy rounds that name the second model (handed on through its deployment handle, one hop more).

Ends with one JSON line: {"benchmark": "serve", "ours": served sampled tok/s, "baseline": served greedy tok/s,
"ratio": sampled / greedy (target >= 0.8), "greedy_vs_peer": quill served greedy / peer greedy (target >= 1.5),
...}. benchmarks/serve_batching.py measures continuous against static batching, HTTP overhead and a load run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch
import transformers
import yaml

from benchmarks.generate import bench_config, word_tokenizer
from benchmarks.sampling import PROMPT_TOKENS, SAMPLED, engine_run
from model import GPT, Engine, save_pretrained
from pipelines.common.params import load_params

REPO = Path(__file__).resolve().parents[1]
CLIENTS, COMPLETIONS, NEW_TOKENS, IDLE_TOKENS = 16, 64, 64, 16
PEER = "transformers serve --continuous-batching"
SECOND = "model-chat"  # --two-models: the second model's folder, and so its served name
# the peer's body for a greedy request with EOS off: a generation_config given in the body replaces the model's
# (and with it eos_token_id; continuous batching then sets -1, disabled); max_tokens still applies
PEER_GREEDY = {"temperature": 0.0, "generation_config": json.dumps({"do_sample": False})}


def make_model(work: Path) -> tuple[Path, list[list[int]]]:
    """The Hugging Face folder every endpoint serves, and COMPLETIONS prompts of PROMPT_TOKENS token ids."""
    torch.manual_seed(0)
    cfg = bench_config("params")
    folder = save_pretrained(
        GPT(cfg).eval(), work / "model", tokenizer_dir=word_tokenizer(cfg.vocab_size, work / "tok")
    )
    g = torch.Generator().manual_seed(1)
    return folder, torch.randint(1, cfg.vocab_size, (COMPLETIONS, PROMPT_TOKENS), generator=g).tolist()


def text(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)  # word_tokenizer's vocabulary: w<id> is token <id>


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the endpoints ----------------------------------------------------------------------------------------------
def engine_inprocess(
    folder: Path, prompts: list[list[int]], new_tokens: int, threads: int, rounds: int, idle_n: int
) -> dict:
    """Engine.generate in batches of CLIENTS: per mode, the best round's tokens/s and its p50 batch time (every
    completion of a batch ends with it), the idle p50 of one IDLE_TOKENS completion, and the ratios per round."""
    torch.set_num_threads(threads)
    engine = Engine.from_pretrained(folder)
    batches = [prompts[i : i + CLIENTS] for i in range(0, len(prompts), CLIENTS)]
    for sampled in (False, True):  # warm-up
        engine_run(engine, batches[0], 8, sampled)
    runs: dict[str, list[tuple[float, list[float]]]] = {"greedy": [], "sampled": []}
    for r in range(rounds):
        for mode in ("greedy", "sampled")[:: 1 if r % 2 == 0 else -1]:
            times = [engine_run(engine, b, new_tokens, mode == "sampled") for b in batches]
            runs[mode].append((len(prompts) * new_tokens / sum(times), times))
    idle = {"greedy": [], "sampled": []}
    for _ in range(idle_n):
        for mode in idle:
            idle[mode].append(engine_run(engine, prompts[:1], IDLE_TOKENS, mode == "sampled"))
    return summarize(runs, idle)


@contextlib.contextmanager
def quill_served(folder: Path, work: Path, num_cpus: float, chat: Path | None = None) -> Iterator[tuple[str, dict]]:
    """`python -m pipelines.serve --model <folder> [--chat-model <chat>]` in a scratch directory (its params.yaml,
    its .quill/ state: its own local Ray, never the project's), yields (url, auth headers); `python -m
    pipelines.serve shutdown` after."""
    run = work / ("quill-serve-chat" if chat else "quill-serve")
    run.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["serve"].update(port=free_port(), num_cpus_per_replica=num_cpus)
    (run / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    key = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    env.update(QUILL_API_KEY=key, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{run / 'mlflow.db'}"  # none: no registered chat model joins in
    cli = [sys.executable, "-m", "pipelines.serve"]
    try:
        models = ["--model", str(folder), *(["--chat-model", str(chat)] if chat else [])]
        out = subprocess.run([*cli, *models], cwd=run, env=env, capture_output=True, text=True, timeout=600)
        lines = (out.stdout + out.stderr).strip().splitlines()
        url = next((m[1] for line in lines if (m := re.search(r" at (http://\S+)/v1$", line))), None)
        if out.returncode != 0 or url is None:
            raise RuntimeError(f"python -m pipelines.serve failed ({out.returncode}): {' | '.join(lines[-5:])}")
        yield url, {"Authorization": f"Bearer {key}"}
    finally:
        done = subprocess.run([*cli, "shutdown"], cwd=run, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            print(f"warning: python -m pipelines.serve shutdown failed: {done.stderr.strip()[-300:]}", flush=True)


@contextlib.contextmanager
def peer_served(folder: Path, work: Path, threads: int) -> Iterator[str]:
    """`transformers serve --continuous-batching <folder>` on a free port with `threads` torch threads; its url."""
    port = free_port()
    log = work / "peer.log"
    cmd = [str(Path(sys.executable).parent / "transformers"), "serve", "--continuous-batching", "--device", "cpu"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), str(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = " | ".join(log.read_text().strip().splitlines()[-5:])
                why = f"exited ({proc.returncode})" if proc.poll() is not None else "no /health answer in 300 s"
                raise RuntimeError(f"{PEER} on port {port}: {why}: {tail}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the clients ------------------------------------------------------------------------------------------------
async def complete(c: httpx.AsyncClient, body: dict) -> tuple[int, float]:
    """(completion tokens from usage, seconds) of one non-streaming completion."""
    t0 = time.perf_counter()
    r = await c.post("/v1/completions", json=body)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"/v1/completions answered {r.status_code}: {r.text[:200]}")
    return r.json()["usage"]["completion_tokens"], dt


async def load(c: httpx.AsyncClient, bodies: list[dict]) -> tuple[float, list[float], int]:
    """CLIENTS concurrent clients, each sending the next body while any are left: (tokens/s, request latencies,
    the fewest tokens a completion got)."""
    queue = list(reversed(bodies))
    results: list[tuple[int, float]] = []

    async def client():
        while queue:
            results.append(await complete(c, queue.pop()))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    dt = time.perf_counter() - t0
    return sum(n for n, _ in results) / dt, [s for _, s in results], min(n for n, _ in results)


def bodies(
    prompts: list[list[int]], new_tokens: int, mode: str, seed0: int, peer: bool, model: str | None = None
) -> list[dict]:
    """One request body per prompt (naming `model`, when given); sampled requests carry seeds seed0, seed0 + 1, ..."""
    out = []
    for i, p in enumerate(prompts):
        body = {"prompt": text(p), "max_tokens": new_tokens} | ({"model": model} if model else {})
        if peer:
            body |= PEER_GREEDY
        elif mode == "sampled":
            body |= {**SAMPLED, "seed": seed0 + i, "ignore_eos": True}
        else:
            body |= {"temperature": 0.0, "ignore_eos": True}
        out.append(body)
    return out


MODES = {"greedy": ("greedy", None), "sampled": ("sampled", None)}  # label: (sampling, the model a body names)


async def measure_served(
    url: str,
    headers: dict,
    prompts: list[list[int]],
    new_tokens: int,
    rounds: int,
    idle_n: int,
    peer: bool = False,
    modes: dict[str, tuple[str, str | None]] = MODES,
) -> tuple[dict, int]:
    """Rounds of the load per mode (greedy and sampled alternating, in turn forwards and backwards; the peer:
    greedy), then idle latencies; the summary, and the fewest tokens any completion got (all should have
    new_tokens)."""
    modes = {"greedy": MODES["greedy"]} if peer else modes
    limits = httpx.Limits(max_connections=CLIENTS * 2, max_keepalive_connections=CLIENTS * 2)

    def load_of(label: str, some: list[list[int]], n: int, seed0: int) -> list[dict]:
        sampling, model = modes[label]
        return bodies(some, n, sampling, seed0, peer, model)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as c:
        for label in modes:  # warm-up (the peer's first request also sets its generation config for all)
            await load(c, load_of(label, prompts[:CLIENTS], 8, 0))
        runs: dict[str, list] = {m: [] for m in modes}
        fewest = new_tokens
        for r in range(rounds):
            for label in list(modes)[:: 1 if r % 2 == 0 else -1]:
                tps, latencies, least = await load(c, load_of(label, prompts, new_tokens, r * len(prompts)))
                runs[label].append((tps, latencies))
                fewest = min(fewest, least)
        idle: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(idle_n):
            for label in modes:
                idle[label].append((await complete(c, load_of(label, prompts[i : i + 1], IDLE_TOKENS, i)[0]))[1])
    return summarize(runs, idle), fewest


def summarize(runs: dict[str, list[tuple[float, list[float]]]], idle: dict[str, list[float]]) -> dict:
    """Per mode: the best round's tokens/s and p50 latency, the idle p50; with two modes, the second's tokens/s over
    the first's (sampled/greedy) as the median of the rounds' own ratios (a round runs both back to back, so a slow
    spell hits both alike)."""
    out = {}
    for mode, rs in runs.items():
        tps, latencies = max(rs, key=lambda x: x[0])
        out[mode] = {
            "tokens_per_s": round(tps, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 1),
            "idle_p50_ms": round(statistics.median(idle[mode]) * 1000, 1),
        }
    if len(runs) == 2:
        first, second = runs.values()
        out["ratio"] = round(statistics.median(s[0] / g[0] for g, s in zip(first, second)), 2)
    return out


# -- the run ----------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer completions, tokens and rounds (a smoke run)")
    ap.add_argument(
        "--two-models", action="store_true", help="then the app with a second (chat) model: base vs second, greedy"
    )
    ap.add_argument(
        "--num-cpus",
        type=float,
        default=load_params(REPO / "params.yaml").serve.num_cpus_per_replica,
        help="serve.num_cpus_per_replica (default: params.yaml's); the engine's torch threads, in-process and peer",
    )
    args = ap.parse_args()
    completions, new_tokens, rounds, idle_n = (CLIENTS, 16, 1, 3) if args.quick else (COMPLETIONS, NEW_TOKENS, 5, 20)
    threads = max(1, int(args.num_cpus))  # what Ray gives the replica: OMP_NUM_THREADS = its whole CPUs

    start = time.perf_counter()

    def took(t0: float) -> str:
        return f"{time.perf_counter() - t0:.0f} s"

    with tempfile.TemporaryDirectory(prefix="quill-bench-serve-") as tmp:
        work = Path(tmp)
        folder, prompts = make_model(work)
        prompts = prompts[:completions]
        t0 = time.perf_counter()
        print(f"engine in-process ({threads} torch threads) ...", flush=True)
        engine = engine_inprocess(folder, prompts, new_tokens, threads, rounds, idle_n)
        print(f"  measured in {took(t0)}", flush=True)
        t0 = time.perf_counter()
        print(f"quill served (python -m pipelines.serve, num_cpus_per_replica {args.num_cpus:g}) ...", flush=True)
        with quill_served(folder, work, args.num_cpus) as (url, headers):
            print(f"  serving after {took(t0)}", flush=True)
            t0 = time.perf_counter()
            served, fewest = asyncio.run(measure_served(url, headers, prompts, new_tokens, rounds, idle_n))
            served_threads = httpx.get(f"{url}/stats", headers=headers, timeout=10).json().get("torch_threads")
            print(f"  measured in {took(t0)}", flush=True)
        t0 = time.perf_counter()
        print(f"{PEER} ({threads} torch threads) ...", flush=True)
        with peer_served(folder, work, threads) as url:
            print(f"  serving after {took(t0)}", flush=True)
            t0 = time.perf_counter()
            peer, peer_fewest = asyncio.run(measure_served(url, {}, prompts, new_tokens, rounds, idle_n, peer=True))
            print(f"  measured in {took(t0)} (its first request sets up continuous batching)", flush=True)
        two = None
        if args.two_models:
            second = shutil.copytree(folder, work / SECOND)  # the same weights, served under another name
            t0 = time.perf_counter()
            print(f"quill served, two models (--chat-model: the same weights as {SECOND!r}) ...", flush=True)
            with quill_served(folder, work, args.num_cpus, chat=second) as (url, headers):
                print(f"  serving after {took(t0)}", flush=True)
                t0 = time.perf_counter()
                modes = {"base": ("greedy", None), "second": ("greedy", SECOND)}
                two, fewest2 = asyncio.run(
                    measure_served(url, headers, prompts, new_tokens, rounds, idle_n, modes=modes)
                )
                fewest = min(fewest, fewest2)
                print(f"  measured in {took(t0)}", flush=True)

    greedy_vs_peer = round(served["greedy"]["tokens_per_s"] / peer["greedy"]["tokens_per_s"], 2)
    engine_vs_served = round(engine["greedy"]["tokens_per_s"] / served["greedy"]["tokens_per_s"], 2)
    rows = [
        ("quill served, greedy", served["greedy"]),
        ("quill served, sampled", served["sampled"]),
        ("quill engine in-process, greedy", engine["greedy"]),
        ("quill engine in-process, sampled", engine["sampled"]),
        (f"{PEER}, greedy", peer["greedy"]),
    ]
    print(
        f"\n{completions} completions of {new_tokens} tokens, {CLIENTS} clients (in-process: batches of {CLIENTS}); "
        f"sampled = temperature {SAMPLED['temperature']}, top_p {SAMPLED['top_p']}, a seed per request; "
        f"torch threads: replica {served_threads}, in-process and peer {threads}"
    )
    print(f"{'endpoint':48} {'tok/s':>8} {'p50 under load':>15} {'idle p50, 16 tok':>17}")
    for name, r in rows:
        print(f"{name:48} {r['tokens_per_s']:8.0f} {r['p50_ms']:12.1f} ms {r['idle_p50_ms']:14.1f} ms")
    print(
        f"{PEER + ', sampled':48} cannot sample: under continuous batching each request gets the first one's settings"
    )
    if two is not None:
        for name, r in (
            ("two models: base, greedy", two["base"]),
            ("two models: second, greedy (one hop)", two["second"]),
        ):
            print(f"{name:48} {r['tokens_per_s']:8.0f} {r['p50_ms']:12.1f} ms {r['idle_p50_ms']:14.1f} ms")
        print(
            f"two models: second / base {two['ratio']}; base in the two-model app / served alone "
            f"{two['base']['tokens_per_s'] / served['greedy']['tokens_per_s']:.2f}"
        )
    print(
        f"served sampled / greedy {served['ratio']} (target >= 0.8); in-process sampled / greedy {engine['ratio']}; "
        f"served greedy / peer greedy {greedy_vs_peer} (target >= 1.5); in-process greedy / served {engine_vs_served}"
    )
    print(f"{took(start)} in all")
    if served_threads != threads:
        print(
            f"note: the replica's engine runs {served_threads} torch threads, the in-process engine and peer {threads}"
        )
    if min(fewest, peer_fewest) < new_tokens:
        print(f"note: some completions ended early (fewest tokens: quill {fewest}, peer {peer_fewest})")

    endpoints = [("served", served), ("engine", engine), ("peer", peer), *([("two", two)] if two else [])]
    flat = {f"{e}_{m}_{k}": v for e, r in endpoints for m, x in r.items()
            if isinstance(x, dict) for k, v in x.items()}  # fmt: skip
    print(
        json.dumps(
            {
                "benchmark": "serve",
                "ours": served["sampled"]["tokens_per_s"],
                "baseline": served["greedy"]["tokens_per_s"],
                "unit": f"tokens/s, {CLIENTS} clients, quill served sampled vs greedy",
                "ratio": served["ratio"],
                "greedy_vs_peer": greedy_vs_peer,
                "engine_ratio": engine["ratio"],
                "engine_vs_served_greedy": engine_vs_served,
                "two_models_second_vs_base": two["ratio"] if two else None,
                **flat,
                "peer": f"{PEER} (greedy only), transformers {transformers.__version__}",
                "fewest_tokens": min(fewest, peer_fewest),
                "sampling": SAMPLED,
                "clients": CLIENTS,
                "completions": completions,
                "new_tokens": new_tokens,
                "idle_tokens": IDLE_TOKENS,
                "prompt_tokens": PROMPT_TOKENS,
                "rounds": rounds,
                "num_cpus_per_replica": args.num_cpus,
                "torch_threads_served": served_threads,
                "torch_threads_engine_and_peer": threads,
                "date": datetime.date.today().isoformat(),
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "quick": args.quick,
                "wall_s": round(time.perf_counter() - start),
            }
        )
    )


if __name__ == "__main__":
    main()
