"""Per-feature statistics and strongest activations, accumulated from per-token records as they
stream in: memory is O(top × d_sae) whatever the corpus size (about 25 MB per 100k latents at the
default 40), so 65k-131k-latent SAEs build on an ordinary machine.

A record is what the plugin's recorder returns for a prompt (`worker/recorder.py`): per position,
its `top_k` strongest features and their activations. A feature counts as active on a token where it
is among that token's top_k with a positive activation, so `frequency` and `mean_activation` are
exact for tokens with at most top_k active features (an SAE's L0 is usually well below the default
64) and count only the strongest top_k elsewhere; `max_activation` and the strongest activations
are exact (a feature's strongest activations are among its tokens' strongest features).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steer_plugin.core.files import replaced_on_success


@dataclass
class TopFeatures:
    """The running state (saved whole as a checkpoint; see `save`, `load`)."""

    max_activation: np.ndarray  # [d_sae] float32
    count: np.ndarray  # [d_sae] int64: tokens on which the feature was active
    total: np.ndarray  # [d_sae] float64: sum of its activations there
    top_value: np.ndarray  # [top, d_sae] float32, descending per column; -1: empty slot
    top_doc: np.ndarray  # [top, d_sae] int32: document of each strongest activation
    top_pos: np.ndarray  # [top, d_sae] int32: its position in the document
    tokens: int = 0
    """Tokens read so far."""
    documents: int = 0
    """Documents read so far (the corpus's first `documents` are done: where a resumed run starts)."""

    @classmethod
    def empty(cls, d_sae: int, top: int) -> "TopFeatures":
        return cls(np.zeros(d_sae, np.float32), np.zeros(d_sae, np.int64), np.zeros(d_sae, np.float64),
                   np.full((top, d_sae), -1.0, np.float32), np.zeros((top, d_sae), np.int32),
                   np.zeros((top, d_sae), np.int32))

    def add(self, doc: np.ndarray, pos: np.ndarray, ids: np.ndarray, values: np.ndarray, tokens: int) -> None:
        """One batch of records: doc, pos [n] of each recorded token; ids, values [n, k] its strongest
        features; `tokens`: how many tokens the batch covered."""
        self.tokens += tokens
        active = values > 0  # [n, k]
        f = ids[active]  # [m] one entry per (token, active feature)
        v = values[active].astype(np.float32)
        d = np.broadcast_to(doc[:, None], ids.shape)[active]
        p = np.broadcast_to(pos[:, None], ids.shape)[active]
        if not len(f):
            return
        np.maximum.at(self.max_activation, f, v)
        np.add.at(self.count, f, 1)
        np.add.at(self.total, f, v)
        top = self.top_value.shape[0]
        # The batch's `top` strongest entries per feature: sorted by feature, then strongest first.
        order = np.lexsort((-v, f))
        f, v, d, p = f[order], v[order], d[order], p[order]
        starts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]])  # [u] first entry of each feature
        rank = np.arange(len(f)) - np.repeat(starts, np.diff(np.r_[starts, len(f)]))
        keep = rank < top
        f, v, d, p, rank = f[keep], v[keep], d[keep], p[keep], rank[keep]
        features, column = np.unique(f, return_inverse=True)  # [u], [m'] each entry's column in the block
        new_value = np.full((top, len(features)), -1.0, np.float32)
        new_doc = np.zeros((top, len(features)), np.int32)
        new_pos = np.zeros((top, len(features)), np.int32)
        new_value[rank, column], new_doc[rank, column], new_pos[rank, column] = v, d, p
        # Merge with what those features held: the strongest `top` of both, per column.
        value = np.concatenate([self.top_value[:, features], new_value])  # [2·top, u]
        best = np.argsort(-value, axis=0, kind="stable")[:top]  # [top, u]
        self.top_value[:, features] = np.take_along_axis(value, best, 0)
        self.top_doc[:, features] = np.take_along_axis(np.concatenate([self.top_doc[:, features], new_doc]), best, 0)
        self.top_pos[:, features] = np.take_along_axis(np.concatenate([self.top_pos[:, features], new_pos]), best, 0)

    def statistics(self) -> dict[str, np.ndarray]:
        """max_activation, frequency, mean_activation [d_sae] (the stats file's and the catalogue's)."""
        return {"max_activation": self.max_activation.copy(),
                "frequency": (self.count / max(self.tokens, 1)).astype(np.float32),
                "mean_activation": (self.total / np.maximum(self.count, 1)).astype(np.float32)}

    def save(self, path: Path, key: str) -> None:
        """Written whole or not at all; `key` says which build it belongs to (see `load`)."""
        with replaced_on_success(path) as tmp, tmp.open("wb") as out:
            np.savez(out, key=np.array(key), tokens=self.tokens, documents=self.documents,
                     **{name: getattr(self, name) for name in _ARRAYS})

    @classmethod
    def load(cls, path: Path, key: str) -> "TopFeatures | None":
        """The state saved at `path` by a build with the same `key`; None if there is none (or another build's)."""
        if not path.is_file():
            return None
        with np.load(path) as saved:
            if str(saved["key"]) != key:
                return None
            return cls(**{name: saved[name] for name in _ARRAYS}, tokens=int(saved["tokens"]),
                       documents=int(saved["documents"]))


_ARRAYS = ("max_activation", "count", "total", "top_value", "top_doc", "top_pos")
