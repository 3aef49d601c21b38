"""Training throughput of our Lightning stage against a plain PyTorch loop: same model, batch, precision, data.

Both sides train the same GPT (same seed, same init) on the same windows of the same synthetic token
shards (TrainWindows), with the same AdamW groups, learning-rate schedule, gradient clipping and
accumulation. "Ours" is pipelines.train.stage's Trainer (built by the same `build_trainer`) with the
LightningModule, NaN check and TrainLog callback; MLflow and checkpoint writes are off (they are
I/O, not training). Each side runs in its own fresh process, alternately, `--repeats` times; the best
tokens/s of each is kept (the machine is shared). Peak memory is the training loop's: CUDA's
max_memory_allocated on a GPU, the growth of resident memory over the loop on a CPU.

    python -m benchmarks.train                               # CPU default, ~2-3 minutes on 2 cores
    python -m benchmarks.train --preset 124m --block-size 1024 --batch-size 16 --precision bf16-mixed \\
        --compile --compare-eager --steps 50                 # one H100: MFU, compiled vs eager

Ends with one JSON line: {"benchmark": "train", "ours": ..., "baseline": ..., "unit": "tokens/s", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--block-size", type=int, default=None, help="context length (default: the preset's)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator warm-up)")
    ap.add_argument("--precision", default="auto", choices=["auto", "32", "bf16-mixed", "16-mixed"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compare-eager", action="store_true", help="with --compile: also time ours uncompiled")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# --- shared setup -------------------------------------------------------------------------------


def write_shards(directory: Path, vocab_size: int, n_tokens: int = 2_000_000) -> None:
    rng = np.random.default_rng(0)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    for split, n in (("train", n_tokens), ("val", n_tokens // 10)):
        rng.integers(0, vocab_size, size=n, dtype=dtype).tofile(directory / f"{split}.bin")
    meta = {
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab_size,
        "tokenizer_sha256": "synthetic",
        "splits": {
            s: {"tokens": n, "docs": 1, "bytes": 3 * n} for s, n in (("train", n_tokens), ("val", n_tokens // 10))
        },
    }
    (directory / "meta.json").write_text(json.dumps(meta))


def setup(args):
    import torch

    from model import GPTConfig
    from pipelines.common.params import TrainParams
    from pipelines.train.data import TokenData
    from pipelines.train.stage import resolve_precision, uses_cuda

    data = TokenData.open(args.data)
    overrides = {"vocab_size": data.vocab_size}
    if args.block_size:
        overrides["block_size"] = args.block_size
    config = GPTConfig.from_preset(args.preset, **overrides)
    total = args.warmup + args.steps
    t = TrainParams(
        max_steps=total,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_steps=2,
        precision=args.precision,
        compile=args.compile,
        val_every=10**9,
        log_every=10,
        checkpoint_every=10**9,
        devices=1,
    )
    cuda = uses_cuda(t.accelerator)
    precision = resolve_precision(t.precision, cuda, cuda and torch.cuda.is_bf16_supported())
    if cuda:
        torch.set_float32_matmul_precision("high")
    device = torch.device("cuda" if cuda else "cpu")
    return data, config, t, precision, device


class Memory:
    """Peak training memory: CUDA's allocator peak, or the growth of resident memory (sampled) on a CPU."""

    def __init__(self, device):
        self.device, self.peak_rss, self.base = device, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        self.base = self.peak_rss = self.rss()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_rss = max(self.peak_rss, self.rss())

    def stop(self) -> float:
        """Peak in MB."""
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        self._stop.set()
        return (max(self.peak_rss, self.rss()) - self.base) / 2**20


def run_ours(args) -> dict:
    import pytorch_lightning as pl
    import torch

    from pipelines.train.data import TokenDataModule
    from pipelines.train.lit_gpt import LitGPT
    from pipelines.train.log import TrainLog
    from pipelines.train.stage import build_trainer

    data, config, t, precision, device = setup(args)
    memory = Memory(device)
    times: list[float] = []

    class Clock(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            memory.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % t.grad_accum == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter())

    pl.seed_everything(t.seed, verbose=False)
    lit = LitGPT(config, t, t.max_steps, data.bytes_per_text_token("val"))
    tokens_per_step = t.batch_size * t.grad_accum * config.block_size
    log = TrainLog(tokens_per_step, lit.model.flops_per_token(config.block_size), t.log_every, 3.0, precision)
    trainer = build_trainer(t, precision, callbacks=[log, Clock()], enable_progress_bar=False)
    dm = TokenDataModule(data, config.block_size, t.batch_size, t.grad_accum, t.seed, t.val_batches)
    trainer.fit(lit, datamodule=dm)
    return result(args, times, tokens_per_step, memory.stop(), lit.model, precision, device)


