"""The worker-side metric families (`steer_*`): one schema for the worker, which records them in its
own process (`worker/metrics.py`), and the API server, which collects them from every worker of
every engine over vLLM's RPC and exposes them on /metrics (`api/worker_metrics.py`).

Why not prometheus_client's own multiprocess mode: its shared directory is local to one host (a
worker on another node, or a `--headless` node, never reaches it) and it must be set in the
environment before vLLM starts, which Ray's workers do not inherit.

A snapshot, what one worker sends: {family name: {label values: value}}, where a value is a float
for counters and gauges and `(bucket counts, sum)` for histograms, the counts per bucket (not
cumulative) with the last for +Inf.
"""

from __future__ import annotations

from dataclasses import dataclass

Snapshot = dict[str, dict[tuple[str, ...], "float | tuple[list[int], float]"]]


@dataclass(frozen=True)
class Family:
    """One metric family."""

    name: str
    """Exposition name (counters get `_total` appended)."""
    help: str
    kind: str
    """"counter", "histogram" or "gauge"."""
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    """Histograms: the finite upper bounds, ascending (+Inf is implied)."""


CLAMPS_APPLIED = Family("steer_clamps_applied", "Clamps of admitted requests taken into the clamp table, by mode",
                        "counter", ("sae", "mode"))
VECTORS_APPLIED = Family("steer_vectors_applied", "Steering vectors of admitted requests taken into the vector table",
                         "counter", ("vector",))
FAILED = Family("steer_requests_failed", "Requests failed with an error because their clamps could not be prepared "
                "or applied (the engine and the other requests go on)", "counter")
STEERED_TOKENS = Family("steer_steered_tokens", "Token positions whose residual stream the op edited", "counter",
                        ("sae",))
FEATURE_ACTIVE = Family("steer_feature_active_tokens",
                        "Sampled tokens on which the feature was active (watch-list, clamped and top-N features)",
                        "counter", ("sae", "feature"))
SAMPLED_TOKENS = Family("steer_feature_sampled_tokens", "Tokens encoded for feature-activity metrics", "counter",
                        ("sae",))
L0 = Family("steer_active_features", "Active SAE features per sampled token (L0)", "histogram", ("sae",),
            (0, 1, 2, 4, 8, 16, 24, 32, 40, 48, 64, 96, 128, 256, 512, 1024))
RECON_ERROR = Family("steer_reconstruction_relative_error",
                     "Per sampled token |x - sae(x)|^2 / |x|^2 at the SAE layer (finite values only: see "
                     "steer_reconstruction_nonfinite_tokens)", "histogram", ("sae",),
                     (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0))
RECON_NONFINITE = Family("steer_reconstruction_nonfinite_tokens",
                         "Sampled tokens whose relative reconstruction error is not a finite number (a stream "
                         "overflowed by a huge clamp, say); kept out of steer_reconstruction_relative_error, "
                         "whose sum one NaN would spoil for the life of the server", "counter", ("sae",))
OP_SECONDS = Family("steer_op_seconds", "Wall time of one SAE's step per forward pass (host-measured)", "histogram",
                    ("sae",), (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25))
SAE_INFO = Family("steer_sae_info", "The loaded SAE (value 1)", "gauge", ("sae", "layer", "d_sae", "architecture"))
DEVICE_BYTES = Family("steer_sae_device_bytes", "Device memory an SAE takes on one worker that steers it: its weights "
                      "and the op's persistent buffers (part); taken before vLLM sizes its KV cache", "gauge",
                      ("sae", "part", "device", "dtype"))

FAMILIES = (CLAMPS_APPLIED, VECTORS_APPLIED, FAILED, STEERED_TOKENS, FEATURE_ACTIVE, SAMPLED_TOKENS, L0, RECON_ERROR, RECON_NONFINITE,
            OP_SECONDS, SAE_INFO, DEVICE_BYTES)


def merge(snapshots: list[Snapshot], families: tuple[Family, ...] = FAMILIES) -> Snapshot:
    """Several workers' snapshots as one: counters and histograms summed, gauges at their maximum."""
    kinds = {f.name: f.kind for f in families}
    out: Snapshot = {}
    for snapshot in snapshots:
        for name, series in snapshot.items():
            merged = out.setdefault(name, {})
            for labels, value in series.items():
                old = merged.get(labels)
                if old is None:
                    merged[labels] = value
                elif kinds[name] == "histogram":
                    merged[labels] = ([a + b for a, b in zip(old[0], value[0])], old[1] + value[1])
                elif kinds[name] == "gauge":
                    merged[labels] = max(old, value)
                else:
                    merged[labels] = old + value
    return out
