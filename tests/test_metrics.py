"""Worker-side metrics on a real SAE, read back from prometheus_client's registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY, Histogram

from sae_factory import make_sae
from steer_plugin.core.spec import Limits, parse_clamps
from steer_plugin.worker import metrics


def _value(name: str, labels: dict | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_observe_many_equals_one_observe_per_value():
    values = np.array([0.0, 0.5, 1.0, 3.0, 3.0, 100.0])
    one, many = (Histogram(f"steer_test_{n}", "test", buckets=(0.5, 1, 4)) for n in ("one", "many"))
    for v in values:
        one.observe(float(v))
    metrics.observe_many(many, values)
    for suffix in ("_bucket", "_sum", "_count"):
        ones = {tuple(s.labels.items()): s.value for m in one.collect() for s in m.samples if s.name.endswith(suffix)}
        manys = {tuple(s.labels.items()): s.value for m in many.collect() for s in m.samples if s.name.endswith(suffix)}
        assert ones == pytest.approx(manys)


def test_feature_activity_counts_watched_clamped_and_top_features():
    sae = make_sae("topk", d_in=32, d_sae=128, k=8)
    activity = metrics.FeatureActivity("sae", 128, sample_every=2, watch=(5,), top_n=3)
    limits = Limits.one(d_sae=128, max_clamps=4, max_activation=None)
    activity.pin_clamped(parse_clamps([{"feature": 9, "value": 1.0}], limits))
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(0))
    sampled = _value("steer_feature_sampled_tokens_total", {"sae": "sae"})
    l0_count = _value("steer_active_features_count", {"sae": "sae"})
    due = [activity.due() for _ in range(4)]
    assert due == [False, True, False, True]  # every 2nd step
    activity.observe(sae, x)
    assert _value("steer_feature_sampled_tokens_total", {"sae": "sae"}) == sampled + 20
    assert _value("steer_active_features_count", {"sae": "sae"}) == l0_count + 20
    f, _ = sae.encode(x)
    fired = (f > 0).sum(0)
    for feature in (5, 9):  # watched and clamped: exported, with their exact count
        assert _value("steer_feature_active_tokens_total", {"sae": "sae", "feature": str(feature)}) >= fired[feature].item()
    exported = {int(s.labels["feature"]) for m in metrics.FEATURE_ACTIVE.collect() for s in m.samples
                if s.name.endswith("_total")}
    assert set(torch.topk(fired, 3).indices.tolist()) <= exported | set(np.flatnonzero(activity.pinned))


def test_new_clamp_plans_count_clamps_by_mode():
    limits = Limits.one(d_sae=16, max_clamps=4, max_activation=None)
    plan = parse_clamps([{"feature": 1, "value": 1.0}, {"feature": 2, "value": 2.0, "mode": "scale"},
                         {"feature": 3, "value": 0.5, "mode": "scale"}], limits)
    before = {m: _value("steer_clamps_applied_total", {"sae": "sae", "mode": m}) for m in ("set", "scale")}
    metrics.record_new_plan("sae", plan)
    assert _value("steer_clamps_applied_total", {"sae": "sae", "mode": "set"}) == before["set"] + 1
    assert _value("steer_clamps_applied_total", {"sae": "sae", "mode": "scale"}) == before["scale"] + 2


def test_a_non_finite_reconstruction_error_is_counted_apart_not_summed():
    """A stream overflowed by a huge clamp gives inf/inf = NaN: a Prometheus sum never recovers from
    one NaN, so such tokens are counted on their own and the histogram keeps only finite values."""
    activity = metrics.FeatureActivity("nan_sae", 16, sample_every=1, watch=(), top_n=0)
    err = np.array([0.1, np.nan, np.inf, 0.2])
    activity._export(np.zeros(16, dtype=np.int64), np.array([1, 2, 3, 4]), err)
    labels = {"sae": "nan_sae"}
    assert _value("steer_reconstruction_relative_error_sum", labels) == pytest.approx(0.3)
    assert _value("steer_reconstruction_relative_error_count", labels) == 2
    assert _value("steer_reconstruction_nonfinite_tokens_total", labels) == 2
