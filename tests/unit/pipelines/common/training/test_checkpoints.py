"""pipelines/common/training/checkpoints.py: safetensors checkpoints, torn ones skipped."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.common.training import checkpoints as ckpt


def test_checkpoint_round_trip_keeps_types_and_shared_tensors(tmp_path):
    w = torch.randn(4, 3)
    obj = {
        "state_dict": {"a": w, "b": w, "bf16": torch.ones(2, dtype=torch.bfloat16)},
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1]}],
            }
        ],
        "loops": {"x": {"n": 3, "flag": True, "none": None, "nan": float("nan")}},
        "rng": np.arange(5, dtype=np.uint32),
        "empty": torch.empty(0),
    }
    path = tmp_path / "step-00000001.ckpt"
    ckpt.save(obj, path)
    back = ckpt.load(path)
    assert torch.equal(back["state_dict"]["a"], w) and back["state_dict"]["a"] is back["state_dict"]["b"]
    assert back["state_dict"]["bf16"].dtype == torch.bfloat16
    state = back["optimizer_states"][0]
    assert list(state["state"]) == [0] and torch.equal(state["state"][0]["step"], torch.tensor(3.0))
    assert state["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["loops"]["x"]["n"] == 3 and back["loops"]["x"]["flag"] is True and back["loops"]["x"]["none"] is None
    assert math.isnan(back["loops"]["x"]["nan"])
    assert np.array_equal(back["rng"], np.arange(5)) and back["empty"].numel() == 0
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(TypeError, match="cannot store object"):
        ckpt.save({"bad": object()}, tmp_path / "x.ckpt")


def test_torn_or_corrupt_checkpoints_are_skipped_with_a_warning(tmp_path):
    for step in (4, 8, 12):
        ckpt.save({"global_step": step, "w": torch.full((1000,), float(step))}, ckpt.checkpoint_path(tmp_path, step))
    newest, middle = ckpt.checkpoint_path(tmp_path, 12), ckpt.checkpoint_path(tmp_path, 8)
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    data = bytearray(middle.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the tensor data
    middle.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="skipping checkpoint") as record:
        path, content = ckpt.latest_valid(tmp_path)
    assert path == ckpt.checkpoint_path(tmp_path, 4) and content["global_step"] == 4
    assert len(record) == 2 and "CRC" in str(record[1].message)
    (tmp_path / "step-00000016.ckpt").write_bytes(b"garbage")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [16, 12, 8, 4]
    (tmp_path / ".step-00000020.ckpt.abc.tmp").write_bytes(b"half")
    ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000012.ckpt", "step-00000016.ckpt"]
