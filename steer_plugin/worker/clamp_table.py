"""The worker's per-step clamp table: persistent buffers the steering op reads, filled on the host.

Why persistent, fixed-size buffers: the op runs inside torch.compile'd graphs (and CUDA graphs on
GPU), which bake in tensor addresses and shapes. Steering changes between steps must therefore
change buffer *contents*, never buffers. All buffers are allocated once, before compilation.

Layout (K = max clamps per request, R = 3 * max_num_seqs rows, up to three per request, since a
clamp may target prompt positions, generated positions or both: one row for its prompt positions
but the last, one for its last prompt position, which is a prompt position *and* produces the
first generated token, so both scopes act there, and one for its generated positions):
    tok_row  [max_tokens]   int32    row of the table each token uses; -1 = untouched
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
from steer_plugin.worker.step_layout import StepLayout

logger = logging.getLogger(__name__)
_PROMPT, _GENERATED = 1, 2  # spec.TOKENS_CODE


class _RequestRows:
    """One request's clamps as its rows by kind of position ([K] arrays, or None: no clamp acts there)."""

    __slots__ = ("plan", "kinds")

    def __init__(self, plan: ClampPlan, width: int, pad_feature: int):
        self.plan = plan
        everywhere = np.ones(len(plan), dtype=bool)
        self.kinds = (self._row(plan, plan.tokens != _GENERATED, width, pad_feature),  # prompt, but the last
                      self._row(plan, everywhere, width, pad_feature),  # the last prompt position
                      self._row(plan, plan.tokens != _PROMPT, width, pad_feature))  # generated

    @staticmethod
    def _row(plan: ClampPlan, keep: np.ndarray, width: int, pad_feature: int):
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


