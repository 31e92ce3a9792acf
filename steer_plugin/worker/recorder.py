"""Worker side of feature inspection: which tokens of a step to read, and what was read, by key.

A request whose `extra_args` carry `steer_record_features` (see `spec.FeatureRecording`) has its
SAE features read after the forward step from the op's snapshot of the stream at the SAE layer, the
stream the model continues with (after steering, so a steered request shows its clamps); the same
with and without CUDA graphs. Per position the top-k (id, activation)
pairs are kept, plus the per-feature sum over positions, until the API process fetches them with
`collective_rpc("steer_pop_features", key)` (see vllm_seam) once the request has finished. Nothing here runs for
steps without such a request.

Records are kept on the host because they are read on the host anyway; reading them costs
device-to-host copies of [tokens, k] and [requests, d_sae] per step that has a recording request,
never one per token, and never waits for the GPU before the request is fetched (`host_copy`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from steer_plugin.core.sae import SAE
from steer_plugin.core.spec import RECORD_FIELD, FeatureRecording, parse_recording
from steer_plugin.worker.host_copy import HostCopy
from steer_plugin.worker.step_layout import StepLayout

logger = logging.getLogger(__name__)
_NO_TOKENS = torch.zeros(0, dtype=torch.long)
TOTAL_TOP = 256
"""Features returned from the per-feature sums, ranked (see `_Record.as_dict`)."""
RECORD_CHUNK = 256
"""Recorded tokens encoded at a time: a long prompt's [tokens, d_sae] activations never exist at once."""


@dataclass
class _Record:
    top_k: int
    prompt_len: int
    positions: list[np.ndarray] = field(default_factory=list)  # per step [n] int
    ids: list[np.ndarray] = field(default_factory=list)  # per step [n, top_k] int
    values: list[np.ndarray] = field(default_factory=list)  # per step [n, top_k] float
    total: np.ndarray | None = None  # [d_sae] float64, positions > 0 only (see `FeatureRecorder.fill`)

    def as_dict(self, max_activation: np.ndarray | None) -> dict:
        """Ranked by total activation in units of each feature's max activation (the unit of
        `unit: "max"` clamps): a raw sum would put the few dense, large-magnitude features that
        fire on every text first, whatever the text is about."""
        positions = np.concatenate(self.positions)
        order = np.argsort(positions, kind="stable")  # chunked prefill may arrive in pieces
        total = self.total if self.total is not None else np.zeros(0)  # a generation records no sums
        relative = (total / np.maximum(max_activation, 1e-6)
                    if max_activation is not None and len(total) else total)
        top = np.argsort(-relative, kind="stable")[:TOTAL_TOP]
        top = top[total[top] > 0]
        return {"prompt_len": self.prompt_len, "positions": positions[order].tolist(),
                "ids": np.concatenate(self.ids)[order].tolist(),
                "values": np.concatenate(self.values)[order].tolist(),
                "total_ids": top.tolist(), "total_values": total[top].tolist(),
                "total_relative": relative[top].tolist()}


