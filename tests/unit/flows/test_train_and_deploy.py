"""flows/train_and_deploy.py: each stage task ends with one line saying what the stage did."""

from __future__ import annotations

import json

from flows.repro import Repro
from flows.train_and_deploy import what_it_did


def test_each_stage_task_ends_with_what_the_stage_did(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    clean = {"docs_in": 93, "docs_out": 51, "exact_duplicates": 7, "near_duplicates": 35, "dropped": {"x": 0}}
    (tmp_path / "metrics" / "clean.json").write_text(json.dumps({**clean, "quarantined": 0}))
    assert what_it_did(Repro("clean", True, 3.4)) == (
        "clean: ran in 3 s; 51 of 93 documents kept (7 exact and 35 near duplicates, 0 dropped or quarantined)"
    )
    assert what_it_did(Repro("tokenize", False, 1.0)) == "tokenize: up to date (DVC skipped it)"
    assert what_it_did(Repro("ingest", True, 2.0)) == "ingest: ran in 2 s"
