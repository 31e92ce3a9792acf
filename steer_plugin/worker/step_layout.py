"""Where each request's tokens sit in one forward step: computed once per step, read by the clamp
table and the feature recorder.

vLLM flattens a step's tokens request by request, in the batch's order, `num_scheduled[i]` tokens
for request i; those tokens are the request's positions `num_computed[i] ...` of its sequence, and
positions below `num_prompt[i]` are prompt positions; the last of them produces the first generated
token, so it counts as a generated position too. Per-token arrays are computed on first use,
so a step that steers and records nothing pays only for the per-request arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from functools import cached_property

import numpy as np


class StepLayout:
    """One step's batch. Per-request arrays are [R] in the batch's token order; per-token ones [T]."""

    def __init__(self, req_ids: Sequence[str], num_scheduled: np.ndarray, num_computed: np.ndarray,
                 num_prompt: np.ndarray, extra_args_of: Callable[[str], dict | None],
                 alive: Container[str] | None = None):
        self.req_ids = req_ids
        self.alive = set(req_ids) if alive is None else alive
        """Requests the runner still holds, in this step's batch or not: under pipeline parallel the
        steps alternate between micro-batches, so a request absent from one step is not finished.
        What the per-request caches keep (default: this step's requests)."""
        self.num_scheduled = np.asarray(num_scheduled, dtype=np.int64)  # [R]
        self.num_computed = np.asarray(num_computed, dtype=np.int64)  # [R] positions already in the KV cache
        self.num_prompt = np.asarray(num_prompt, dtype=np.int64)  # [R]
        self.extra_args_of = extra_args_of
        """A request's `SamplingParams.extra_args` (None without)."""
        self.starts = np.cumsum(self.num_scheduled) - self.num_scheduled  # [R] first batch index of each request
        self.num_tokens = int(self.num_scheduled.sum())

    def __len__(self) -> int:
        return len(self.req_ids)

    def positions_of(self, i: int) -> np.ndarray:
        """Sequence positions of request i's tokens in this step [num_scheduled[i]]."""
        return self.num_computed[i] + np.arange(self.num_scheduled[i])

    @cached_property
    def token_request(self) -> np.ndarray:
        """[T] index of each token's request."""
        return np.repeat(np.arange(len(self)), self.num_scheduled)

    @cached_property
    def token_position(self) -> np.ndarray:
        """[T] each token's position in its request's sequence."""
        req = self.token_request
        return self.num_computed[req] + (np.arange(self.num_tokens) - self.starts[req])

    @cached_property
    def token_kind(self) -> np.ndarray:
        """[T] 0: a prompt position but the last; 1: the last prompt position, which produces the first
        generated token; 2: a generated position."""
        return np.sign(self.token_position - (self.num_prompt[self.token_request] - 1)) + 1
