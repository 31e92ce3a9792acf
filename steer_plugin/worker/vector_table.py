"""The worker's per-step vector table: which steering vectors each token adds, at which scale.

One table for every layer a vector touches (a request's scales are the same at each of them); each
layer's op holds its own directions (`ops.LayerVectors`). The rows, the token -> row map and the
failure bookkeeping are `request_table.RequestTable`'s (V = the loaded vectors):
    scale  [R, V]  float32  each row's scale per vector (0: not added)
A kind of position where every scale of the request is 0 gets no row: those tokens stay bit-identical.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from steer_plugin.core.spec import VECTOR_FIELD, Limits, VectorPlan, parse_vectors
from steer_plugin.worker.request_table import RequestTable, acts_at

logger = logging.getLogger(__name__)


class VectorTable(RequestTable):
    kind = "vectors"

    def __init__(self, limits: Limits, max_tokens: int, max_reqs: int, device: torch.device,
                 on_new_plan: Callable[[VectorPlan], None] | None = None):
        super().__init__(max_tokens, device)
        self.limits = limits
        self._on_new_plan = on_new_plan
        rows, width = 3 * max_reqs, len(limits.vectors)
        self.scale = torch.zeros((rows, width), dtype=torch.float32, device=device)
        self._h_scale = torch.zeros((rows, width), dtype=torch.float32, pin_memory=device.type == "cuda")

    def _prepare(self, req_id: str, extra_args: dict | None) -> tuple | None:
        raw = (extra_args or {}).get(VECTOR_FIELD)
        # Admission already validated this exact value with the same parser and limits (see ClampTable).
        plan = parse_vectors(raw, self.limits) if raw is not None else None
        if plan is None:
            return None
        logger.info("action=vector_plan req=%s vectors=%s", req_id, plan.canonical(self.limits))
        if self._on_new_plan is not None:
            self._on_new_plan(plan)
        rows = []
        for keep in acts_at(plan.tokens):
            scale = np.zeros(len(self.limits.vectors), dtype=np.float32)  # [V]
            scale[plan.vector[keep]] = plan.scale[keep]
            rows.append(scale if scale.any() else None)
        return tuple(rows) if any(row is not None for row in rows) else None

    def _load(self, rows: list) -> None:
        used = len(rows)
        self._h_scale[:used] = torch.from_numpy(np.stack(rows))
        self.scale[:used].copy_(self._h_scale[:used], non_blocking=True)
