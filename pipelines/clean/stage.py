"""Stage `clean`: raw corpus files -> cleaned, deduplicated passages split into train/val/test.

In:   data/raw/manifest.json and the raw files it lists (from the ingest stage); params `data.*`
      (min_chars, strip_gutenberg, strip_html, max_docs, max_bytes, dedup.*, split.*; engine, workers).
Out:  data/clean/{train,val,test}.jsonl  one passage per line: {"id", "text", "source"}
      metrics/clean.json                 docs_in/out, bytes, duplicates, drops, quarantines, per-split sizes
      reports/clean/report.md            every dropped, quarantined and duplicate document, and why
      reports/clean/files.json           the same per document: {file, outcome, reason, duplicate_of}
Run:  python -m pipelines.clean          (or `dvc repro clean`)

A document is a text file (.txt, .md, .html, ...; optionally compressed) or one record of a .jsonl or .parquet
file (pipelines/clean/read.py). Each one is decoded, cleaned (pipelines/clean/textclean.py), checked for length,
then deduplicated: exact duplicates by the SHA-256 of the cleaned text, near duplicates by MinHash LSH over word
shingles with exact verification (pipelines/clean/dedup.py); in both cases the first document in sorted path
order is kept. Kept documents are cut at paragraph boundaries into passages, and each passage goes to a split
by a hash of its text (pipelines/clean/passages.py).

The work is cut into tasks that `data.engine` runs (pipelines/common/engine.py: every core here, or Ray Data):

    read shards (parallel) -> exact dedup, LSH buckets, verification (parallel per partition)
    -> clusters (here; as many entries as near duplicates) -> passages (parallel) -> repeated passages
    (parallel per partition) -> concatenation in order (here, sequential I/O)

Tasks exchange rows through files in a scratch folder beside data/clean (pipelines/clean/shuffle.py), so memory
stays bounded whatever the corpus size, and every output is the same byte for byte on either engine and with
any number of workers. What must be held whole is bounded by `data.max_file_bytes`: a decompressed text or HTML
file, a JSONL line or a Parquet value over it is quarantined (`too_large`); JSONL and Parquet files are streamed
and have no cap on the whole file. A full disk (ENOSPC, EFBIG) stops the stage, never a
document. Every output is written to a temporary path and renamed into place.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipelines.clean import dedup, duplicates, passages, shards, shuffle
from pipelines.clean.read import Doc
from pipelines.clean.report import Tally
from pipelines.common.atomic import atomic_dir, out_of_space_stops_stage, scratch_dir, write_json
from pipelines.common.engine import Engine, workers
from pipelines.common.layout import Layout
from pipelines.common.params import DataParams, Params
from pipelines.common.runner import StageError, run_stage
from pipelines.common.splits import SPLITS

SCRATCH = ".clean-scratch-"  # the tasks' folder beside data/clean; one left by a killed run is removed
VERIFY_PAIRS = 20_000  # candidate pairs per verification task


class CleanError(StageError):
    """The stage cannot produce a usable corpus; the message says why."""


def _load_manifest(raw_dir: Path) -> dict:
    path = raw_dir / "manifest.json"
    if not path.is_file():
        raise CleanError(f"{path} not found: run the ingest stage first (dvc repro ingest)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest["files"], manifest.get("skipped", [])
    except (ValueError, KeyError, TypeError) as exc:
        raise CleanError(f"{path} is not a valid manifest ({exc}): run the ingest stage again") from None
    return manifest


# --- the steps ----------------------------------------------------------------------------------------


def _cut(scratch: Path, counts: list[int], params: DataParams) -> int:
    """The key of the first document past data.max_docs / data.max_bytes (in sorted order); past the last
    document when neither cap is reached."""
    end = shuffle.key(len(counts), 0)
    cut, seen, seen_bytes = end, 0, 0
    for shard, count in enumerate(counts):
        if params.max_docs is not None and seen + count >= params.max_docs:
            cut = min(cut, shuffle.key(shard, params.max_docs - seen))
        if params.max_bytes is not None and cut == end:
            with open(shards.shard_folder(scratch, shard) / "docs.jsonl", encoding="utf-8") as records:
                for i, line in enumerate(records):
                    seen_bytes += json.loads(line)["raw_bytes"]
                    if seen_bytes >= params.max_bytes:
                        cut = min(cut, shuffle.key(shard, i + 1))
                        break
        seen += count
        if cut != end:
            break
    return cut


def _gather(folder: Path, dtype: np.dtype) -> np.ndarray:
    found = [np.load(f, allow_pickle=False) for f in sorted(folder.glob("*.npy"))]
    return np.concatenate(found) if found else np.empty(0, dtype=dtype)


def _near_duplicates(
    engine: Engine, scratch: Path, part_tasks: list[dict], params: DataParams
) -> dict[int, tuple[int, float]]:
    """member key -> (kept key, exact Jaccard) for every near duplicate, from the LSH buckets' candidates."""
    engine.run(duplicates.bucket_part, part_tasks, desc="clean: LSH buckets", size=_one, unit="partition")
    candidates = np.unique(_gather(scratch / "pairs", shuffle.PAIR_ROWS))
    np.save(scratch / "candidates.npy", candidates, allow_pickle=False)
    edges = _verify(engine, scratch, "candidates.npy", len(candidates), params, keep_all=False)
    roots = dedup.clusters(zip(edges["a"].tolist(), edges["b"].tolist()))
    similarity = {(a, b): j for a, b, j in edges.tolist()}
    # a member joined to its cluster's first document through others: its own similarity to that one
    indirect = np.array(sorted((r, m) for m, r in roots.items() if (r, m) not in similarity), dtype=shuffle.PAIR_ROWS)
    np.save(scratch / "indirect.npy", indirect, allow_pickle=False)
    for a, b, j in _verify(engine, scratch, "indirect.npy", len(indirect), params, keep_all=True).tolist():
        similarity[(a, b)] = j
    return {m: (r, round(similarity[(r, m)], 4)) for m, r in roots.items()}


