"""Worker-side metrics: clamps, steered tokens, SAE feature activity, op time (the `steer_*` families
of `core/metric_families.py`).

They are kept in this process's memory, by plain counters and bucket arrays, and leave it only as a
snapshot: the API server asks every worker of every engine for one over vLLM's RPC
(`Worker.steer_metrics`) when /metrics is scraped, merges them and exposes them with its own. So they
reach /metrics from any rank, node or data-parallel engine vLLM runs, with no shared directory.

Label cardinality is bounded: per-feature series exist only for the watch-list, for features
some request clamped (at most MAX_CLAMPED_EXPORTED), and for features that were among the top-N
most active at some sampled step (at most TOP_N_SLOTS_FACTOR * N). A feature once exported stays
exported, so its counter never goes stale.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from steer_plugin.core import metric_families as families
from steer_plugin.core.metric_families import Family, Snapshot
from steer_plugin.core.spec import ClampPlan
from steer_plugin.worker.host_copy import HostCopy

MAX_CLAMPED_EXPORTED = 256
"""Clamped features get a series of their own, up to this many (then only watch-list and top-N)."""
TOP_N_SLOTS_FACTOR = 4
"""Top-N membership changes as traffic changes; at most this many times N features join that way."""
MAX_SAMPLED_TOKENS = 256
"""Most tokens of one sampled step encoded for feature metrics."""
MODE_NAMES = ("set", "add", "scale")


class Series:
    """One labelled series of a family, in this process: a value (counters, gauges), or bucket counts
    and a sum (histograms)."""

    def __init__(self, family: Family):
        self.family = family
        self.value = 0.0
        self.counts = np.zeros(len(family.buckets) + 1, dtype=np.int64)  # [buckets + 1]: the last is +Inf
        self.sum = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = value

    def observe(self, value: float) -> None:
        self.observe_many(np.asarray([value]))

    def observe_many(self, values: np.ndarray) -> None:
        """values: [n]; one bucket pass for the whole array (no per-value Python loop)."""
        if values.size == 0:
            return
        self.counts += np.bincount(np.searchsorted(self.family.buckets, values, side="left"),
                                   minlength=len(self.counts))
        self.sum += float(values.sum())

    def snapshot_value(self):
        if self.family.kind == "histogram":
            return self.counts.tolist(), self.sum
        return self.value


class WorkerFamily:
    """A family's series in this process, by label values."""

    def __init__(self, family: Family):
        self.family = family
        self.series: dict[tuple[str, ...], Series] = {}

    def labels(self, **labels: str) -> Series:
        key = tuple(labels[name] for name in self.family.labels)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Series(self.family)
        return series


_REGISTRY = {f.name: WorkerFamily(f) for f in families.FAMILIES}
CLAMPS_APPLIED, VECTORS_APPLIED, FAILED, STEERED_TOKENS, FEATURE_ACTIVE, SAMPLED_TOKENS, L0, RECON_ERROR, RECON_NONFINITE, \
    OP_SECONDS, SAE_INFO, DEVICE_BYTES = (_REGISTRY[f.name] for f in families.FAMILIES)


def snapshot() -> Snapshot:
    """Every series of this process, as the API server collects them (see `core/metric_families.py`)."""
    return {name: {labels: s.snapshot_value() for labels, s in family.series.items()}
            for name, family in _REGISTRY.items() if family.series}


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
        """Move the sampled steps whose results are on the host into the series."""
        while self._pending and (wait or self._pending[0].ready()):
            fired, l0, err = self._pending.pop(0).get()
            self._export(fired, l0, err)

    def _export(self, fired: np.ndarray, l0: np.ndarray, err: np.ndarray) -> None:
        """fired: [d_sae] active-token counts of one sampled step; l0, err: [n] per sampled token."""
        self.fired += fired
        self._l0.observe_many(l0)
        finite = np.isfinite(err)
        self._error.observe_many(err[finite])
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

    def __init__(self, histogram: Series | None):
        self.histogram = histogram

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.histogram is not None:
            self.histogram.observe(time.perf_counter() - self.start)
