"""Worker-side Prometheus metrics: clamps, steered tokens, SAE feature activity, op time (`steer_*`).

Worker-side series reach the API server's /metrics through prometheus_client's multiprocess
mode: `server.py` sets a fresh, empty PROMETHEUS_MULTIPROC_DIR before vLLM starts (it must be
set before prometheus_client is imported, which vLLM does before plugins load).

Label cardinality is bounded: per-feature series exist only for the watch-list, for features
some request clamped (at most MAX_CLAMPED_EXPORTED), and for features that were among the top-N
most active at some sampled step (at most TOP_N_SLOTS_FACTOR * N). A feature once exported stays
exported, so its counter never goes stale.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from prometheus_client import Counter, Gauge, Histogram

from steer_plugin.core.spec import ClampPlan
from steer_plugin.worker.host_copy import HostCopy

MAX_CLAMPED_EXPORTED = 256
"""Clamped features get a series of their own, up to this many (then only watch-list and top-N)."""
TOP_N_SLOTS_FACTOR = 4
"""Top-N membership changes as traffic changes; at most this many times N features join that way."""
MAX_SAMPLED_TOKENS = 256
"""Most tokens of one sampled step encoded for feature metrics."""
MODE_NAMES = ("set", "add", "scale")

CLAMPS_APPLIED = Counter("steer_clamps_applied", "Clamps of admitted requests taken into the clamp table, by mode",
                         ["sae", "mode"])
FAILED = Counter("steer_requests_failed", "Requests failed with an error because their clamps could not be "
                 "prepared or applied (the engine and the other requests go on)")
STEERED_TOKENS = Counter("steer_steered_tokens", "Token positions whose residual stream the op edited", ["sae"])
FEATURE_ACTIVE = Counter("steer_feature_active_tokens",
                         "Sampled tokens on which the feature was active (watch-list, clamped and top-N features)",
                         ["sae", "feature"])
SAMPLED_TOKENS = Counter("steer_feature_sampled_tokens", "Tokens encoded for feature-activity metrics", ["sae"])
L0 = Histogram("steer_active_features", "Active SAE features per sampled token (L0)", ["sae"],
               buckets=(0, 1, 2, 4, 8, 16, 24, 32, 40, 48, 64, 96, 128, 256, 512, 1024))
RECON_ERROR = Histogram("steer_reconstruction_relative_error",
                        "Per sampled token |x - sae(x)|^2 / |x|^2 at the SAE layer (finite values only: "
                        "see steer_reconstruction_nonfinite_tokens)", ["sae"],
                        buckets=(0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0))
RECON_NONFINITE = Counter("steer_reconstruction_nonfinite_tokens",
                          "Sampled tokens whose relative reconstruction error is not a finite number (a stream "
                          "overflowed by a huge clamp, say); kept out of steer_reconstruction_relative_error, "
                          "whose sum one NaN would spoil for the life of the server", ["sae"])
OP_SECONDS = Histogram("steer_op_seconds", "Wall time of one SAE's step per forward pass (host-measured)", ["sae"],
                       buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25))
SAE_INFO = Gauge("steer_sae_info", "The loaded SAE (value 1)", ["sae", "layer", "d_sae", "architecture"],
                 multiprocess_mode="max")


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """Histogram.observe for a whole array at once (one bucket pass, no per-value Python loop).
    Uses prometheus_client's per-bucket value objects, the same ones `observe` increments."""
    if values.size == 0:
        return
    upper = np.asarray(histogram._upper_bounds)
    counts = np.bincount(np.searchsorted(upper, values, side="left"), minlength=len(upper))
    for bucket, count in zip(histogram._buckets, counts):
        if count:
            bucket.inc(int(count))
    histogram._sum.inc(float(values.sum()))


def record_new_plan(sae: str, plan: ClampPlan) -> None:
    """plan: the clamps of one request on SAE `sae`."""
    for code, count in zip(*np.unique(plan.mode, return_counts=True)):
        CLAMPS_APPLIED.labels(sae=sae, mode=MODE_NAMES[int(code)]).inc(int(count))