def run_baseline(args) -> dict:
    """nanoGPT-style loop: the same model, optimizer, schedule, clipping, precision and data."""
    import pytorch_lightning as pl  # imported (not used) so both processes carry the same libraries
    import torch

    from model import GPT
    from pipelines.train.data import TrainWindows
    from pipelines.train.lit_gpt import lr_at, param_groups

    data, config, t, precision, device = setup(args)
    memory = Memory(device)
    pl.seed_everything(t.seed, verbose=False)
    model = GPT(config).to(device)
    if t.compile:
        model.compile()
    optimizer = torch.optim.AdamW(
        param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), fused=(device.type == "cuda") or None
    )
    autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    stream = iter(TrainWindows(data.tokens("train"), config.block_size, t.batch_size, t.grad_accum, t.seed, 0))
    times: list[float] = []
    model.train()
    memory.start()
    for step in range(t.max_steps):
        for _ in range(t.grad_accum):
            batch = next(stream).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                _, loss = model(batch[:, :-1], batch[:, 1:])
            scaler.scale(loss / t.grad_accum).backward()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if step % t.log_every == 0:
            loss.item()  # a plain loop logs now and then
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return result(args, times, t.batch_size * t.grad_accum * config.block_size, memory.stop(), model, precision, device)


def result(args, times, tokens_per_step, peak_mb, model, precision, device) -> dict:
    from pipelines.train.log import peak_flops

    timed = times[args.warmup - 1 :] if args.warmup else times
    seconds = timed[-1] - timed[0]
    tokens_per_s = (len(timed) - 1) * tokens_per_step / seconds
    peak = peak_flops(device, precision)
    flops = model.flops_per_token(model.config.block_size)
    return {
        "tokens_per_s": tokens_per_s,
        "peak_mem_mb": peak_mb,
        "precision": precision,
        "mfu": tokens_per_s * flops / peak if peak else None,
        "device": __import__("torch").cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "params": model.num_params(),
    }


# --- driver -------------------------------------------------------------------------------------


def spawn(worker: str, args: argparse.Namespace, data_dir: str, compile_: bool) -> dict:
    argv = [
        sys.executable,
        "-m",
        "benchmarks.train",
        "--worker",
        worker,
        "--data",
        data_dir,
        "--preset",
        args.preset,
        "--vocab-size",
        str(args.vocab_size),
        "--batch-size",
        str(args.batch_size),
        "--grad-accum",
        str(args.grad_accum),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--precision",
        args.precision,
    ]
    if args.block_size:
        argv += ["--block-size", str(args.block_size)]
    if compile_:
        argv.append("--compile")
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker {worker} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best(results: list[dict]) -> dict:
    top = max(results, key=lambda r: r["tokens_per_s"])
    return {**top, "peak_mem_mb": min(r["peak_mem_mb"] for r in results)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        import logging

        logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
        out = run_ours(args) if args.worker == "ours" else run_baseline(args)
        print(json.dumps(out))
        return 0

    with tempfile.TemporaryDirectory(prefix="quill-bench-") as data_dir:
        write_shards(Path(data_dir), args.vocab_size)
        runs: dict[str, list[dict]] = {"ours": [], "baseline": [], "eager": []}
        for i in range(args.repeats):
            order = ("ours", "baseline") if i % 2 == 0 else ("baseline", "ours")
            for worker in order:
                r = spawn(worker, args, data_dir, args.compile)
                runs[worker].append(r)
                print(
                    f"  {worker:8s} run {i + 1}: {r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_mem_mb']:.0f} MB",
                    file=sys.stderr,
                )
            if args.compile and args.compare_eager:
                r = spawn("ours", args, data_dir, False)
                runs["eager"].append(r)
                print(f"  eager    run {i + 1}: {r['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    ours, base = best(runs["ours"]), best(runs["baseline"])
    line = {
        "benchmark": "train",
        "ours": round(ours["tokens_per_s"], 1),
        "baseline": round(base["tokens_per_s"], 1),
        "unit": "tokens/s",
        "ratio": round(ours["tokens_per_s"] / base["tokens_per_s"], 4),
        "peak_mem_ratio": round(ours["peak_mem_mb"] / base["peak_mem_mb"], 4) if base["peak_mem_mb"] > 0 else None,
        "ours_peak_mem_mb": round(ours["peak_mem_mb"], 1),
        "baseline_peak_mem_mb": round(base["peak_mem_mb"], 1),
        "mfu": ours["mfu"] and round(ours["mfu"], 4),
        "baseline_mfu": base["mfu"] and round(base["mfu"], 4),
        "preset": args.preset,
        "params": ours["params"],
        "block_size": args.block_size or "preset",
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "precision": ours["precision"],
        "compile": args.compile,
        "steps": args.steps,
        "repeats": args.repeats,
        "device": ours["device"],
        "baseline_name": "plain PyTorch loop (same model, AdamW, schedule, clipping, data)",
    }
    if runs["eager"]:
        eager = best(runs["eager"])
        line["eager"] = round(eager["tokens_per_s"], 1)
        line["compile_speedup"] = round(ours["tokens_per_s"] / eager["tokens_per_s"], 4)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
