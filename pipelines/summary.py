"""What the last pipeline run made, in a dozen lines: the end of `make run`, and each stage's line in a flow run.

Reads the DVC metrics files (metrics/{clean,tokenize,train,eval}.json, and the fine-tuning stages' chat,
finetune and chat_eval) and artifacts/{registered,chat_registered}.json;
a stage that has not run yet shows as such; the train_and_deploy flow ends each stage's task with that stage's
line (`headline`). `dvc metrics show` prints the same numbers as one row per file with a column per metric,
too wide for a terminal; `dvc metrics diff` stays the tool to compare runs.

    python -m pipelines.summary [--root .]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipelines.common.layout import PROJECT
from pipelines.common.report import fmt_value


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise SystemExit(f"summary: {path} is not valid JSON ({e}); rerun its stage with `dvc repro`") from e


def _millions(n: float) -> str:
    return f"{n / 1e6:.2f}M"


NOT_RUN = "not run yet (dvc repro)"


def summary_rows(root: Path) -> list[tuple[str, str]]:
    """(stage, one line about it) for every stage of the pipeline, in order."""
    layout = PROJECT.under(root)
    clean = _read(layout.clean_metrics)
    tok = _read(layout.tokenize_metrics)
    train = _read(layout.train_metrics)
    ev = _read(layout.eval_metrics)
    reg = _read(layout.registered)
    rows = []
    if clean:
        dropped = sum(clean.get("dropped", {}).values()) + clean.get("quarantined", 0)
        rows.append(
            (
                "clean",
                f"{clean['docs_out']} of {clean['docs_in']} documents kept ({clean['exact_duplicates']} exact and "
                f"{clean['near_duplicates']} near duplicates, {dropped} dropped or quarantined)",
            )
        )
    if tok:
        tokens = tok["tokens"]
        rows.append(
            (
                "tokenize",
                f"vocab {tok['vocab_size']}, {tok['bytes_per_token']:.2f} bytes/token; tokens train "
                f"{_millions(tokens['train'])}, val {_millions(tokens['val'])}, test {_millions(tokens['test'])}",
            )
        )
    if train:
        resumed = f", resumed from step {train['resumed_from_step']}" if train.get("resumed_from_step") else ""
        mfu = f", MFU {train['mfu']:.0%}" if train.get("mfu") is not None else ""
        rows.append(
            (
                "train",
                f"{_millions(train['params'])} params, {train['steps']} steps, {_millions(train['tokens_seen'])} tokens "
                f"at {train['tokens_per_s']:,.0f} tok/s{mfu}{resumed}; val_bpb {train['val_bpb']:.3f}",
            )
        )
    if ev:
        ref = ev.get("reference", {})
        refs = ", ".join(
            f"{name} {ref[key]:.3f}"
            for name, key in (("byte n-gram", "ngram_bpb"), ("uniform", "uniform_bpb"))
            if key in ref
        )
        rows.append(
            (
                "evaluate",
                f"test_bpb {ev['test_bpb']:.3f}"
                + (f" (reference: {refs})" if refs else "")
                + f", perplexity {ev['test_ppl']:.1f}",
            )
        )
        for task, by_shot in ev.items():
            if isinstance(by_shot, dict) and task != "reference" and all(isinstance(v, dict) for v in by_shot.values()):
                scores = "; ".join(
                    f"{shot}: " + ", ".join(f"{k} {fmt_value(v)}" for k, v in vals.items())
                    for shot, vals in by_shot.items()
                )
                rows.append(("", f"{task}  {scores}"))
        if "samples" in ev:
            s = ev["samples"]
            rows.append(
                (
                    "",
                    f"{s['count']} samples against their true continuation: BLEU {s['bleu']:.1f}, ROUGE-L {s['rougeL']:.3f}",
                )
            )
    if reg:
        rows.append(("register", f"{reg['model_name']} v{reg['version']} -> {', '.join(reg['aliases'])}: {reg['why']}"))
    for stage, present in (("clean", clean), ("tokenize", tok), ("train", train), ("evaluate", ev), ("register", reg)):
        if present is None:
            rows.append((stage, NOT_RUN))
    return rows + chat_rows(layout)


def chat_rows(layout) -> list[tuple[str, str]]:
    """The fine-tuning stages' lines, once chat_data has run (a project without a finetune section has none)."""
    chat = _read(layout.chat_metrics)
    if chat is None:
        return []
    ft, ev, reg = _read(layout.finetune_metrics), _read(layout.chat_eval_metrics), _read(layout.chat_registered)
    rows = [("chat_data", f"{chat['conversations_out']} of {chat['conversations_in']} conversations kept")]
    if ft:
        trainable = f" ({_millions(ft['trainable_params'])} trainable)" if "trainable_params" in ft else ""
        method = (_read(layout.chat_model / "quill_run.json") or {}).get("method", "?")
        rows.append(
            (
                "finetune",
                f"{method}{trainable}, {ft['steps']} steps at {ft.get('tokens_per_s', 0):,.0f} tok/s; "
                f"val_loss {fmt_value(ft.get('val_loss'))} (assistant tokens)",
            )
        )
    if ev:
        rows.append(
            (
                "chat_eval",
                f"response_bpb {ev['response_bpb']:.3f} vs base {ev['base_response_bpb']:.3f}; end-of-turn rate "
                f"{ev['eot_rate']:.2f} vs base {ev['base_eot_rate']:.2f} ({ev['conversations']} conversations)",
            )
        )
    if reg:
        rows.append(
            ("chat_register", f"{reg['model_name']} v{reg['version']} -> {', '.join(reg['aliases'])}: {reg['why']}")
        )
    for stage, present in (("finetune", ft), ("chat_eval", ev), ("chat_register", reg)):
        if present is None:
            rows.append((stage, NOT_RUN))
    return rows


def headline(root: Path, stage: str) -> str | None:
    """The stage's line of summary_rows (what its outputs hold now); None for a stage without one (ingest) or
    with no outputs yet."""
    line = dict(summary_rows(root)).get(stage)
    return None if line == NOT_RUN else line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the project folder")
    args = parser.parse_args(argv)
    table = Table(title="quill: the last run", show_header=False, box=None, padding=(0, 2))
    for stage, line in summary_rows(args.root):
        table.add_row(f"[bold]{stage}[/bold]", line)
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
