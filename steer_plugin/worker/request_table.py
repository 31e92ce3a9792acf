"""What every per-step steering table shares (`clamp_table.ClampTable`, `vector_table.VectorTable`):
per-request rows prepared once while the runner holds the request, a token -> row map on the device,
and the requests whose steering could not be prepared or applied.

Why persistent, fixed-size buffers: the ops run inside torch.compile'd graphs (and CUDA graphs on
GPU), which bake in tensor addresses and shapes. Steering changes between steps must therefore
change buffer *contents*, never buffers. All buffers are allocated once, before compilation.

A request has up to three rows, one per kind of position (`StepLayout.token_kind`), since its
steering may target prompt positions, generated positions or both: one row for its prompt positions
but the last, one for its last prompt position, which is a prompt position *and* produces the first
generated token, so both scopes act there, and one for its generated positions. R = 3 * max_num_seqs.
    tok_row  [max_tokens]   int32    row of the table each token uses; -1 = untouched
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from steer_plugin.worker.step_layout import StepLayout

logger = logging.getLogger(__name__)
_PROMPT, _GENERATED = 1, 2  # spec.TOKENS_CODE


def acts_at(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens: [K] scopes (spec.TOKENS_CODE) -> per kind of position, which of them act there [K] bool."""
    return tokens != _GENERATED, np.ones(len(tokens), dtype=bool), tokens != _PROMPT


class RequestTable:
    """The token -> row map and the per-request bookkeeping; subclasses say what a row holds."""

    kind = "steering"
    """What the table holds, for logs."""

    def __init__(self, max_tokens: int, device: torch.device, on_step: Callable[[int], None] | None = None):
        self._on_step = on_step  # called with the number of steered tokens of each step
        self.tok_row = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self._h_tok_row = torch.full((max_tokens,), -1, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._rows_of: dict[str, tuple | None] = {}
        self.num_steered_tokens = 0
        """Tokens of the current step that have a row (host-side, read by the ops to skip work)."""
        self.steered_tokens = torch.zeros(0, dtype=torch.long)
        """Indices of those tokens [num_steered_tokens] (host tensor; used on the eager path)."""
        self.failed: set[str] = set()
        """Requests whose steering could not be prepared or applied, to be failed with an error reply
        (drained by the worker after each step; see `vllm_seam`)."""
        self.step_steered: list[str] = []
        """Requests with rows in the current step."""
        self._broken: set[str] = set()  # failed requests still in the batch: never steered again
        self._dirty = False

    # ---- what a subclass says ---------------------------------------------------------------------
    def _prepare(self, req_id: str, extra_args: dict | None) -> tuple | None:
        """A request's rows by kind of position (each None where nothing acts), or None: unsteered."""
        raise NotImplementedError

    def _load(self, rows: list) -> None:
        """Write this step's rows (row i of the table = rows[i]) to the device."""
        raise NotImplementedError

    # ---- once per step ------------------------------------------------------------------------
    def fill(self, layout: StepLayout) -> None:
        """Fill the table for one step. A request whose steering cannot be prepared joins `failed` and
        gets no rows; the others are steered as asked."""
        req_ids = layout.req_ids
        self._broken = {rid for rid in self._broken if rid in layout.alive}  # finished requests leave
        # A request's rows are prepared once and kept while the runner holds it (its steering never
        # changes), so each plan is parsed and counted once.
        rows_of = {rid: rows for rid, rows in self._rows_of.items() if rid in layout.alive}
        self._rows_of = rows_of
        for rid in req_ids:
            if rid in self._broken:  # failed in an earlier step and not finished yet
                rows_of[rid] = None
                self.failed.add(rid)
            elif rid not in rows_of:
                try:
                    rows_of[rid] = self._prepare(rid, layout.extra_args_of(rid))
                except Exception:
                    logger.exception("action=failed req=%s reason=%s_not_prepared", rid, self.kind)
                    rows_of[rid] = None
                    self._broken.add(rid)
                    self.failed.add(rid)
        self.step_steered = [rid for rid in req_ids if rows_of[rid] is not None]
        kind_row = np.full((3, len(req_ids)), -1, dtype=np.int32)  # [kind, R] table row of each request
        rows = []
        for i, rid in enumerate(req_ids):  # per request, not per token
            for k, row in enumerate(rows_of[rid] or ()):
                if row is not None:
                    kind_row[k, i] = len(rows)
                    rows.append(row)
        if not rows:
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
        self._load(rows)
        self.tok_row.copy_(self._h_tok_row, non_blocking=True)
        self._dirty = True

    def fail_step(self) -> None:
        """The op could not apply this step's rows: every request steered in it fails."""
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