def _verify(engine: Engine, scratch: Path, pairs: str, count: int, params: DataParams, keep_all: bool) -> np.ndarray:
    out = scratch / f"verified-{Path(pairs).stem}"
    out.mkdir()
    tasks = [
        {
            "scratch": str(scratch),
            "params": params,
            "pairs": pairs,
            "start": start,
            "stop": min(start + VERIFY_PAIRS, count),
            "out": f"{out.name}/{i:06d}.npy",  # under the scratch folder, as `pairs` is
            "keep_all": keep_all,
        }
        for i, start in enumerate(range(0, count, VERIFY_PAIRS))
    ]
    size = lambda t: t["stop"] - t["start"]  # noqa: E731
    engine.run(duplicates.verify, tasks, desc="clean: verify", size=size, unit="pair")
    return _gather(out, duplicates.SIMILAR_ROWS)


def _one(_task) -> int:
    return 1


# --- the outcome of every document ----------------------------------------------------------------------


def _final_docs(
    scratch: Path, counts: list[int], cut: int, found: dict, names: dict, skipped: list[dict], params: DataParams
) -> Iterator[Doc]:
    """Every document below the cut with its final outcome, in order, then one per file ingest skipped.
    `found`: key -> ("duplicate", first key, None) or ("near_duplicate", kept key, Jaccard)."""
    d = params.dedup
    for shard, _ in enumerate(counts):
        if shuffle.key(shard, 0) >= cut:
            break
        with open(shards.shard_folder(scratch, shard) / "docs.jsonl", encoding="utf-8") as records:
            for i, line in enumerate(records):
                key = shuffle.key(shard, i)
                if key >= cut:
                    break
                doc = Doc(**json.loads(line))
                if key in found:
                    doc.outcome, kept, similarity = found[key]
                    doc.duplicate_of = names[kept]
                    doc.reason = (
                        "exact duplicate (same text after cleaning)"
                        if similarity is None
                        else f"near duplicate: Jaccard {similarity:.3f} of word {d.shingle_words}-shingles "
                        f">= {d.jaccard_threshold}"
                    )
                yield doc
    for entry in sorted(skipped, key=lambda e: e["file"]):
        yield shards.quarantine(Doc(entry["file"]), f"skipped_by_ingest: {entry.get('reason', 'no reason given')}")


def _names(scratch: Path, keys: set[int]) -> dict[int, str]:
    """The file names of these documents (the ones others duplicate), read from their shards' records."""
    names = {}
    for shard in sorted({int(shuffle.shard_of(k)) for k in keys}):
        wanted = {k for k in keys if shuffle.shard_of(k) == shard}
        with open(shards.shard_folder(scratch, shard) / "docs.jsonl", encoding="utf-8") as records:
            for i, line in enumerate(records):
                if shuffle.key(shard, i) in wanted:
                    names[shuffle.key(shard, i)] = json.loads(line)["file"]
    return names


