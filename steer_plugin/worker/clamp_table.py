"""The worker's per-step clamp table: persistent buffers the steering op reads, filled on the host.

The rows, the token -> row map and the failure bookkeeping are `request_table.RequestTable`'s. A
row holds one request's clamps of one SAE for one kind of position (K = max clamps per request):
    feature  [R, K]         int64    feature index; padding = d_sae (a dummy column)
    mul, add [R, K]         float32  f' = f * mul + add; padding = (1, 0), i.e. no change
    above    [R, K]         float32  the clamp acts where its condition feature (host side: `cond`)
                                     is above this; -inf for an unconditional clamp (and padding)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from steer_plugin.core.spec import FIELD, NO_CONDITION, ClampPlan, Limits, parse_clamps
from steer_plugin.worker.request_table import RequestTable, acts_at

logger = logging.getLogger(__name__)


def _row(plan: ClampPlan, keep: np.ndarray, width: int, pad_feature: int):
    """The clamps of `plan` that act at one kind of position, padded to `width`; None: none act."""
    if not keep.any():
        return None
    n = int(keep.sum())
    feature = np.full(width, pad_feature, dtype=np.int64)
    mul = np.ones(width, dtype=np.float32)
    add = np.zeros(width, dtype=np.float32)
    cond = np.full(width, pad_feature, dtype=np.int64)
    above = np.full(width, -np.inf, dtype=np.float32)
    feature[:n], mul[:n], add[:n] = plan.feature[keep], plan.mul[keep], plan.add[keep]
    conditional = plan.cond[keep] != NO_CONDITION
    cond[:n] = np.where(conditional, plan.cond[keep], pad_feature)
    above[:n] = np.where(conditional, plan.above[keep], -np.inf)
    return feature, mul, add, cond, above


class ClampTable(RequestTable):
    """One SAE's buffers on the model's device plus the host-side fill that runs once per forward step."""

    kind = "clamps"

    def __init__(self, limits: Limits, sae_id: str, max_tokens: int, max_reqs: int, device: torch.device,
                 on_new_plan: Callable[[ClampPlan], None] | None = None,
                 on_step: Callable[[int], None] | None = None,
                 check_plan: Callable[[ClampPlan], None] | None = None):
        super().__init__(max_tokens, device, on_step)
        self.limits = limits
        self.sae_id = sae_id
        self._sae_index = limits.ids.index(sae_id)
        self._on_new_plan = on_new_plan
        self._check_plan = check_plan  # may raise for a plan (fault injection, see config.FAULT_ENV)
        self.width = limits.max_clamps
        self.pad_feature = limits.saes[sae_id].d_sae
        rows = 3 * max_reqs
        self.feature = torch.full((rows, self.width), self.pad_feature, dtype=torch.int64, device=device)
        self.mul = torch.ones((rows, self.width), dtype=torch.float32, device=device)
        self.add = torch.zeros((rows, self.width), dtype=torch.float32, device=device)
        self.above = torch.full((rows, self.width), -torch.inf, dtype=torch.float32, device=device)
        pin = device.type == "cuda"
        # Host staging copies: one copy_ per buffer per step.
        self._h_feature = torch.full((rows, self.width), self.pad_feature, dtype=torch.int64, pin_memory=pin)
        self._h_mul = torch.ones((rows, self.width), dtype=torch.float32, pin_memory=pin)
        self._h_add = torch.zeros((rows, self.width), dtype=torch.float32, pin_memory=pin)
        self._h_cond = torch.full((rows, self.width), self.pad_feature, dtype=torch.int64, pin_memory=pin)
        self._h_above = torch.full((rows, self.width), -torch.inf, dtype=torch.float32, pin_memory=pin)
        self.columns = torch.zeros(0, dtype=torch.long)
        """Distinct features clamped or read by a condition in the current step [U] (host tensor; the
        eager path encodes and decodes only these)."""
        self.compact = torch.zeros((0, self.width), dtype=torch.long)
        """The used rows' features as positions in `columns` [used, K]; padding = U (host tensor)."""
        self.cond_compact = torch.zeros((0, self.width), dtype=torch.long)
        """The used rows' condition features as positions in `columns` [used, K]; none = U (host tensor)."""

    def _prepare(self, req_id: str, extra_args: dict | None) -> tuple | None:
        raw = (extra_args or {}).get(FIELD)
        # Admission already validated this exact value with the same parser and limits; an error
        # here is a bug and fails the request (see `fill`), never an unsteered answer.
        plan = parse_clamps(raw, self.limits) if raw is not None else None
        plan = plan.only(self._sae_index) if plan is not None else None  # this table's SAE
        if plan is None:
            return None
        if self._check_plan is not None:
            self._check_plan(plan)
        logger.info("action=clamp_plan req=%s sae=%s clamps=%s", req_id, self.sae_id, plan.canonical)
        if self._on_new_plan is not None:
            self._on_new_plan(plan)
        return tuple(_row(plan, keep, self.width, self.pad_feature) for keep in acts_at(plan.tokens))

    def _load(self, rows: list) -> None:
        used = len(rows)
        for i, (feature, mul, add, cond, above) in enumerate(rows):
            self._h_feature[i] = torch.from_numpy(feature)
            self._h_mul[i] = torch.from_numpy(mul)
            self._h_add[i] = torch.from_numpy(add)
            self._h_cond[i] = torch.from_numpy(cond)
            self._h_above[i] = torch.from_numpy(above)
        features, conds = self._h_feature[:used].numpy(), self._h_cond[:used].numpy()
        both = np.concatenate([features.ravel(), conds.ravel()])
        columns = np.unique(both[both != self.pad_feature])
        self.columns = torch.from_numpy(columns)
        self.compact = torch.from_numpy(np.searchsorted(columns, features))  # padding (d_sae) sorts last: U
        self.cond_compact = torch.from_numpy(np.searchsorted(columns, conds))
        self.feature[:used].copy_(self._h_feature[:used], non_blocking=True)
        self.mul[:used].copy_(self._h_mul[:used], non_blocking=True)
        self.add[:used].copy_(self._h_add[:used], non_blocking=True)
        self.above[:used].copy_(self._h_above[:used], non_blocking=True)
