"""flows/tasks.py: each stage task ends with one line saying what the stage did."""

from __future__ import annotations

import json

import yaml
from prefect.artifacts import ProgressArtifact

from flows.repro import Repro
from flows.tasks import progress_key, what_it_did
from tests.helpers.paths import REPO


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


def test_the_chat_stages_say_what_they_did(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "chat.json").write_text(json.dumps({"conversations_in": 90, "conversations_out": 80}))
    chat_eval = {"response_bpb": 1.5, "base_response_bpb": 2.25, "eot_rate": 0.95, "base_eot_rate": 0.0}
    (tmp_path / "metrics" / "chat_eval.json").write_text(json.dumps({**chat_eval, "conversations": 40}))
    assert what_it_did(Repro("chat_data", True, 2.0)) == "chat_data: ran in 2 s; 80 of 90 conversations kept"
    assert what_it_did(Repro("chat_eval", True, 9.0)) == (
        "chat_eval: ran in 9 s; response_bpb 1.500 vs base 2.250; end-of-turn rate 0.95 vs base 0.00 (40 conversations)"
    )
    assert what_it_did(Repro("finetune", False, 1.0)) == "finetune: up to date (DVC skipped it)"


def test_every_stage_has_a_progress_key_prefect_takes():
    """Prefect refuses an artifact key with an underscore (chat_eval's), which failed the task mid-stage."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "chat_eval" in stages
    for stage in stages:
        ProgressArtifact(key=progress_key(stage), progress=0.0)  # pydantic checks the key here, as Prefect does