def clean_corpus(
    raw_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    report_dir: Path,
    params: DataParams,
) -> dict:
    """Run the whole stage; returns the metrics written to `metrics_path`. Raises CleanError (after
    writing the report) if no usable document remains; `out_dir` and `metrics_path` are then untouched."""
    started = time.perf_counter()
    manifest = _load_manifest(raw_dir)
    entries = sorted(manifest["files"], key=lambda e: e["file"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    preload = [shards.__name__, duplicates.__name__, passages.__name__]
    with out_of_space_stops_stage(), scratch_dir(out_dir.parent, SCRATCH) as scratch, Engine(params, preload) as engine:
        scratch, raw_dir = scratch.resolve(), raw_dir.resolve()  # the tasks' paths: Ray workers run in another folder
        planned, parts = shards.plan(entries, raw_dir, params, workers(params))
        shard_tasks = [
            {"shard": s, "files": files, "raw": str(raw_dir), "scratch": str(scratch), "parts": parts, "params": params}
            for s, files in enumerate(planned)
        ]
        read = engine.run(shards.read_shard, shard_tasks, desc="clean: read", size=_shard_bytes)
        counts = [r["docs"] for r in read]
        cut = _cut(scratch, counts, params)
        part_tasks = [{"scratch": str(scratch), "part": p, "cut": cut, "params": params} for p in range(parts)]
        engine.run(duplicates.exact_part, part_tasks, desc="clean: exact duplicates", size=_one, unit="partition")
        exact = _gather(scratch / "exact", shuffle.PAIR_ROWS)
        np.save(scratch / "exact_duplicates.npy", np.sort(exact["b"]), allow_pickle=False)
        near = _near_duplicates(engine, scratch, part_tasks, params)
        found = {b: ("duplicate", a, None) for a, b in exact.tolist()}
        found.update({m: ("near_duplicate", r, j) for m, (r, j) in near.items()})
        _save_removed(scratch, len(planned), found)
        passage_tasks = [t | {"cut": cut} for t in shard_tasks if shuffle.key(t["shard"], 0) < cut]
        size = lambda t: read[t["shard"]]["raw_bytes"]  # noqa: E731
        engine.run(passages.passage_shard, passage_tasks, desc="clean: passages", size=size)
        engine.run(passages.repeat_part, part_tasks, desc="clean: repeated passages", size=_one, unit="partition")

        names = _names(scratch, {kept for _, kept, _ in found.values()})
        nothing_usable = None
        with atomic_dir(report_dir) as report_tmp:
            tally = Tally(report_tmp, scratch)
            try:
                for doc in _final_docs(scratch, counts, cut, found, names, manifest.get("skipped", []), params):
                    tally.add(doc)
            except BaseException:
                tally.close()
                raise
            raw_bytes = sum(_raw_size(raw_dir / name) for name in tally.files)
            if not tally.outcomes["kept"]:
                empty = {"splits": {s: {"docs": 0, "bytes": 0} for s in SPLITS}, "repeated_passages": 0}
                tally.finish(tally.metrics(raw_bytes, empty, time.perf_counter() - started))
                nothing_usable = _nothing_usable(tally, report_dir)  # the report is written, data/clean untouched
            else:
                with atomic_dir(out_dir) as tmp:
                    written = passages.assemble(scratch, len(planned), tmp)
                    metrics = tally.metrics(raw_bytes, written, time.perf_counter() - started)
                    tally.finish(metrics)
                    write_json(metrics_path, metrics)
    if nothing_usable:
        raise CleanError(nothing_usable)
    return metrics


def _shard_bytes(task: dict) -> int:
    return sum(f["bytes"] for f in task["files"])


def _save_removed(scratch: Path, count: int, found: dict) -> None:
    """Per shard, the indices of its documents found to be duplicates (passage_shard leaves them out)."""
    by_shard: dict[int, list[int]] = {s: [] for s in range(count)}
    for key in found:
        by_shard[int(shuffle.shard_of(key))].append(key & ((1 << shuffle.INDEX_BITS) - 1))
    (scratch / "removed").mkdir()
    for shard, indices in by_shard.items():
        np.save(scratch / "removed" / f"{shard:06d}.npy", np.array(sorted(indices), dtype=np.uint32))


def _nothing_usable(tally: Tally, report_dir: Path) -> str:
    why = +tally.outcomes
    parts = ", ".join(f"{n} {outcome.replace('_', ' ')}" for outcome, n in sorted(why.items()))
    return (
        f"no usable document remains: all {sum(why.values())} documents were dropped, quarantined or duplicates "
        f"({parts or 'no documents at all'}): see {report_dir / 'report.md'}"
    )


def _raw_size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def summarize(params: Params, layout: Layout) -> str:
    """Run the stage on data/raw; the line printed on success."""
    metrics = clean_corpus(layout.raw, layout.clean, layout.clean_metrics, layout.clean_reports, params.data)
    return (
        f"{metrics['docs_in']} documents in, {metrics['docs_out']} kept "
        f"({metrics['exact_duplicates']} exact and {metrics['near_duplicates']} near duplicates, "
        f"{sum(metrics['dropped'].values())} dropped, {metrics['quarantined']} quarantined); "
        f"{metrics['passages']} passages, {metrics['mb_per_s']} MB/s in {metrics['seconds']} s; "
        f"report: {layout.clean_reports / 'report.md'}"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.clean [--root DIR]`: the exit status (pipelines/common/runner.py)."""
    return run_stage("clean", summarize, argv)
