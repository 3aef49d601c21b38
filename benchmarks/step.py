"""Training step speed: forward+backward of our GPT against transformers' LlamaForCausalLM of the same
configuration, on the same batch, with the same weights (ours exported through save_pretrained).

CPU float32 always; when a GPU is available, also bf16 autocast on the GPU.

    python -m benchmarks.step            # ~1-2 minutes on 2 cores
    python -m benchmarks.step --quick

Ends with one JSON line: {"benchmark": "step", "ours": ms, "baseline": ms, "unit": "ms/step", "ratio": baseline/ours, ...}.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from model import GPT, GPTConfig, save_pretrained


def step_time(model, idx, targets, repeats: int, device, amp: bool) -> float:
    """Best wall time (s) of forward + backward, gradients zeroed each step."""

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(idx, targets) if isinstance(model, GPT) else model(input_ids=idx, labels=targets)
            loss = out[1] if isinstance(model, GPT) else out.loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def compare(cfg: GPTConfig, batch: int, seq: int, repeats: int, device: torch.device, amp: bool) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = GPT(cfg)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, f"{d}/m")
        hf = AutoModelForCausalLM.from_pretrained(f"{d}/m", attn_implementation="sdpa")
    ours.to(device).train()
    hf.to(device).train()
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    idx, targets = data[:, :-1], data[:, 1:]
    # HF shifts labels itself: pass the unshifted sequence so both compute the same loss
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        ours_loss = ours(idx, targets)[1].item()
        hf_loss = hf(input_ids=data, labels=data).loss.item()
    t_ours, t_hf = [], []
    for _ in range(2):  # interleave
        t_ours.append(step_time(ours, idx, targets, repeats, device, amp))
        t_hf.append(step_time(hf, data, data, repeats, device, amp))
    o, h = min(t_ours) * 1e3, min(t_hf) * 1e3
    return {
        "ours": round(o, 2),
        "baseline": round(h, 2),
        "ratio": round(h / o, 2),
        "same_loss": abs(ours_loss - hf_loss) < 1e-2 * max(1.0, abs(hf_loss)),
        "tokens_per_s_ours": round(batch * seq / (o / 1e3)),
        "batch": batch,
        "seq": seq,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    cfg = GPTConfig.from_preset("cpu")
    batch, seq, repeats = (4, 128, 2) if args.quick else (8, 256, 4)
    cpu = compare(cfg, batch, seq, repeats, torch.device("cpu"), amp=False)
    print(
        f"CPU fp32, preset cpu, batch {batch}x{seq}: ours {cpu['ours']} ms, LlamaForCausalLM {cpu['baseline']} ms, ratio {cpu['ratio']}x",
        flush=True,
    )
    result = {
        "benchmark": "step",
        "ours": cpu["ours"],
        "baseline": cpu["baseline"],
        "unit": "ms/step (fwd+bwd)",
        "ratio": cpu["ratio"],
        "device": "cpu",
        "dtype": "float32",
        "preset": "cpu",
        "batch": batch,
        "seq": seq,
        "same_loss": cpu["same_loss"],
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "quick": args.quick,
    }
    if torch.cuda.is_available():
        gcfg = GPTConfig.from_preset("124m")
        gpu = compare(gcfg, 8, 1024, 10, torch.device("cuda"), amp=True)
        print(
            f"GPU bf16, preset 124m, batch 8x1024: ours {gpu['ours']} ms, LlamaForCausalLM {gpu['baseline']} ms, ratio {gpu['ratio']}x",
            flush=True,
        )
        result.update(
            {
                "gpu": torch.cuda.get_device_name(),
                "gpu_ours": gpu["ours"],
                "gpu_baseline": gpu["baseline"],
                "gpu_ratio": gpu["ratio"],
                "gpu_preset": "124m",
                "gpu_dtype": "bfloat16",
                "gpu_same_loss": gpu["same_loss"],
            }
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
