"""Worker-side metrics on a real SAE, read back as the API server exposes them (snapshot, merge,
prometheus_client's exposition, parsed by prometheus_client's parser)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sae_factory import make_sae
from steer_plugin.api import worker_metrics
from steer_plugin.core.metric_families import Family, merge
from steer_plugin.core.spec import Limits, parse_clamps
from steer_plugin.worker import metrics


def _samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(name: str, labels: dict | None = None) -> float:
    exposed = _samples(worker_metrics.exposition(merge([metrics.snapshot()])).decode())
    return exposed.get((name, tuple(sorted((labels or {}).items()))), 0.0)


def test_a_worker_histogram_is_exposed_as_prometheus_client_would_expose_it():
    """Buckets, sum and count of the worker's Series equal prometheus_client's own Histogram fed one
    value at a time (the same `le` edges), once two workers' snapshots are merged."""
    values = np.array([0.0, 0.5, 1.0, 3.0, 3.0, 100.0])
    registry = CollectorRegistry()
    one = Histogram("steer_test_hist", "test", buckets=(0.5, 1, 4), registry=registry)
    for v in np.concatenate([values, values]):
        one.observe(float(v))
    family = Family("steer_test_hist", "test", "histogram", (), (0.5, 1, 4))
    many = metrics.Series(family)
    many.observe_many(values)
    snapshot = {family.name: {(): many.snapshot_value()}}
    theirs = {k: v for k, v in _samples(generate_latest(registry).decode()).items() if not k[0].endswith("_created")}
    merged = merge([snapshot, snapshot], (family,))
    ours = _samples(worker_metrics.exposition(merged, families=(family,)).decode())
    assert ours == pytest.approx(theirs)


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
    exported = {int(feature) for sae_id, feature in metrics.snapshot()["steer_feature_active_tokens"]
                if sae_id == "sae"}
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