class FeatureActivity:
    """Worker-side feature metrics of one SAE, computed after every `sample_every`-th forward step from
    the stream the op left in its snapshot (see `ops.LayerSteer`), so the same under CUDA graphs."""

    def __init__(self, sae: str, d_sae: int, sample_every: int, watch: tuple[int, ...], top_n: int):
        self.sae = sae
        self._active = lambda feature: FEATURE_ACTIVE.labels(sae=sae, feature=str(feature))
        self._sampled, self._l0, self._error, self._nonfinite = (
            m.labels(sae=sae) for m in (SAMPLED_TOKENS, L0, RECON_ERROR, RECON_NONFINITE))
        self.sample_every = sample_every
        self.top_n = min(top_n, d_sae)
        self.fired = np.zeros(d_sae, dtype=np.int64)  # cumulative active-token counts
        self.exported = np.zeros(d_sae, dtype=np.int64)  # part of `fired` already in the counter
        self.pinned = np.zeros(d_sae, dtype=bool)  # watch-list and clamped features
        for feature in (w for w in watch if 0 <= w < d_sae):
            self.pinned[feature] = True
            self._active(feature)  # exported from the start, at 0
        self.num_clamped_pinned = 0
        self.num_top_pinned = 0
        self._step = 0
        self._pending: list[HostCopy] = []  # sampled steps whose results are on their way to the host

    def pin_clamped(self, plan: ClampPlan) -> None:
        for feature in plan.feature:
            if not self.pinned[feature] and self.num_clamped_pinned < MAX_CLAMPED_EXPORTED:
                self.pinned[feature] = True
                self.num_clamped_pinned += 1
                self._active(feature)

    def due(self) -> bool:
        if self.sample_every <= 0:
            return False
        self._step += 1
        return self._step % self.sample_every == 0

    @torch.no_grad()
    def observe(self, sae, x: torch.Tensor) -> None:
        """x: [T, d_in] residual stream of this step's tokens (at most MAX_SAMPLED_TOKENS, evenly spaced,
        are encoded: a long prefill chunk through a wide SAE would otherwise need [T, d_sae] of memory).
        The results reach the counters once their copy to the host has landed (at once on a CPU)."""
        if x.shape[0] > MAX_SAMPLED_TOKENS:
            x = x[torch.linspace(0, x.shape[0] - 1, MAX_SAMPLED_TOKENS, device=x.device).long()]
        f, norm = sae.encode(x)  # [n, d_sae]
        active = f > 0
        err = (x - sae.decode(f, norm)).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-12)  # [n]
        self._pending.append(HostCopy(active.sum(0), active.sum(-1), err))
        self.export()

    def export(self, wait: bool = False) -> None:
        """Move the sampled steps whose results are on the host into the Prometheus series."""
        while self._pending and (wait or self._pending[0].ready()):
            fired, l0, err = self._pending.pop(0).get()
            self._export(fired, l0, err)

    def _export(self, fired: np.ndarray, l0: np.ndarray, err: np.ndarray) -> None:
        """fired: [d_sae] active-token counts of one sampled step; l0, err: [n] per sampled token."""
        self.fired += fired
        observe_many(self._l0, l0)
        finite = np.isfinite(err)
        observe_many(self._error, err[finite])
        if not finite.all():
            self._nonfinite.inc(int((~finite).sum()))
        self._sampled.inc(len(l0))
        if self.top_n and self.num_top_pinned < TOP_N_SLOTS_FACTOR * self.top_n:
            top = np.argpartition(-self.fired, self.top_n - 1)[: self.top_n]
            joining = top[~self.pinned[top]][: TOP_N_SLOTS_FACTOR * self.top_n - self.num_top_pinned]
            self.pinned[joining] = True
            self.num_top_pinned += len(joining)
        changed = np.flatnonzero(self.pinned & (self.fired != self.exported))
        for feature in changed:  # features that fired this step and are exported: small
            self._active(feature).inc(int(self.fired[feature] - self.exported[feature]))
        self.exported[changed] = self.fired[changed]


class OpTimer:
    """Host wall time of the op into `histogram` (steps the op runs eagerly: a replayed CUDA graph
    runs no Python). histogram None: not measured."""

    def __init__(self, histogram: Histogram | None):
        self.histogram = histogram

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.histogram is not None:
            self.histogram.observe(time.perf_counter() - self.start)
