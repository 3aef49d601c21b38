"""LoRA against full fine-tuning: gradient + optimizer-state memory and training tokens/s, same base and batches.

Both sides fine-tune the same randomly initialised quill GPT of a preset (same seed, the preset's vocab size) on
the same synthetic ChatML conversations, encoded by model.chat.encode_chat through the finetune stage's own
pipelines/finetune/data.py (windows of at most --block-size tokens, assistant-only targets, the same padded
batches from ChatDataModule). Each side is the finetune stage's training path: `lora.wrap` with params.yaml's
finetune.lora (or the plain model for full), LitChat with AdamW from Optimization.of(finetune), the stage's
`lightning_trainer`; MLflow, checkpoints and export are left out (they are I/O, not training). Full fine-tuning
runs at a tenth of the learning rate, as README advises; that changes no timing or memory.

Memory is counted from the tensors, not sampled: the bytes of every trainable parameter's .grad (just before the
first optimizer step) plus AdamW's exp_avg / exp_avg_sq (after it). Each side runs in its own fresh process,
alternately, `--repeats` times; the best tokens/s of each is kept (the machine may be shared). The tokenizer is
a tiny byte-level BPE with the ChatML tokens, trained here; its ids use only the bottom of the preset's vocab.

    python -m benchmarks.finetune                   # cpu preset, ~1.5 minutes on 2 cores
    python -m benchmarks.finetune --preset 124m --steps 2 --repeats 1   # ~2.5 minutes on 2 cores (~16 s a step)

Ends with one JSON line: {"benchmark": "finetune", "ours": LoRA tokens/s, "baseline": full tokens/s, ...}.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model import GPT, GPTConfig
from model.chat import IM_END, IM_START, chat_markers, literal
from pipelines.common.params import load_params
from pipelines.common.training.lit import Optimization
from pipelines.common.training.trainer import lightning_trainer, precision_for
from pipelines.finetune import lora
from pipelines.finetune.data import ChatDataModule, encode_split, pad_id
from pipelines.finetune.lit_chat import LitChat

ROOT = Path(__file__).resolve().parents[1]
BATCH = {"cpu": 8, "124m": 2}  # default windows per step: 124m full fine-tuning is ~10 s a step at 2x256 on 2 cores
WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look"
).split()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", nargs="+", default=["cpu"], help="model presets, each measured in turn")
    ap.add_argument("--block-size", type=int, default=256, help="tokens per conversation window")
    ap.add_argument("--batch-size", type=int, default=None, help=f"windows per step (default: {BATCH})")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one repeat, 2 timed steps")
    ap.add_argument("--worker", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 1, 2
    return args


# --- shared setup (each worker rebuilds it identically) -------------------------------------------


def chat_tokenizer() -> Tokenizer:
    """A byte-level BPE (any text encodes) with <|endoftext|>, <|im_start|>, <|im_end|> at ids 0, 1, 2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    return tok


def conversations(n: int, seed: int = 0) -> list[dict]:
    """Synthetic chats: a system prompt, then user/assistant turns of random words (~20-60 words each)."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": text(5, 10)}]
        for _ in range(rng.randint(2, 5)):
            messages += [{"role": "user", "content": text(10, 30)}, {"role": "assistant", "content": text(20, 60)}]
        rows.append({"messages": messages})
    return rows


def build(args, method: str):
    """The LitChat of `method` over the preset's random-init GPT, its data module and the tokens of one batch."""
    f = load_params(ROOT / "params.yaml").finetune
    tok = literal(chat_tokenizer())
    windows = encode_split(tok, conversations(64), args.block_size).windows
    batch_size = args.batch_size or BATCH.get(args.preset[0], 4)
    dm = ChatDataModule(windows, windows[:batch_size], batch_size, 1, f.seed, pad_id(tok), 1)
    config = GPTConfig.from_preset(args.preset[0])
    pl.seed_everything(f.seed, workers=False, verbose=False)
    gpt = GPT(config)
    params = gpt.num_params()  # before wrap, which adds the adapters to gpt in place
    model = lora.wrap(gpt, f.lora, chat_markers(tok)) if method == "lora" else gpt
    opt = Optimization.of(f)
    if method == "full":
        opt = Optimization(**{**opt.__dict__, "lr": opt.lr / 10, "min_lr": opt.min_lr / 10})
    total = args.warmup + args.steps
    lit = LitChat(model, opt, total, wrapped=method == "lora")
    return lit, dm, params, f


