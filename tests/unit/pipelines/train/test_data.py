"""pipelines/train/data.py: the token windows a step reads, a pure function of the step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.train.data import DataError, TrainWindows, val_offsets, window_offsets


def test_data_order_is_a_pure_function_of_step_micro_and_rank():
    args = dict(n_tokens=100_000, block_size=64, batch_size=8, seed=3)
    a = window_offsets(**args, step=5, micro=1, rank=0)
    assert np.array_equal(a, window_offsets(**args, step=5, micro=1, rank=0))
    for other in (dict(step=6, micro=1, rank=0), dict(step=5, micro=0, rank=0), dict(step=5, micro=1, rank=1)):
        assert not np.array_equal(a, window_offsets(**args, **other))
    assert not np.array_equal(a, window_offsets(**{**args, "seed": 4}, step=5, micro=1, rank=0))
    assert a.min() >= 0 and a.max() <= 100_000 - 65


def test_a_stream_resumed_mid_run_reads_exactly_what_an_uninterrupted_one_reads():
    tokens = np.arange(5000, dtype=np.uint16)
    full = TrainWindows(tokens, block_size=16, batch_size=3, grad_accum=2, seed=1, rank=0)
    resumed = TrainWindows(tokens, block_size=16, batch_size=3, grad_accum=2, seed=1, rank=0, start=6)
    it_full, it_resumed = iter(full), iter(resumed)
    uninterrupted = [next(it_full) for _ in range(10)]
    for k in range(6, 10):
        assert torch.equal(uninterrupted[k], next(it_resumed))
    batch = uninterrupted[0]
    assert batch.shape == (3, 17) and batch.dtype == torch.int64
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(3, 16, dtype=torch.int64))  # contiguous windows


def test_val_windows_are_fixed_and_span_the_split():
    offsets = val_offsets(10_000, 64, 8)
    assert np.array_equal(offsets, val_offsets(10_000, 64, 8))
    assert offsets[0] == 0 and offsets[-1] == 10_000 - 65


def test_too_little_data_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one window"):
        window_offsets(50, 64, 2, 0, 0, 0, 0)
