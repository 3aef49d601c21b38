"""The clean stage's account of every document: metrics/clean.json, reports/clean/report.md and files.json.

`Tally` takes the documents one at a time, in corpus order, with their final outcome: it counts them and writes
files.json and report.md's lists as it goes (to files, so a corpus of millions of documents is never held),
then `finish` writes report.md and returns the metrics.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from pipelines.clean.read import Doc
from pipelines.common.splits import SPLITS

FILES_KEYS = ("file", "outcome", "reason", "duplicate_of", "chars", "encoding")
SECTIONS = (  # report.md's lists of documents not kept: (title, outcome, why)
    ("Quarantined", "quarantined", lambda d: d.reason),
    ("Dropped", "dropped", lambda d: d.reason),
    ("Exact duplicates", "duplicate", lambda d: f"same text as `{d.duplicate_of}`"),
    (
        "Near duplicates",
        "near_duplicate",
        lambda d: f"{d.reason.removeprefix('near duplicate: ')} with `{d.duplicate_of}` (kept)",
    ),
)


class Tally:
    """Counts and lists of documents; files.json and report.md go to `report_dir`, lists via `scratch`."""

    def __init__(self, report_dir: Path, scratch: Path) -> None:
        self.report_dir, self.scratch = report_dir, scratch
        self.outcomes: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.quarantined: Counter[str] = Counter()
        self.encodings: Counter[str] = Counter()
        self.gutenberg = self.html = 0
        self.files: set[str] = set()  # raw files with a document here (bytes_in)
        self._json = open(report_dir / "files.json", "w", encoding="utf-8")
        self._json.write("[")
        self._lists: dict[str, TextIO] = {
            outcome: open(scratch / f"report-{outcome}.md", "w+", encoding="utf-8") for _, outcome, _ in SECTIONS
        }

    def add(self, doc: Doc) -> None:
        self.outcomes[doc.outcome] += 1
        if doc.outcome == "dropped":
            self.dropped[doc.drop_key] += 1
        elif doc.outcome == "quarantined":
            self.quarantined[doc.drop_key] += 1
        if doc.encoding and doc.encoding not in ("utf-8", "ascii"):
            self.encodings[doc.encoding] += 1
        self.gutenberg += doc.gutenberg
        self.html += doc.html
        self.files.add(doc.file.partition("#")[0])
        # the layout json.dumps(list, indent=1) gives, one entry at a time
        entry = json.dumps({k: v for k, v in asdict(doc).items() if k in FILES_KEYS}, indent=1, ensure_ascii=False)
        self._json.write(("\n " if sum(self.outcomes.values()) == 1 else ",\n ") + entry.replace("\n", "\n "))
        for _, outcome, why in SECTIONS:
            if doc.outcome == outcome:
                self._lists[outcome].write(f"- `{doc.file}`: {why(doc)}\n")

    def metrics(self, raw_bytes: int, written: dict, seconds: float) -> dict:
        splits = written["splits"]
        return {
            "docs_in": sum(self.outcomes.values()),
            "docs_out": self.outcomes["kept"],
            "bytes_in": raw_bytes,
            "bytes_out": sum(s["bytes"] for s in splits.values()),
            "exact_duplicates": self.outcomes["duplicate"],
            "near_duplicates": self.outcomes["near_duplicate"],
            "quarantined": self.outcomes["quarantined"],
            "quarantine_reasons": dict(sorted(self.quarantined.items())),
            "dropped": dict(sorted(self.dropped.items())),
            "gutenberg_stripped": self.gutenberg,
            "html_stripped": self.html,
            "passages": sum(s["docs"] for s in splits.values()),
            "repeated_passages": written["repeated_passages"],
            "splits": splits,
            "seconds": round(seconds, 3),
            "mb_per_s": round(raw_bytes / 1e6 / seconds, 3) if seconds > 0 else None,
        }

    def finish(self, metrics: dict) -> None:
        """Close files.json and write report.md: a summary table, then every document not kept and why."""
        self._json.write("\n]\n" if sum(self.outcomes.values()) else "]\n")
        self._json.close()
        m = metrics
        dropped = ", ".join(f"{k} {v}" for k, v in m["dropped"].items()) or "0"
        quarantined = ", ".join(f"{k} {v}" for k, v in m["quarantine_reasons"].items()) or "none"
        passages = f"{m['passages']} ({' / '.join(str(m['splits'][s]['docs']) for s in SPLITS)})"
        head = [
            "# Clean stage report",
            "",
            "| | count |",
            "|---|---:|",
            f"| documents in | {m['docs_in']} |",
            f"| kept | {m['docs_out']} |",
            f"| exact duplicates | {m['exact_duplicates']} |",
            f"| near duplicates | {m['near_duplicates']} |",
            f"| dropped ({dropped}) | {sum(m['dropped'].values())} |",
            f"| quarantined ({quarantined}) | {m['quarantined']} |",
            f"| Gutenberg header/footer removed | {m['gutenberg_stripped']} |",
            f"| HTML stripped | {m['html_stripped']} |",
            f"| bytes in / out | {m['bytes_in']} / {m['bytes_out']} |",
            f"| passages (train / val / test) | {passages} |",
            "",
            f"docs_in = kept + exact + near + dropped + quarantined: {m['docs_in']} = {m['docs_out']} + "
            f"{m['exact_duplicates']} + {m['near_duplicates']} + {sum(m['dropped'].values())} + {m['quarantined']}",
        ]
        with open(self.report_dir / "report.md", "w", encoding="utf-8") as report:
            report.write("\n".join(head) + "\n")
            for title, outcome, _ in SECTIONS:
                listed = self._lists.pop(outcome)
                report.write(f"\n## {title} ({self.outcomes[outcome]})\n\n")
                listed.seek(0)
                if self.outcomes[outcome]:
                    while block := listed.read(1 << 20):
                        report.write(block)
                else:
                    report.write("none\n")
                listed.close()
            if self.encodings:
                report.write("\n## Encodings other than UTF-8\n\n")
                report.write("".join(f"- {enc}: {n} file(s)\n" for enc, n in sorted(self.encodings.items())))

    def close(self) -> None:
        """Release the files of an unfinished tally (the stage failed)."""
        self._json.close()
        for listed in self._lists.values():
            listed.close()
