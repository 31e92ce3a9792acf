"""Attention sinks (a stream norm far above the median) are left out of what an SAE is trained and
evaluated on, with every row's document and position kept aligned; a capture kept on disk is read
back with torch's restricted unpickler."""

import pickle
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from steer_workbench.capture import SINK_NORM, Capture, cached_capture, is_sink


def _capture(acts: torch.Tensor) -> Capture:
    n = acts.shape[0]
    return Capture(acts, np.arange(n, dtype=np.int32) // 4, np.arange(n, dtype=np.int32) % 4 + 1,
                   [[0] * 5 for _ in range((n + 3) // 4)])


def test_a_position_with_a_hundred_times_the_median_norm_is_left_out_and_rows_stay_aligned():
    torch.manual_seed(0)
    acts = torch.randn(40, 16)
    acts[9] *= 100  # document 2, position 2
    acts[30] *= SINK_NORM * 0.5  # large, but not a sink
    cap = _capture(acts)
    assert is_sink(acts).nonzero()[:, 0].tolist() == [9]
    kept = cap.without_sinks()
    assert kept.acts.shape[0] == 39 and kept.tokens is cap.tokens
    assert (2, 2) not in set(zip(kept.doc.tolist(), kept.pos.tolist()))
    assert torch.equal(kept.acts[9], acts[10]) and (kept.doc[9], kept.pos[9]) == (cap.doc[10], cap.pos[10])
    assert torch.equal(kept.acts[29], acts[30])


def test_a_capture_without_sinks_is_returned_as_it_is():
    cap = _capture(torch.randn(12, 8))
    assert cap.without_sinks() is cap


def test_a_saved_capture_is_read_back_by_the_restricted_unpickler_and_nothing_else_is(tmp_path):
    cap = _capture(torch.randn(12, 8))
    path = tmp_path / "capture.pt"
    torch.save({"key": "k", "capture": asdict(cap)}, path)
    read = cached_capture(path, "k", None, None, [], 15, 64, 8)  # the same key: no model needed
    assert torch.equal(read.acts, cap.acts) and read.tokens == cap.tokens
    assert read.doc.dtype == np.int32 and np.array_equal(read.doc, cap.doc) and np.array_equal(read.pos, cap.pos)
    torch.save({"key": "k", "capture": {**asdict(cap), "doc": Path("/")}}, path)  # an object beyond tensors and arrays
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        cached_capture(path, "k", None, None, [], 15, 64, 8)
