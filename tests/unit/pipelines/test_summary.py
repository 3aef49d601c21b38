"""pipelines.summary: the end of `make run`, from the metrics files the stages write."""

import json
from pathlib import Path

import pytest

from pipelines.summary import main, summary_rows

TRAIN = {
    "mfu": None,
    "params": 1328256,
    "resumed_from_step": 400,
    "steps": 1200,
    "tokens_per_s": 9004.9,
    "tokens_seen": 4915200,
    "train_loss": 3.93,
    "val_bpb": 1.929,
    "val_loss": 4.02,
}
EVAL = {
    "num_fewshot": "0,5",
    "test_bpb": 1.9197,
    "test_ppl": 55.99,
    "test_loss": 4.03,
    "quill_nextline": {"0shot": {"acc": 0.2948, "acc_norm": 0.3757}, "5shot": {"acc": 0.2775, "acc_norm": 0.3237}},
    "reference": {"ngram_bpb": 2.2043, "ngram_order": 5, "uniform_bpb": 3.967},
    "samples": {"bleu": 1.18, "count": 7, "rougeL": 0.107},
}
REGISTERED = {
    "aliases": ["champion"],
    "model_name": "quill-gpt",
    "version": "4",
    "why": "first version: no champion yet",
}


def write(root: Path, rel: str, data: dict) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(json.dumps(data))


def test_rows_carry_the_headline_numbers(tmp_path):
    write(tmp_path, "metrics/train.json", TRAIN)
    write(tmp_path, "metrics/eval.json", EVAL)
    write(tmp_path, "artifacts/registered.json", REGISTERED)
    rows = summary_rows(tmp_path)
    text = "\n".join(line for _, line in rows)
    assert "1.33M params, 1200 steps" in text and "resumed from step 400" in text and "val_bpb 1.929" in text
    assert "test_bpb 1.920 (reference: byte n-gram 2.204, uniform 3.967)" in text
    assert "quill_nextline  0shot: acc 0.2948, acc_norm 0.3757; 5shot: acc 0.2775" in text
    assert "7 samples" in text and "num_fewshot" not in text and "reference  " not in text
    assert "quill-gpt v4 -> champion: first version" in text
    assert dict(rows)["clean"] == dict(rows)["tokenize"] == "not run yet (dvc repro)"


def test_nothing_run_yet_and_a_corrupt_file(tmp_path, capsys):
    assert main(["--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("not run yet") == 5
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/train.json").write_text("{half")
    with pytest.raises(SystemExit, match=r"metrics/train.json is not valid JSON.*dvc repro"):
        summary_rows(tmp_path)
