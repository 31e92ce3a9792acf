"""The clamped features of a step, for the op's CUDA-graph path: fixed-capacity buffers.

A replayed CUDA graph reads the same addresses with the same shapes every step, so the graph path
cannot index the SAE by this step's features the way the eager path does. Instead the host copies
the encoder columns and decoder rows of the features the step clamps into a slice of fixed
capacity C (only when that set changes: steady traffic keeps it), and the graph encodes and
decodes every token through those C features only: C·d_in work per token instead of d_sae·d_in,
whatever the SAE's width, and nearly nothing when nothing is steered. A step that clamps more than
C distinct features of one SAE runs without graphs (see `ops.LayerSteer.prepare`).
"""

from __future__ import annotations

import numpy as np
import torch

from steer_plugin.core.sae import SAE, FeatureSlice


class GraphColumns:
    """One SAE's slice of C features and each table row's clamps as positions in it."""

    def __init__(self, sae: SAE, capacity: int, rows: int, width: int):
        device = sae.W_enc.device
        pin = device.type == "cuda"
        self.sae = sae
        self.capacity = capacity
        self.part = FeatureSlice.empty(sae, capacity)
        """W_enc [d_in, C], b_enc [C], threshold [C], W_dec [C, d_in] of the features in `ids`."""
        self.slot = torch.full((rows, width), capacity, dtype=torch.int64, device=device)
        """[R, K] each clamp's position in the slice; C = padding (a zero column the op appends)."""
        self.cond_slot = torch.full((rows, width), capacity, dtype=torch.int64, device=device)
        """[R, K] the position of each clamp's condition feature in the slice; C = none."""
        # one contiguous pinned staging buffer each: a strided slice of one would be staged through
        # pageable memory, a synchronous copy on the hot path
        self._h_slot = torch.full((rows, width), capacity, dtype=torch.int64, pin_memory=pin)
        self._h_cond_slot = torch.full((rows, width), capacity, dtype=torch.int64, pin_memory=pin)
        self._h_ids = torch.zeros(capacity, dtype=torch.int64, pin_memory=pin)
        self.ids = np.zeros(0, dtype=np.int64)
        """The features the slice holds now (sorted)."""

    def fits(self, columns: np.ndarray) -> bool:
        return len(columns) <= self.capacity

    def load(self, columns: np.ndarray, compact: np.ndarray, cond_compact: np.ndarray) -> None:
        """columns: [U] sorted distinct features clamped or read by conditions (U <= C); compact,
        cond_compact: [used, K] the used table rows' clamps and their conditions as positions in
        `columns` (padding and no condition: U)."""
        n = len(columns)
        if not np.array_equal(columns, self.ids):
            self._h_ids[:n] = torch.from_numpy(columns)
            self._h_ids[n:] = 0  # any feature: positions past n are never read
            self.sae.slice(self._h_ids.to(self.slot.device, non_blocking=True), out=self.part)
            self.ids = columns.copy()
        used = len(compact)
        for host, positions, device in ((self._h_slot, compact, self.slot), (self._h_cond_slot, cond_compact,
                                                                              self.cond_slot)):
            host[:used].numpy()[:] = np.where(positions == n, self.capacity, positions)
            device[:used].copy_(host[:used], non_blocking=True)
