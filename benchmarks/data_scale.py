"""Data stages at corpus scale: clean + tokenize on a generated corpus, against today's single-process path.

Per size, a corpus is written from a seed (benchmarks/data_corpus.py: varied documents in nested .txt and .jsonl
files, some gzipped, with planted exact and near duplicates), ingested once (untimed), and run through
`python -m pipelines.clean` and `python -m pipelines.tokenize` in fresh workspaces, side by side:
baseline = commit f770929 (before data.engine), from `git archive`; local and ray = this checkout with
data.engine local / ray (a local Ray). Per run: wall time per stage, throughput (raw MB/s), peak RSS of the
stage's process tree (sampled every 0.1 s), recall and precision of the planted duplicates. Then the default
corpus (params.yaml as is): baseline against local, best of 2.

    python -m benchmarks.data_scale                      # 100 MB and 1 GB
    python -m benchmarks.data_scale --sizes 10,30 --engines local --json /tmp/data_scale.json

Targets (issue "data stages at corpus scale"): local at the largest size peaks under 1.5 GB RSS and at most 1.2x
the smallest size's peak, with at least 1.8x the baseline's throughput; planted duplicates found with recall
>= 0.95 and precision >= 0.99; ray's outputs identical to local's (metrics but their times) at >= 0.8x its
throughput; on the default corpus, local clean + tokenize take at most 1.1x the baseline's time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import yaml

from benchmarks.data_corpus import write_corpus
from pipelines.common.hashing import sha256_file

REPO = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "f770929"  # the last commit before the data engine: one process, no data.engine
# params.yaml keys newer than the baseline, which its code rejects (dotted: section.key or section.sub.key)
NEW_KEYS = (
    *("data.engine", "data.workers", "data.max_docs", "data.max_bytes"),
    "tokenizer.train_sample_bytes",
    "finetune.lora.train_markers",
)
STAGES = ("clean", "tokenize")
SAMPLE_S = 0.1
COMPARED = ("data/clean", "data/tokenizer", "data/tokens", "reports/clean")  # + metrics without time fields
TIME_KEY = re.compile(r"(seconds|_per_s|_s)$")
TARGETS = {  # name: (comparison, bound)
    "local / baseline throughput": (">=", 1.8),
    "ray / local throughput": (">=", 0.8),
    "ray outputs identical to local": ("==", True),
    "local peak RSS (GB)": ("<", 1.5),
    "local peak RSS, largest / smallest size": ("<=", 1.2),
    "recall of planted duplicates": (">=", 0.95),
    "precision of planted duplicates": (">=", 0.99),
    "default corpus: local / baseline time": ("<=", 1.1),
}


class StageFailed(Exception):
    """A stage exited non-zero; the message holds the end of its log."""


# --- running a stage ------------------------------------------------------------------------------


def family(proc: psutil.Process) -> list[psutil.Process]:
    """A process and all its descendants (pool workers, a local Ray's processes)."""
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass  # exited between listing and reading
    return total


def run_stage(stage: str, ws: Path, code_dir: Path, max_rss_mb: float | None = None) -> dict:
    """`python -m pipelines.<stage> --root ws` with the code in `code_dir`: wall seconds, peak RSS of its process
    tree, its summary line. A tree past max_rss_mb is killed (StageFailed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    if code_dir != REPO:
        env["PYTHONPATH"] = str(code_dir)
    log = ws / f"{stage}.log"
    peak, killed = 0, False
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", f"pipelines.{stage}", "--root", str(ws)],
            cwd=code_dir,
            env=env,
            stdout=out,
            stderr=out,
        )
        done = threading.Event()

        def sample() -> None:
            nonlocal peak, killed
            try:
                root = psutil.Process(proc.pid)
            except psutil.Error:
                return
            while not done.wait(SAMPLE_S):
                procs = family(root)
                peak = max(peak, tree_rss(procs))
                if max_rss_mb and peak > max_rss_mb * 1e6:
                    killed = True
                    for p in reversed(procs):  # descendants first, then the stage
                        try:
                            p.kill()
                        except psutil.Error:
                            pass
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        status = proc.wait()
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    lines = log.read_text(errors="replace").splitlines()
    if killed:
        raise StageFailed(f"{stage} killed after {seconds:.0f} s: its processes held over {max_rss_mb:.0f} MB (RSS)")
    if status != 0:
        raise StageFailed(f"{stage} exited {status} in {ws}:\n  " + "\n  ".join(lines[-8:]))
    summary = next((line for line in reversed(lines) if line.startswith(f"{stage}: ")), "")
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(peak / 1e6, 1), "summary": summary}


# --- workspaces -----------------------------------------------------------------------------------


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def run_params(params: dict, run: str) -> dict:
    """params.yaml for one run: the baseline's without the keys its code rejects, else data.engine set."""
    params = json.loads(json.dumps(params))
    if run == "baseline":
        for dotted in NEW_KEYS:
            *path, key = dotted.split(".")
            section = params
            for name in path:
                section = section.get(name) or {}
            section.pop(key, None)
    else:
        params["data"]["engine"] = run
    return params


def make_workspace(ws: Path, params: dict, raw: Path | None = None) -> Path:
    """A project folder holding params.yaml and (hard links to) an ingested data/raw."""
    ws.mkdir(parents=True)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if raw is not None:
        shutil.copytree(raw, ws / "data" / "raw", copy_function=os.link)
    return ws


def export_baseline(dest: Path) -> Path:
    """The baseline's code (pipelines/ and model/ at BASELINE_COMMIT) under dest."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", BASELINE_COMMIT, "pipelines", "model"], cwd=REPO, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def ingest(ws: Path) -> float:
    """Run the ingest stage (current code) into ws/data/raw; the raw corpus size in MB."""
    subprocess.run(
        [sys.executable, "-m", "pipelines.ingest", "--root", str(ws)], cwd=REPO, check=True, stdout=subprocess.DEVNULL
    )
    manifest = json.loads((ws / "data" / "raw" / "manifest.json").read_text())
    return sum(f["bytes"] for f in manifest["files"]) / 1e6


# --- what the runs produced -----------------------------------------------------------------------


def without_times(value):
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if not TIME_KEY.search(k)}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def fingerprint(ws: Path) -> dict[str, str]:
    """sha256 of every output file, and each metric but the time fields."""
    out = {}
    for folder in COMPARED:
        for path in sorted((ws / folder).rglob("*")):
            if path.is_file():
                out[path.relative_to(ws).as_posix()] = sha256_file(path)
    for name in ("metrics/clean.json", "metrics/tokenize.json"):
        out.update(flatten(without_times(json.loads((ws / name).read_text())), f"{name}:"))
    return out


def flatten(value, prefix: str) -> dict[str, str]:
    """{"metrics/clean.json:splits.train.docs": "123", ...}: a differing metric names itself."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): json.dumps(value, sort_keys=True)}


def differences(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def duplicate_quality(ws: Path, truth: dict, prefix: str) -> dict:
    """Recall and precision of the planted copies in reports/clean/files.json. An original and its copies form a
    group; a document marked duplicate or near_duplicate of another member of its group is a hit (the clean stage
    keeps the first in path order, which may be the copy). Recall = hits / planted copies, precision = hits /
    documents marked; `unplanted` counts marked documents that are not hits."""
    group: dict[str, str] = {}
    copies: Counter[str] = Counter()
    for p in truth["planted"]:
        group[prefix + p["copy"]] = group[prefix + p["of"]] = prefix + p["of"]
        copies[prefix + p["of"]] += 1
    docs = json.loads((ws / "reports" / "clean" / "files.json").read_text())
    marked = [d for d in docs if d["outcome"] in ("duplicate", "near_duplicate")]
    hits: Counter[str] = Counter()
    unplanted = []
    for d in marked:
        g = group.get(d["file"])
        if g is not None and group.get(d["duplicate_of"]) == g:
            hits[g] += 1
        else:
            unplanted.append({k: d[k] for k in ("file", "outcome", "duplicate_of", "reason")})
    found = sum(min(hits[g], n) for g, n in copies.items())
    missed = [p for p in truth["planted"] if hits[prefix + p["of"]] < copies[prefix + p["of"]]]
    planted = sum(copies.values())
    return {
        "recall": round(found / planted, 4) if planted else 1.0,
        "precision": round(found / len(marked), 4) if marked else 1.0,
        "planted": planted,
        "marked": len(marked),
        "unplanted": len(unplanted),
        "outcomes": dict(sorted(Counter(d["outcome"] for d in docs).items())),
        "unplanted_examples": unplanted[:5],
        "missed_examples": missed[:5],
    }


# --- the benchmark --------------------------------------------------------------------------------


def run_pipeline(ws: Path, code_dir: Path, max_rss_mb: float | None) -> dict:
    result = {stage: run_stage(stage, ws, code_dir, max_rss_mb) for stage in STAGES}
    result["seconds"] = round(sum(result[s]["seconds"] for s in STAGES), 3)
    result["peak_rss_mb"] = max(result[s]["peak_rss_mb"] for s in STAGES)
    return result


def bench_size(
    megabytes: int, root: Path, runs: list[str], baseline_code: Path | None, seed: int, max_rss_mb: float | None
) -> dict:
    """Generate, ingest and run one corpus size through every run; the per-run results and output comparisons."""
    corpus = write_corpus(root, megabytes, seed)
    print(
        f"\n{megabytes} MB corpus: {corpus['documents']} documents in {corpus['files']} files "
        f"({corpus['exact_copies']} exact and {corpus['near_copies']} near copies planted), "
        f"written in {corpus['seconds']} s",
        flush=True,
    )
    params = repo_params()
    params["data"]["sources"] = [{"type": "local", "path": str(root / "corpus")}]
    ingested = make_workspace(root / "ingest", run_params(params, "local"))
    raw_mb = ingest(ingested)
    truth = json.loads((root / "truth.json").read_text())
    prefix = "local-corpus/"  # the ingest stage's folder for a local source named corpus
    results: dict = {"raw_mb": round(raw_mb, 2), "corpus": corpus, "runs": {}}
    prints = {}
    for run in runs:
        ws = make_workspace(root / run, run_params(params, run), ingested / "data" / "raw")
        code = baseline_code if run == "baseline" else REPO
        try:
            r = run_pipeline(ws, code, max_rss_mb)
        except StageFailed as exc:
            print(f"  {run}: FAILED: {exc}", flush=True)
            results["runs"][run] = {"error": str(exc)}
            continue
        r["mb_per_s"] = round(raw_mb / r["seconds"], 3)
        r["duplicates"] = duplicate_quality(ws, truth, prefix)
        prints[run] = fingerprint(ws)
        results["runs"][run] = r
        print(
            f"  {run:>8}: clean {r['clean']['seconds']:.1f} s, tokenize {r['tokenize']['seconds']:.1f} s, "
            f"{r['mb_per_s']:.2f} MB/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"recall {r['duplicates']['recall']:.4f}, precision {r['duplicates']['precision']:.4f}",
            flush=True,
        )
    for a, b in (("local", "ray"), ("baseline", "local")):
        if a in prints and b in prints:
            diff = differences(prints[a], prints[b])
            results[f"{b}_vs_{a}_differences"] = diff
            more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
            print(f"  {b} outputs vs {a}'s: {'differ in ' + ', '.join(diff[:6]) + more if diff else 'identical'}")
    return results


def bench_default(root: Path, baseline_code: Path | None, repeats: int, max_rss_mb: float | None) -> dict:
    """clean + tokenize on the default corpus (params.yaml as is): baseline and local, alternating, best of
    `repeats`."""
    ingested = make_workspace(root / "ingest", repo_params())
    raw_mb = ingest(ingested)
    runs = (["baseline"] if baseline_code else []) + ["local"]
    best: dict[str, dict] = {}
    for i in range(repeats):
        for run in runs:
            ws = make_workspace(root / f"{run}-{i}", run_params(repo_params(), run), ingested / "data" / "raw")
            r = run_pipeline(ws, baseline_code if run == "baseline" else REPO, max_rss_mb)
            if run not in best or r["seconds"] < best[run]["seconds"]:
                best[run] = r
    print(
        f"\ndefault corpus ({raw_mb:.1f} MB), clean + tokenize, best of {repeats}: "
        + ", ".join(f"{run} {r['seconds']:.2f} s" for run, r in best.items()),
        flush=True,
    )
    return {"raw_mb": round(raw_mb, 2), "runs": best}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def checks(sizes: dict[int, dict], default: dict | None) -> list[dict]:
    """Each target of the issue, measured: name, size, value, PASS/FAIL (n/a where a run is missing)."""

    def run(size: int, name: str, key: str):
        r = sizes[size]["runs"].get(name, {})
        return r.get(key) if "error" not in r else None

    out = []
    largest, smallest = max(sizes), min(sizes)

    def add(name: str, size: int | None, value) -> None:
        op, bound = TARGETS[name]
        if value is None:
            verdict = "n/a"
        else:
            ok = {">=": value >= bound, "<=": value <= bound, "<": value < bound, "==": value == bound}[op]
            verdict = "PASS" if ok else "FAIL"
        out.append({"check": name, "size_mb": size, "value": value, "target": f"{op} {bound}", "verdict": verdict})

    for size, result in sizes.items():
        runs = result["runs"]
        if "baseline" in runs:
            add(
                "local / baseline throughput",
                size,
                ratio(run(size, "local", "mb_per_s"), run(size, "baseline", "mb_per_s")),
            )
        if "ray" in runs:
            add("ray / local throughput", size, ratio(run(size, "ray", "mb_per_s"), run(size, "local", "mb_per_s")))
            diff = result.get("ray_vs_local_differences")
            add("ray outputs identical to local", size, None if diff is None else not diff)
        dup = run(size, "local", "duplicates")
        add("recall of planted duplicates", size, dup and dup["recall"])
        add("precision of planted duplicates", size, dup and dup["precision"])
    peak = run(largest, "local", "peak_rss_mb")
    add("local peak RSS (GB)", largest, peak and round(peak / 1e3, 3))
    if largest != smallest:
        add(
            "local peak RSS, largest / smallest size",
            largest,
            ratio(run(largest, "local", "peak_rss_mb"), run(smallest, "local", "peak_rss_mb")),
        )
    if default and "baseline" in default["runs"]:
        times = {k: v["seconds"] for k, v in default["runs"].items()}
        add("default corpus: local / baseline time", None, ratio(times["local"], times["baseline"]))
    return out


def table(sizes: dict[int, dict]) -> str:
    head = f"{'size':>7} {'run':>8} {'clean s':>8} {'tok s':>8} {'MB/s':>7} {'RSS MB':>7} {'recall':>7} {'prec':>7} {'unpl':>5}"
    lines = [head, "-" * len(head)]
    for size, result in sizes.items():
        for name, r in result["runs"].items():
            if "error" in r:
                lines.append(f"{size:>5}MB {name:>8}   failed")
                continue
            d = r["duplicates"]
            lines.append(
                f"{size:>5}MB {name:>8} {r['clean']['seconds']:>8.1f} {r['tokenize']['seconds']:>8.1f} "
                f"{r['mb_per_s']:>7.2f} {r['peak_rss_mb']:>7.0f} {d['recall']:>7.4f} {d['precision']:>7.4f} "
                f"{d['unplanted']:>5}"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="corpus sizes in MB, comma-separated (default 100,1000)")
    parser.add_argument("--engines", default="local,ray", help="data.engine values to run (default local,ray)")
    parser.add_argument("--skip-baseline", action="store_true", help=f"no runs of commit {BASELINE_COMMIT}")
    parser.add_argument("--skip-default", action="store_true", help="no default-corpus check")
    parser.add_argument("--seed", type=int, default=0, help="corpus generator seed")
    parser.add_argument(
        "--workdir", type=Path, help="where corpora and workspaces go (absent or empty; default: a temp dir)"
    )
    parser.add_argument("--max-rss-gb", type=float, help="kill a stage whose processes hold more (default: no limit)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    engines = [e for e in args.engines.split(",") if e]
    if unknown := set(engines) - {"local", "ray"}:
        parser.error(f"--engines: unknown {sorted(unknown)}; choose from local, ray")
    if args.workdir and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="data_scale-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"workdir {workdir}; {os.cpu_count()} CPUs; runs: {'' if args.skip_baseline else 'baseline, '}{', '.join(engines)}"
    )
    try:
        baseline_code = None if args.skip_baseline else export_baseline(workdir / "baseline-code")
        runs = ([] if args.skip_baseline else ["baseline"]) + engines
        max_rss_mb = args.max_rss_gb * 1e3 if args.max_rss_gb else None
        results = {
            size: bench_size(size, workdir / f"mb-{size}", runs, baseline_code, args.seed, max_rss_mb) for size in sizes
        }
        default = None if args.skip_default else bench_default(workdir / "default", baseline_code, 2, max_rss_mb)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    verdicts = checks(results, default)
    print("\n" + table(results))
    print("\n(unpl: documents marked duplicate that are no planted copy)\n")
    for c in verdicts:
        where = f"{c['size_mb']} MB" if c["size_mb"] is not None else "default"
        print(f"{c['verdict']:>4}  {c['check']} ({where}): {c['value']} (target {c['target']})")
    largest = results[max(results)]["runs"]
    summary = {
        "benchmark": "data_scale",
        "ours": largest.get("local", {}).get("mb_per_s"),
        "baseline": largest.get("baseline", {}).get("mb_per_s"),
        "unit": "MB/s",
        "ratio": ratio(largest.get("local", {}).get("mb_per_s"), largest.get("baseline", {}).get("mb_per_s")),
        "size_mb": max(results),
        **{v.lower(): sum(c["verdict"] == v for c in verdicts) for v in ("PASS", "FAIL", "n/a")},
        "cpus": os.cpu_count(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    if args.json:
        args.json.write_text(
            json.dumps({**summary, "sizes": results, "default_corpus": default, "checks": verdicts}, indent=1) + "\n"
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