class FeatureRecorder:
    """One SAE's host-side plan for the current step (filled before the forward) and its records by key."""

    def __init__(self, sae: str, max_activation: np.ndarray | None = None, capacity: int = 512):
        self.sae = sae
        """Id of the SAE recorded here; requests recording another SAE's features are left to its recorder."""
        self.max_activation = max_activation
        """Per-feature max activation [d_sae] (the SAE's stats), for ranking; None: raw sums."""
        self.capacity = capacity
        """Most unfetched records kept; the oldest is dropped beyond it (a client that went away)."""
        self._specs: dict[str, FeatureRecording | None] = {}
        self._store: OrderedDict[str, _Record] = OrderedDict()
        self.tokens = _NO_TOKENS
        """Batch indices of this step's tokens to read [N] (host tensor)."""
        self._targets: list[tuple[_Record, int, int, np.ndarray]] = []  # record, start, end in tokens, positions
        self._target_of = _NO_TOKENS  # [N] index into _targets of each token to read
        self._summed = torch.zeros(0, dtype=torch.bool)  # [N] whether a token counts towards the sums
        self._sums = False  # whether any request of the step needs the sums (inspection does, generation does not)
        self._top_k = 0
        self._pending: list[tuple[list, HostCopy]] = []  # recorded steps on their way to the host

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def fill(self, layout: StepLayout) -> None:
        """Plan one step."""
        kept = {rid: spec for rid, spec in self._specs.items() if rid in layout.alive}  # held by the runner
        self._specs = kept | {rid: self._spec(layout.extra_args_of(rid)) for rid in layout.req_ids if rid not in kept}
        recording = [(i, spec) for i, spec in enumerate(self._specs[rid] for rid in layout.req_ids)
                     if spec is not None]
        self._targets, self._top_k = [], 0
        self.tokens = _NO_TOKENS
        if not recording:  # the common step: nothing more to plan
            return
        chunks, used = [], 0
        for i, spec in recording:  # per recording request, not per token
            positions = layout.positions_of(i)
            prompt_len = int(layout.num_prompt[i])
            keep = positions < prompt_len if spec.scope == "prompt" else positions >= prompt_len - 1
            if not keep.any():
                continue
            chunks.append(layout.starts[i] + np.flatnonzero(keep))
            self._targets.append((self._record_for(spec, prompt_len), used, used + len(chunks[-1]), positions[keep]))
            used += len(chunks[-1])
            self._top_k = max(self._top_k, spec.top_k)
        if chunks:
            self.tokens = torch.from_numpy(np.concatenate(chunks))
            self._target_of = torch.from_numpy(np.repeat(np.arange(len(chunks)), [len(c) for c in chunks]))
            # Position 0 is an attention sink the SAE was not trained on; its huge activations
            # would drown every ranking by sum, so it is reported per token but not summed.
            self._summed = torch.from_numpy(np.concatenate([p > 0 for *_, p in self._targets]))
            # Only a prompt's ranking reads the sums: a generating step skips the [N, d_sae] float64
            # sums and their copy to the host, most of what recording a generated token costs.
            self._sums = any(spec.scope == "prompt" for _, spec in recording)

    def _spec(self, extra_args: dict | None) -> FeatureRecording | None:
        spec = parse_recording((extra_args or {}).get(RECORD_FIELD))
        return spec if spec is not None and spec.sae == self.sae else None

    def _record_for(self, spec: FeatureRecording, prompt_len: int) -> _Record:
        record = self._store.get(spec.key)
        if record is None:
            record = self._store[spec.key] = _Record(spec.top_k, prompt_len)
            while len(self._store) > self.capacity:
                dropped, _ = self._store.popitem(last=False)
                logger.warning("action=drop_record key=%s reason=never_fetched", dropped)
        return record

    def record(self, sae: SAE, stream: torch.Tensor) -> None:
        """stream: [T, d_in], the step's residual stream at the SAE layer (the op's snapshot)."""
        device = stream.device
        tokens, target_of = self.tokens.to(device), self._target_of.to(device)
        summed = self._summed.to(device, stream.dtype).unsqueeze(1)  # [N, 1]
        values = torch.empty(len(tokens), self._top_k, device=device)  # [N, top_k]
        ids = torch.empty(len(tokens), self._top_k, dtype=torch.long, device=device)
        totals = torch.zeros(len(self._targets) if self._sums else 0, sae.cfg.d_sae, dtype=torch.float64,
                             device=device)  # [targets or 0, d_sae]
        for start in range(0, len(tokens), RECORD_CHUNK):  # per chunk of a long prompt, not per token
            part = slice(start, start + RECORD_CHUNK)
            f, _ = sae.encode(stream.index_select(0, tokens[part]))  # [chunk, d_sae]
            values[part], ids[part] = f.topk(self._top_k, dim=-1)
            if self._sums:
                totals.index_add_(0, target_of[part], (f * summed[part]).double())
        self._pending.append((self._targets, HostCopy(values, ids, totals)))
        self._land(wait=False)

    def _land(self, wait: bool) -> None:
        """File the recorded steps whose results are on the host (all of them if `wait`)."""
        while self._pending and (wait or self._pending[0][1].ready()):
            targets, copy = self._pending.pop(0)
            values, ids, totals = copy.get()
            for i, (record, start, end, positions) in enumerate(targets):
                record.positions.append(positions)
                record.ids.append(ids[start:end, : record.top_k])
                record.values.append(values[start:end, : record.top_k])
                if len(totals):
                    record.total = totals[i] if record.total is None else record.total + totals[i]

    def pop(self, key: str) -> dict | None:
        """The records of one request as plain lists, or None if this rank has none."""
        self._land(wait=True)
        record = self._store.pop(key, None)
        return None if record is None else {"sae": self.sae, **record.as_dict(self.max_activation)}
