"""pipelines/common/layout.py: the one declaration of what each stage reads and writes, checked against dvc.yaml."""

from __future__ import annotations

import pytest
import yaml

from pipelines.common.layout import PROJECT, STAGE_IO
from tests.helpers.paths import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PACKAGES = ("model", "pipelines")  # code, not data


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def data_paths(entries: list) -> set[str]:
    """dvc.yaml's deps/outs/metrics/plots entries (plain strings or {path: options}) without the code."""
    paths = {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}
    return {p for p in paths if p.split("/")[0] not in PACKAGES}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_the_layout_declares_what_dvc_wires(stage):
    """pipelines/common/layout.py's STAGE_IO names exactly the data each dvc.yaml stage lists."""
    spec, io = STAGES[stage], STAGE_IO[stage]
    reads = {str(getattr(PROJECT, name)) for name in io["reads"]}
    assert reads == data_paths(spec["deps"]), f"{stage}: the layout's reads vs dvc.yaml's deps"
    writes = {str(getattr(PROJECT, name)) for name in io["writes"]}
    outs = data_paths(spec.get("outs")) | data_paths(spec.get("metrics")) | data_paths(spec.get("plots"))
    # a plot file lies in a plots folder the stage writes whole
    assert {next((w for w in writes if covered(o, [w])), o) for o in outs} == writes, f"{stage}: outs vs writes"


def test_every_stage_is_declared_and_takes_root(tmp_path):
    assert set(STAGE_IO) == set(STAGES)
    moved = PROJECT.under(tmp_path)
    assert all(str(getattr(moved, f)).startswith(str(tmp_path)) for f in ("raw", "model", "eval_metrics", "params"))
    assert moved.key(moved.tokens) == "data/tokens" == str(PROJECT.tokens)
