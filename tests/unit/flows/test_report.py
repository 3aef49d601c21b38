"""flows/report.py: the Markdown a flow run leaves in the Prefect UI."""

from __future__ import annotations

import yaml

from flows.report import summary_markdown
from tests.helpers.paths import REPO


def test_the_summary_tells_the_run_forms_values_from_changes(tmp_path, monkeypatch):
    """The Run form sends every knob at params.yaml's value unless changed: the summary says which differ."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(max_steps=50, lr=0.004, min_lr=0.0004)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    text = summary_markdown({}, {"train.max_steps": 50, "train.lr": 0.002}, None, None, "sqlite:///x.db", None, None)
    assert "| `train.max_steps` | `50` | same |" in text
    assert "| `train.lr` | `0.002` | `0.004` |" in text