class Meter(pl.Callback):
    """Step times (tokens of the padded batches), gradient bytes before the first step, AdamW state bytes after."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.grad_bytes = self.state_bytes = 0

    def on_train_start(self, trainer, pl_module):
        self.times.append(time.perf_counter())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.grad_bytes:
            trainable = [p for p in pl_module.parameters() if p.requires_grad]
            self.grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter())
        self.tokens.append(batch[0].numel())
        if not self.state_bytes:
            opt = trainer.optimizers[0]
            self.state_bytes = sum(
                t.numel() * t.element_size()
                for state in opt.state.values()
                for key, t in state.items()
                if key in ("exp_avg", "exp_avg_sq")
            )


def run_worker(args) -> dict:
    lit, dm, params, f = build(args, args.worker)
    meter = Meter()
    trainer = lightning_trainer(
        max_steps=args.warmup + args.steps,
        val_every=10**9,
        precision=precision_for("auto", "auto"),
        accelerator="auto",
        callbacks=[meter],
        enable_progress_bar=False,
        inference_mode=False,
    )
    trainer.fit(lit, datamodule=dm)
    w = args.warmup  # times[0] is the start; times[i] the end of step i
    seconds = meter.times[-1] - meter.times[w]
    return {
        "tokens_per_s": sum(meter.tokens[w:]) / seconds,
        "trainable_params": lit.trainable_params(),
        "params": params,
        "grad_bytes": meter.grad_bytes,
        "state_bytes": meter.state_bytes,
        "batch_shape": list(dm.train_dataloader().dataset.batch(0)[0].shape),
        "lora": f.lora.model_dump(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }


# --- driver -------------------------------------------------------------------------------------


def spawn(method: str, preset: str, args) -> dict:
    argv = [sys.executable, "-m", "benchmarks.finetune", "--worker", method, "--preset", preset]
    argv += ["--block-size", str(args.block_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.batch_size:
        argv += ["--batch-size", str(args.batch_size)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker {method} ({preset}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(preset: str, args) -> dict:
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for i in range(args.repeats):
        for method in ("lora", "full") if i % 2 == 0 else ("full", "lora"):
            r = spawn(method, preset, args)
            runs[method].append(r)
            print(f"  {preset:5s} {method:4s} run {i + 1}: {r['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    full, lo = (max(runs[m], key=lambda r: r["tokens_per_s"]) for m in ("full", "lora"))
    mem = {m: r["grad_bytes"] + r["state_bytes"] for m, r in (("full", full), ("lora", lo))}
    return {
        "lora_tokens_per_s": round(lo["tokens_per_s"], 1),
        "full_tokens_per_s": round(full["tokens_per_s"], 1),
        "speed_ratio": round(lo["tokens_per_s"] / full["tokens_per_s"], 4),
        "memory_ratio": round(mem["lora"] / mem["full"], 6),
        "lora_trainable_params": lo["trainable_params"],
        "full_trainable_params": full["trainable_params"],
        "lora_grad_optimizer_bytes": mem["lora"],
        "full_grad_optimizer_bytes": mem["full"],
        "params": full["params"],
        "batch_shape": full["batch_shape"],
        "lora": lo["lora"],
        "device": full["device"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        print(json.dumps(run_worker(args)))
        return 0

    results = {preset: measure(preset, args) for preset in args.preset}
    print(f"\n{'preset':7s}{'method':7s}{'trainable':>13s}{'grad+AdamW MB':>15s}{'tokens/s':>10s}", file=sys.stderr)
    for preset, r in results.items():
        for m in ("full", "lora"):
            mb = r[f"{m}_grad_optimizer_bytes"] / 2**20
            line = f"{preset:7s}{m:7s}{r[f'{m}_trainable_params']:>13,}{mb:>15.2f}{r[f'{m}_tokens_per_s']:>10,.0f}"
            print(line, file=sys.stderr)
        print(f"{preset:7s}{'ratio':7s}{'':13s}{r['memory_ratio']:>14.4f}x{r['speed_ratio']:>9.3f}x", file=sys.stderr)
    head = results[args.preset[0]]
    print(
        json.dumps(
            {
                "benchmark": "finetune",
                "ours": head["lora_tokens_per_s"],
                "baseline": head["full_tokens_per_s"],
                "unit": "tokens/s",
                "ratio": head["speed_ratio"],
                "memory_ratio": head["memory_ratio"],
                "preset": args.preset[0],
                "presets": results,
                "block_size": args.block_size,
                "steps": args.steps,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "baseline_name": "full fine-tuning (same stage path, base, batches)",
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