class ClampTable:
    """One SAE's buffers on the model's device plus the host-side fill that runs once per forward step."""

    def __init__(self, limits: Limits, sae_id: str, max_tokens: int, max_reqs: int, device: torch.device,
                 on_new_plan: Callable[[ClampPlan], None] | None = None,
                 on_step: Callable[[int], None] | None = None,
                 check_plan: Callable[[ClampPlan], None] | None = None):
        self.limits = limits
        self.sae_id = sae_id
        self._sae_index = limits.ids.index(sae_id)
        self._on_new_plan = on_new_plan
        self._on_step = on_step  # called with the number of steered tokens of each step
        self._check_plan = check_plan  # may raise for a plan (fault injection, see config.FAULT_ENV)
        self.width = limits.max_clamps
        self.pad_feature = limits.saes[sae_id].d_sae
        rows = 3 * max_reqs
        self.tok_row = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self.feature = torch.full((rows, self.width), self.pad_feature, dtype=torch.int64, device=device)
        self.mul = torch.ones((rows, self.width), dtype=torch.float32, device=device)
        self.add = torch.zeros((rows, self.width), dtype=torch.float32, device=device)
        self.above = torch.full((rows, self.width), -torch.inf, dtype=torch.float32, device=device)
        pin = device.type == "cuda"
        # Host staging copies: one copy_ per buffer per step.
        self._h_tok_row = torch.full((max_tokens,), -1, dtype=torch.int32, pin_memory=pin)
        self._h_feature = torch.full((rows, self.width), self.pad_feature, dtype=torch.int64, pin_memory=pin)
        self._h_mul = torch.ones((rows, self.width), dtype=torch.float32, pin_memory=pin)
        self._h_add = torch.zeros((rows, self.width), dtype=torch.float32, pin_memory=pin)
        self._h_cond = torch.full((rows, self.width), self.pad_feature, dtype=torch.int64, pin_memory=pin)
        self._h_above = torch.full((rows, self.width), -torch.inf, dtype=torch.float32, pin_memory=pin)
        self._rows_of: dict[str, _RequestRows | None] = {}
        self.num_steered_tokens = 0
        """Tokens of the current step that have a row (host-side, read by the op to skip work)."""
        self.steered_tokens = torch.zeros(0, dtype=torch.long)
        """Indices of those tokens [num_steered_tokens] (host tensor; used on the eager path)."""
        self.columns = torch.zeros(0, dtype=torch.long)
        """Distinct features clamped or read by a condition in the current step [U] (host tensor; the
        eager path encodes and decodes only these)."""
        self.compact = torch.zeros((0, self.width), dtype=torch.long)
        """The used rows' features as positions in `columns` [used, K]; padding = U (host tensor)."""
        self.cond_compact = torch.zeros((0, self.width), dtype=torch.long)
        """The used rows' condition features as positions in `columns` [used, K]; none = U (host tensor)."""
        self.failed: set[str] = set()
        """Requests whose clamps could not be prepared or applied, to be failed with an error reply
        (drained by the worker after each step; see `vllm_seam`)."""
        self.step_steered: list[str] = []
        """Requests with rows in the current step."""
        self._broken: set[str] = set()  # failed requests still in the batch: never steered again
        self._dirty = False

    def _rows(self, req_id: str, extra_args: dict | None) -> _RequestRows | None:
        if req_id in self._rows_of:
            return self._rows_of[req_id]
        raw = (extra_args or {}).get(FIELD)
        # Admission already validated this exact value with the same parser and limits; an error
        # here is a bug and fails the request (see `fill`), never an unsteered answer.
        plan = parse_clamps(raw, self.limits) if raw is not None else None
        plan = plan.only(self._sae_index) if plan is not None else None  # this table's SAE
        if plan is not None and self._check_plan is not None:
            self._check_plan(plan)
        rows = _RequestRows(plan, self.width, self.pad_feature) if plan else None
        if rows is not None:
            logger.info("action=clamp_plan req=%s sae=%s clamps=%s", req_id, self.sae_id, plan.canonical)
            if self._on_new_plan is not None:
                self._on_new_plan(plan)
        return rows

    def fill(self, layout: StepLayout) -> None:
        """Fill the table for one step. A request whose clamps cannot be prepared joins `failed` and
        gets no rows; the others are steered as asked."""
        req_ids = layout.req_ids
        alive = layout.alive
        self._broken = {rid for rid in self._broken if rid in alive}  # finished requests leave
        # A request's rows are prepared once and kept while the runner holds it (the clamps of a
        # request never change), so each plan is parsed and counted once.
        rows_of: dict[str, _RequestRows | None] = {rid: rows for rid, rows in self._rows_of.items() if rid in alive}
        self._rows_of = rows_of
        for rid in req_ids:
            if rid in self._broken:  # failed in an earlier step and not finished yet
                rows_of[rid] = None
                self.failed.add(rid)
                continue
            try:
                rows_of[rid] = self._rows(rid, layout.extra_args_of(rid))
            except Exception:
                logger.exception("action=failed req=%s reason=clamps_not_prepared", rid)
                rows_of[rid] = None
                self._broken.add(rid)
                self.failed.add(rid)
        self.step_steered = [rid for rid in req_ids if rows_of[rid] is not None]
        kind_row = np.full((3, len(req_ids)), -1, dtype=np.int32)  # [kind, R] table row of each request
        used = 0
        for i, rid in enumerate(req_ids):  # per request, not per token
            rows = rows_of[rid]
            if rows is None:
                continue
            for k, kind in enumerate(rows.kinds):
                if kind is not None:
                    self._h_feature[used] = torch.from_numpy(kind[0])
                    self._h_mul[used] = torch.from_numpy(kind[1])
                    self._h_add[used] = torch.from_numpy(kind[2])
                    self._h_cond[used] = torch.from_numpy(kind[3])
                    self._h_above[used] = torch.from_numpy(kind[4])
                    kind_row[k, i] = used
                    used += 1
        if used == 0:
            self.num_steered_tokens = 0
            if self._dirty:  # leave no stale rows behind for graph replays
                self.tok_row.fill_(-1)
                self._dirty = False
            return

        tok_row = kind_row[layout.token_kind, layout.token_request]  # [T]
        host = self._h_tok_row.numpy()
        host[:] = -1
        host[:layout.num_tokens] = tok_row
        steered = np.flatnonzero(tok_row >= 0)
        self.num_steered_tokens = len(steered)
        if self._on_step is not None:
            self._on_step(self.num_steered_tokens)
        self.steered_tokens = torch.from_numpy(steered)
        features, conds = self._h_feature[:used].numpy(), self._h_cond[:used].numpy()
        both = np.concatenate([features.ravel(), conds.ravel()])
        columns = np.unique(both[both != self.pad_feature])
        self.columns = torch.from_numpy(columns)
        self.compact = torch.from_numpy(np.searchsorted(columns, features))  # padding (d_sae) sorts last: U
        self.cond_compact = torch.from_numpy(np.searchsorted(columns, conds))
        self.tok_row.copy_(self._h_tok_row, non_blocking=True)
        self.feature[:used].copy_(self._h_feature[:used], non_blocking=True)
        self.mul[:used].copy_(self._h_mul[:used], non_blocking=True)
        self.add[:used].copy_(self._h_add[:used], non_blocking=True)
        self.above[:used].copy_(self._h_above[:used], non_blocking=True)
        self._dirty = True

    def fail_step(self) -> None:
        """The op could not apply this step's clamps: every request steered in it fails."""
        self._broken.update(self.step_steered)
        self.failed.update(self.step_steered)

    def drain_failed(self) -> list[str]:
        failed, self.failed = sorted(self.failed), set()
        return failed

    def reset(self) -> None:
        """Never leave a partial fill behind (called when a fill raises)."""
        self.tok_row.fill_(-1)
        self.num_steered_tokens = 0
        self._dirty = False
