"""Device results read on the host without stalling the GPU.

Feature metrics and recordings are computed on the model's device between forward steps and read
on the host. A plain `.cpu()` waits for every kernel queued before it, including the next step's
forward when vLLM schedules asynchronously. `HostCopy` queues the copy into pinned memory with an
event behind it; the reader takes the values once the event has passed (a later step, usually).
On a CPU device the copy is done at once.
"""

from __future__ import annotations

import numpy as np
import torch


class HostCopy:
    """Small device tensors on their way to the host."""

    def __init__(self, *tensors: torch.Tensor):
        self._event = None
        if tensors and tensors[0].is_cuda:
            # non_blocking device-to-host copies land in pinned memory (torch's _to_copy pins them)
            self._host = tuple(t.to("cpu", non_blocking=True) for t in tensors)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tuple(t.detach().clone() for t in tensors)

    def ready(self) -> bool:
        """Whether reading now would not wait."""
        return self._event is None or self._event.query()

    def get(self) -> tuple[np.ndarray, ...]:
        """The values (waits for the copy if it has not landed yet)."""
        if self._event is not None:
            self._event.synchronize()
        return tuple(t.numpy() for t in self._host)
