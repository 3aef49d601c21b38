"""Near-duplicate detection of the clean stage against exact all-pairs Jaccard, on a synthetic set.

The set is built here, deterministically: base documents of 200-500 words drawn from a Zipf-weighted
vocabulary of pseudo-words (so that, as in real text, common words make unrelated documents share a
few shingles), 1-3 variants of most bases with 5-15 % of their words substituted, deleted or
inserted, and unrelated documents. Ground truth: documents built from the same base are duplicates.

Ours: `pipelines.clean.dedup` exactly as the clean stage calls it (sketch each document, MinHash LSH,
exact verification of candidates, clusters), with `data.dedup` from params.yaml.
Baseline: exact Jaccard of the same shingle sets over all pairs (Python sets), same threshold, same
clustering. Quality is precision and recall of same-cluster pairs against the ground truth; the
ratio is the baseline's time over ours (at equal quality it is the speed-up).

    python -m benchmarks.neardup            # ~1,000 documents, ~6 s on 2 cores
    python -m benchmarks.neardup --bases 100

Ends with one JSON line: {"benchmark": "neardup", "ours": s, "baseline": s, "unit": "s", "ratio": ..., ...}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import time
from pathlib import Path

import numpy as np

from pipelines.clean.stage import dedup
from pipelines.common.params import DedupParams, load_params

SYLLABLES = (
    "ba be bi bo bu da de di do du fa fe fi fo ka ke ki ko la le li lo lu ma me mi mo na ne ni no "
    "ra re ri ro sa se si so ta te ti to va ve vi wa we wi ya yo za ze th sh ch an en in on ar er or".split()
)


def vocabulary(rng: random.Random, size: int = 8000) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4)))))
    return sorted(words)


def build_set(bases: int, unrelated: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Documents and their ground-truth cluster labels (unique label = no duplicate)."""
    rng = random.Random(seed)
    vocab = vocabulary(rng)
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05  # Zipf-like: a few words are very common
    cum = np.cumsum(weights / weights.sum())
    np_rng = np.random.default_rng(seed)

    def words(n: int) -> list[str]:
        return [vocab[i] for i in np.searchsorted(cum, np_rng.random(n))]

    def variant(base: list[str]) -> list[str]:
        rate = rng.uniform(0.05, 0.15)
        out: list[str] = []
        for w in base:
            if rng.random() >= rate:
                out.append(w)
                continue
            kind = rng.random()
            if kind < 0.7:
                out.extend(words(1))  # substitute
            elif kind < 0.85:
                pass  # delete
            else:
                out.extend([w, *words(1)])  # insert
        return out

    def prose(ws: list[str]) -> str:
        lines, i = [], 0
        while i < len(ws):
            n = rng.randint(6, 14)
            lines.append(" ".join(ws[i : i + n]).capitalize() + rng.choice([".", ",", ";", "!", "?"]))
            i += n
        return "\n".join(lines) + "\n"

    docs, labels = [], []
    for b in range(bases):
        base = words(rng.randint(200, 500))
        docs.append(prose(base))
        labels.append(b)
        for _ in range(rng.choice((0, 1, 1, 2, 3))):
            docs.append(prose(variant(base)))
            labels.append(b)
    for u in range(unrelated):
        docs.append(prose(words(rng.randint(200, 500))))
        labels.append(bases + u)
    order = list(range(len(docs)))
    rng.shuffle(order)
    return [docs[i] for i in order], [labels[i] for i in order]


def cluster_pairs(n: int, dup_of: dict[int, int]) -> set[tuple[int, int]]:
    clusters: dict[int, list[int]] = {}
    for i in range(n):
        clusters.setdefault(dup_of.get(i, i), []).append(i)
    return {pair for members in clusters.values() for pair in itertools.combinations(sorted(members), 2)}


def quality(predicted: set, truth: set) -> tuple[float, float]:
    hits = len(predicted & truth)
    return (hits / len(predicted) if predicted else 1.0), (hits / len(truth) if truth else 1.0)


def ours(docs: list[str], p: DedupParams) -> dict[int, int]:
    sketches = [dedup.sketch([d], p.shingle_words, p.num_perm) for d in docs]
    return {i: kept for i, (kept, _) in dedup.near_duplicates(sketches, p.jaccard_threshold, p.num_perm).items()}


def baseline(docs: list[str], p: DedupParams) -> dict[int, int]:
    """Exact Jaccard over all pairs of shingle sets, then the same clustering (first document kept)."""
    sets = []
    for d in docs:
        shingler = dedup.Shingler(p.shingle_words)
        shingler.feed(d)
        sets.append(set(shingler.finish().tolist()))
    parent = list(range(len(docs)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in itertools.combinations(range(len(docs)), 2):
        a, b = sets[i], sets[j]
        inter = len(a & b)
        if a and b and inter / (len(a) + len(b) - inter) >= p.jaccard_threshold:
            ri, rj = root(i), root(j)
            parent[max(ri, rj)] = min(ri, rj)
    return {i: root(i) for i in range(len(docs)) if root(i) != i}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bases", type=int, default=300)
    parser.add_argument("--unrelated", type=int, default=300)
    args = parser.parse_args()
    p = load_params().data.dedup if Path("params.yaml").is_file() else DedupParams()

    docs, labels = build_set(args.bases, args.unrelated)
    truth = {(i, j) for i, j in itertools.combinations(range(len(docs)), 2) if labels[i] == labels[j]}
    results = {}
    for name, fn in (("ours", ours), ("baseline", baseline)):
        start = time.perf_counter()
        dup_of = fn(docs, p)
        seconds = time.perf_counter() - start
        precision, recall = quality(cluster_pairs(len(docs), dup_of), truth)
        results[name] = {
            "seconds": round(seconds, 3),
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "removed": len(dup_of),
        }
        print(
            f"{name:>8}: {seconds:7.2f} s  precision {precision:.4f}  recall {recall:.4f}  "
            f"({len(dup_of)} of {len(docs)} documents marked duplicate)"
        )
    o, b = results["ours"], results["baseline"]
    print(
        json.dumps(
            {
                "benchmark": "neardup",
                "ours": o["seconds"],
                "baseline": b["seconds"],
                "unit": "s",
                "ratio": round(b["seconds"] / o["seconds"], 2),
                "precision": o["precision"],
                "recall": o["recall"],
                "baseline_precision": b["precision"],
                "baseline_recall": b["recall"],
                "docs": len(docs),
                "true_pairs": len(truth),
                "shingle_words": p.shingle_words,
                "num_perm": p.num_perm,
                "jaccard_threshold": p.jaccard_threshold,
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            }
        )
    )


if __name__ == "__main__":
    main()
