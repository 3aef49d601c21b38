"""The task pack (pipelines/common/task_pack.py): deterministic, well-formed items, and its perplexity task run
through lm-eval gives the held-out bits per byte."""

from __future__ import annotations

import json

import pytest

from pipelines.common.lm_eval_adapter import QuillLM
from pipelines.common.task_pack import TASKS, build_task_pack
from tests.helpers.evaluation import held_out_docs, read_split


def test_task_pack_is_deterministic_and_well_formed(project, tmp_path):
    test, val = read_split(project, "test"), read_split(project, "val")
    a = build_task_pack(test, val, tmp_path / "a", max_items=5, seed=7)
    b = build_task_pack(test, val, tmp_path / "b", max_items=5, seed=7)
    c = build_task_pack(test, val, tmp_path / "c", max_items=5, seed=8)
    assert a == b and set(a) == set(TASKS) and a["quill_perplexity"] == len(test)
    for f in sorted((tmp_path / "a").iterdir()):
        other = (tmp_path / "b" / f.name).read_text()
        assert f.read_text().replace(str(tmp_path / "a"), "X") == other.replace(str(tmp_path / "b"), "X")
    assert c == a  # the same number of items per task, drawn differently:
    assert any(
        (tmp_path / "a" / f.name).read_text().replace(str(tmp_path / "a"), "X")
        != (tmp_path / "c" / f.name).read_text().replace(str(tmp_path / "c"), "X")
        for f in (tmp_path / "a").iterdir()
    )
    assert (tmp_path / "a/quill_cloze.test.jsonl").read_text() != (tmp_path / "c/quill_cloze.test.jsonl").read_text()
    for line in open(tmp_path / "a/quill_cloze.test.jsonl"):
        item = json.loads(line)
        assert item["target"].startswith(" ") and item["target"].strip().isalpha() or "'" in item["target"]
        assert item["context"] == item["context"].rstrip()
    for line in open(tmp_path / "a/quill_nextline.test.jsonl"):
        item = json.loads(line)
        assert len(set(item["choices"])) == 4
        assert item["context"] + "\n" + item["choices"][item["label"]] in test[item["doc"]]
    assert [json.loads(x)["text"] for x in open(tmp_path / "a/quill_perplexity.test.jsonl")] == test


def test_rolling_task_agrees_with_held_out_metric(engine, project, tmp_path):
    """quill_perplexity through lm-eval gives the held-out bits per byte (same windows, same documents)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pipelines.common.heldout import held_out

    test = read_split(project, "test")
    build_task_pack(test, read_split(project, "val"), tmp_path / "pack", max_items=5, seed=1)
    lm = QuillLM(engine=engine, batch_size=8, stride=24)
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=["quill_perplexity"],
        num_fewshot=0,
        log_samples=False,
        task_manager=TaskManager(include_path=str(tmp_path / "pack"), include_defaults=False),  # the pack alone: fast
        bootstrap_iters=0,
    )
    task = res["results"]["quill_perplexity"]
    meta = json.loads((project / "data/tokens/meta.json").read_text())
    ref = held_out(engine.model, held_out_docs(project), 0, meta["splits"]["test"]["bytes"], 24, 8, desc=None)
    assert task["bits_per_byte,none"] == pytest.approx(ref["test_bpb"], rel=1e-5)
    assert task["byte_perplexity,none"] == pytest.approx(2 ** ref["test_bpb"], rel=1e-5)
