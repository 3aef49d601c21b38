"""The clean stage's last steps: kept documents -> passages -> {train,val,test}.jsonl.

`passage_shard` (a task per shard, on either engine) cuts each kept document of a shard at paragraph
boundaries into passages of about `split.passage_chars` characters and sends each to a split by a hash of its
text, so adding a document never moves another one's passages. It writes `passages/<shard>/<split>.jsonl`,
an index of each passage's (order, bytes), and the passages' SHA-256 rows to a shuffle (pipelines/clean/shuffle.py).
`repeat_part` finds the passages written before (the same text twice, say a stock closing line: only the first
in corpus order is kept), and `assemble` concatenates the shards' parts in order, leaving those out.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from pipelines.clean import shuffle
from pipelines.clean.shards import read_spill, shard_folder
from pipelines.common.params import DataParams
from pipelines.common.splits import SPLITS, split_of

ORDER_BITS = 40  # passages per shard < 2**40: order = shard << 40 | passage number in the shard
FLUSH_PASSAGES = 1 << 16
INDEX_ROWS = np.dtype([("order", "<u8"), ("nbytes", "<u8")])


def _best_cut(text: str, start: int, target: int) -> tuple[int, int] | None:
    """Where to end a passage that starts at `start` (end, next start): the last paragraph break before
    `target` characters, else the first one before 2*target, else a line break, else a space."""
    lo, hi = start + target // 4, start + 2 * target
    for sep in ("\n\n", "\n", " "):
        cut = text.rfind(sep, lo, start + target + 1)
        if cut < 0:
            cut = text.find(sep, start + target, hi)
        if cut >= 0 and cut + len(sep) < len(text):
            return cut, cut + len(sep)
    return None


def cut_passages(chunks: Iterable[str], target: int) -> Iterator[str]:
    """Cut a document, given as text chunks, into passages of about `target` characters at paragraph
    boundaries (line breaks or spaces when a paragraph is longer than 2*target); 0 keeps it whole.

    >>> list(cut_passages(["aaaa\\n\\nbbbb\\n\\ncccc"], target=8))
    ['aaaa', 'bbbb', 'cccc']
    """
    if target <= 0:
        text = "".join(chunks)
        if text:
            yield text
        return
    buf, start = "", 0
    for chunk in itertools.chain(chunks, [None]):
        final = chunk is None
        if not final:
            buf, start = buf[start:] + chunk, 0  # compact only when new text arrives
        while len(buf) - start > (target if final else 2 * target):
            cut = _best_cut(buf, start, target)
            if cut is None:
                if not final and len(buf) - start < 4 * target:
                    break  # wait for more text before cutting blind
                hard = min(start + 2 * target, len(buf))
                cut = (hard, hard)
            passage = buf[start : cut[0]].strip("\n")
            if passage.strip():
                yield passage
            start = cut[1]
    passage = buf[start:].strip("\n")
    if passage.strip():
        yield passage


def passage_shard(task: dict) -> int:
    """Passages of one shard's kept documents (those below `cut` and not in `removed`); how many."""
    params: DataParams = task["params"]
    scratch, shard = Path(task["scratch"]), task["shard"]
    folder = shard_folder(scratch, shard)
    removed = set(np.load(scratch / "removed" / f"{shard:06d}.npy", allow_pickle=False).tolist())
    out = scratch / "passages" / f"{shard:06d}"
    out.mkdir(parents=True)
    locations = np.load(folder / "loc.npy", allow_pickle=False)
    index = {split: [] for split in SPLITS}
    shas, count, flushed = [], 0, 0

    def flush() -> None:  # passage hashes to the shuffle: the task holds FLUSH_PASSAGES of them at most
        nonlocal shas, flushed
        rows = np.array(shas, dtype=shuffle.PASSAGE_ROWS)
        name = f"{shard:06d}-{flushed:05d}"
        shuffle.write_partitioned(scratch / "psha", name, rows, shuffle.partition_of(rows["sha"], task["parts"]))
        shas, flushed = [], flushed + 1

    files = {split: open(out / f"{split}.jsonl", "w", encoding="utf-8") for split in SPLITS}
    try:
        with open(folder / "docs.jsonl", encoding="utf-8") as records, open(folder / "spill.bin", "rb") as spill:
            for i, line in enumerate(records):
                if shuffle.key(shard, i) >= task["cut"]:
                    break
                doc = json.loads(line)
                if doc["outcome"] != "kept" or i in removed:
                    continue
                offset, nbytes = int(locations[i]["offset"]), int(locations[i]["nbytes"])
                for passage in cut_passages(read_spill(spill, offset, nbytes), params.split.passage_chars):
                    data = passage.encode("utf-8")
                    digest = hashlib.sha256(data).digest()
                    split = split_of(digest, params.split.val, params.split.test)
                    order = shard << ORDER_BITS | count
                    files[split].write(
                        json.dumps({"id": digest[:8].hex(), "text": passage, "source": doc["file"]}, ensure_ascii=False)
                        + "\n"
                    )
                    index[split].append((order, len(data)))
                    shas.append((digest, order))
                    count += 1
                    if len(shas) >= FLUSH_PASSAGES:
                        flush()
    finally:
        for f in files.values():
            f.close()
    for split, rows in index.items():
        np.save(out / f"{split}.idx.npy", np.array(rows, dtype=INDEX_ROWS), allow_pickle=False)
    flush()
    return count


def repeat_part(task: dict) -> int:
    """The passages of one partition whose text came earlier in corpus order (writes `repeats/<p>.npy`)."""
    scratch, part = Path(task["scratch"]), task["part"]
    found = []
    for rows in shuffle.read_partition(scratch / "psha", part, shuffle.PASSAGE_ROWS, "sha"):
        rows = np.sort(rows, order=["sha", "order"])
        found.append(rows["order"][shuffle.repeats(rows["sha"])])
    (scratch / "repeats").mkdir(exist_ok=True)
    np.save(scratch / "repeats" / f"{part:04d}.npy", np.concatenate(found), allow_pickle=False)
    return sum(map(len, found))


def assemble(scratch: Path, shards: int, out: Path) -> dict:
    """{train,val,test}.jsonl under `out` from every shard's parts, in order, repeats left out; their sizes."""
    repeats = [np.load(f, allow_pickle=False) for f in sorted((scratch / "repeats").glob("*.npy"))]
    repeats = np.sort(np.concatenate(repeats)) if repeats else np.empty(0, dtype=np.uint64)
    sizes = {split: {"docs": 0, "bytes": 0} for split in SPLITS}
    for split in SPLITS:
        with open(out / f"{split}.jsonl", "wb") as target:
            for shard in range(shards):
                part = scratch / "passages" / f"{shard:06d}"
                if not part.is_dir():
                    continue  # past the cut
                index = np.load(part / f"{split}.idx.npy", allow_pickle=False)
                keep = ~np.isin(index["order"], repeats)
                sizes[split]["docs"] += int(keep.sum())
                sizes[split]["bytes"] += int(index["nbytes"][keep].sum())
                with open(part / f"{split}.jsonl", "rb") as lines:
                    for line, kept in zip(lines, keep.tolist()):
                        if kept:
                            target.write(line)
    return {"splits": sizes, "repeated_passages": len(repeats)}
