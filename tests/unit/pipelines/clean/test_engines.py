"""The clean stage's outputs do not depend on how its work is cut: one process or a pool of workers, one shard or
many, one shuffle partition or many, give the same bytes; the caps data.max_docs / max_bytes cut the same documents
either way; memory does not grow with the number of documents. (The Ray engine: tests/integration/test_data_engines.py.)"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.clean import shards
from pipelines.common.params import DataParams
from tests.helpers.corpus import make_document, raw_from_folder, run_clean, write_corpus, write_planted_corpus
from tests.helpers.paths import REPO

PARAMS = DataParams(sources=[{"type": "local", "path": "corpus"}], min_chars=50, workers=1)
OUTPUTS = ("data/clean/train.jsonl", "data/clean/val.jsonl", "data/clean/test.jsonl", "reports/clean/report.md")


def outputs(root: Path) -> dict[str, bytes]:
    found = {name: (root / name).read_bytes() for name in OUTPUTS}
    found["files.json"] = (root / "reports" / "clean" / "files.json").read_bytes()
    metrics = json.loads((root / "metrics" / "clean.json").read_text())
    found["metrics"] = json.dumps({k: v for k, v in metrics.items() if k not in ("seconds", "mb_per_s")}).encode()
    return found


@pytest.fixture
def many_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards of about 3 KB and partitions of 4 KB: a tiny corpus is cut as a large one would be."""
    monkeypatch.setattr(shards, "MIN_SHARD_BYTES", 1)
    monkeypatch.setattr(shards, "MAX_SHARD_BYTES", 3000)
    monkeypatch.setattr(shards, "PARTITION_BYTES", 4000)


def test_a_pool_of_workers_over_many_shards_gives_the_same_bytes_and_finds_the_planted_copies(
    tmp_path: Path, many_shards: None, pool_for_tiny_steps: None
) -> None:
    planted = write_planted_corpus(tmp_path / "corpus")
    rng = random.Random(1)
    rows = pa.table({"text": [make_document(rng, paragraphs=3) for _ in range(8)]})
    (tmp_path / "corpus/p").mkdir()
    pq.write_table(rows, tmp_path / "corpus/p/rows.parquet", row_group_size=2)  # four row groups
    one, pool = tmp_path / "one", tmp_path / "pool"
    for root in (one, pool):
        raw_from_folder(tmp_path / "corpus", root)
    planned, parts = shards.plan(
        json.loads((pool / "data/raw/manifest.json").read_text())["files"], pool / "data/raw", PARAMS, 2
    )
    assert len(planned) > 4 and parts > 2  # the cut is really different
    cut = {piece["file"] for shard in planned for piece in shard if "part" in piece}
    assert cut == {"sub/more/docs.jsonl", "p/rows.parquet"}  # read in line ranges, in runs of row groups

    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as m:  # one shard and one partition for the single process
        m.setattr(shards, "MIN_SHARD_BYTES", 1 << 30)
        m.setattr(shards, "MAX_SHARD_BYTES", 1 << 30)
        m.setattr(shards, "PARTITION_BYTES", 1 << 30)
        run_clean(one, PARAMS)
    run_clean(pool, PARAMS.model_copy(update={"workers": 2}))
    assert outputs(one) == outputs(pool)

    files = {d["file"]: d for d in json.loads((pool / "reports/clean/files.json").read_text())}
    marked = {name: d["duplicate_of"] for name, d in files.items() if d["outcome"] in ("duplicate", "near_duplicate")}
    assert marked == planted  # every planted copy, with its original, and nothing else
    assert {files[n]["outcome"] for n in planted if "exact" in n} == {"duplicate"}
    assert {files[n]["outcome"] for n in planted if "near" in n} == {"near_duplicate"}


def test_a_relative_project_root_finds_the_near_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As `dvc repro` runs the stage: in the project folder, every path relative to it."""
    planted = write_planted_corpus(tmp_path / "corpus")
    raw_from_folder(tmp_path / "corpus", tmp_path / "project")
    monkeypatch.chdir(tmp_path / "project")
    metrics = run_clean(Path("."), PARAMS)
    assert metrics["near_duplicates"] == sum("near" in name for name in planted) > 0


def test_max_docs_and_max_bytes_cut_the_same_documents_however_the_corpus_is_cut(
    tmp_path: Path, many_shards: None, pool_for_tiny_steps: None
) -> None:
    write_corpus(tmp_path / "corpus", n_docs=30)
    raw = raw_from_folder(tmp_path / "corpus", tmp_path / "sizes")
    sizes = [e["bytes"] for e in json.loads((raw / "manifest.json").read_text())["files"]]
    for caps, expected in (({"max_docs": 7}, 7), ({"max_bytes": sizes[0] + sizes[1] + 1}, 3)):
        results = []
        for workers in (1, 2):
            root = tmp_path / f"{workers}-{expected}"
            raw_from_folder(tmp_path / "corpus", root)
            metrics = run_clean(root, PARAMS.model_copy(update={**caps, "workers": workers}))
            assert metrics["docs_in"] == expected, caps
            results.append(outputs(root))
        assert results[0] == results[1], caps
        listed = [d["file"] for d in json.loads(results[0]["files.json"])]
        assert listed == [f"doc_{i:03d}.txt" for i in range(expected)]  # the first documents in sorted order


MEMORY_PROBE = """
import sys
from pathlib import Path
from pipelines.clean import shards, shuffle
from pipelines.clean.stage import clean_corpus
from pipelines.common.params import DataParams
# shards, partitions and sort passes much smaller than the corpus, as they are beside a corpus of many GB
shards.MIN_SHARD_BYTES, shards.MAX_SHARD_BYTES, shards.PARTITION_BYTES = 1, 256 << 10, 1 << 20
shuffle.PASS_BYTES = 256 << 10
root = Path(sys.argv[1])
params = DataParams(sources=[{"type": "local", "path": "c"}], min_chars=20, workers=1)
clean_corpus(root / "data/raw", root / "data/clean", root / "m.json", root / "reports", params)
# VmHWM, not ru_maxrss: the latter keeps the peak of the process this one was forked from (pytest's, with torch)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) // 1024)
"""


def test_peak_memory_does_not_grow_with_the_number_of_documents(tmp_path: Path) -> None:
    """Peak resident memory of the whole stage (one process) on 4,000 and on 24,000 short documents: anything held
    per document (records, sketches, outcomes: about a KB each) would show as 20 MB or more."""
    peaks = {}
    for n in (4000, 24000):
        corpus = tmp_path / f"c{n}"
        corpus.mkdir()
        with open(corpus / "docs.jsonl", "w") as f:
            for i in range(n):  # distinct documents: every word is numbered
                f.write(json.dumps({"text": " ".join(f"w{i}x{j} word{j % 50}" for j in range(30))}) + "\n")
        root = tmp_path / f"w{n}"
        raw_from_folder(corpus, root)
        probe = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(root)], capture_output=True, text=True, cwd=REPO, timeout=300
        )
        assert probe.returncode == 0, probe.stderr
        peaks[n] = int(probe.stdout.split()[-1])
    assert peaks[24000] - peaks[4000] < 8, peaks  # MB
