"""The steering op: the only code that runs inside vLLM's forward pass (and its compiled graphs).

`torch.ops.steer_plugin.steer(hidden, residual, layer_key) -> hidden'` is a registered custom op
with a fake (meta) implementation, so torch.compile keeps it as one opaque call instead of
tracing (and freezing) Python, and CUDA graphs capture its kernels. It reads only persistent
buffers (the SAE weights and the `ClampTable`), looked up by `layer_key`.

Math, per token t with a clamp row r (Anthropic's clamp with the SAE error term kept):
    x   = hidden + residual                              the residual stream, [T, d_in]
    f   = encode(x)                                      [T, d_sae]
    f'  = f with f[i] <- f[i] * mul[r, i] + add[r, i]    for the request's clamped features i
    x'  = x + decode(f') - decode(f) = x + ((f' - f) @ W_dec) * scale
and hidden' = hidden + (x' - x). Tokens without a row are returned bit-identical.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from steer_plugin.sae import SAE
from steer_plugin.worker.clamp_table import ClampTable
from steer_plugin.worker.metrics import FeatureActivity, OpTimer
from steer_plugin.worker.recorder import FeatureRecorder

logger = logging.getLogger(__name__)


def clamp_delta(sae: SAE, x: torch.Tensor, rows: torch.Tensor, feature: torch.Tensor, mul: torch.Tensor,
                add: torch.Tensor, columns: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x: [S, d_in] residual stream; rows: [S] clamp-table rows (>= 0);
    feature/mul/add: [R, K] table -> delta [S, d_in] = decode(f') - decode(f).
    Padding entries (feature d_sae, mul 1, add 0) yield a zero change, so they may point anywhere.

    columns = (columns [U], compact [R, K]): the features the step clamps, and the table's features
    as positions in `columns` (padding: U). The host knows them on the eager path, so only U decoder
    rows are multiplied instead of all d_sae, and for SAEs whose activation is per feature (ReLU,
    JumpReLU) only U encoder columns: about U·d_in work per steered token instead of d_sae·d_in
    (U is usually a handful). TopK needs every pre-activation to know which k survive. Without
    `columns` (graph-safe path) encode and decode are dense: fixed shapes, no host sync."""
    if columns is None:
        f, norm = sae.encode(x)  # [S, d_sae]
        idx = feature[rows].clamp_max(f.shape[1] - 1)  # [S, K]
        change = f.gather(1, idx) * (mul[rows] - 1.0) + add[rows]  # f' - f at the clamped features
        df = torch.zeros_like(f).scatter_add_(1, idx, change)  # [S, d_sae]
        return (df @ sae.W_dec) * norm.scale
    columns, compact = columns
    if sae.per_feature:
        f_cols, norm = sae.encode_columns(x, columns)  # [S, U]
    else:
        f, norm = sae.encode(x)  # [S, d_sae]
        f_cols = f.index_select(1, columns)  # [S, U]
    slot = compact[rows]  # [S, K] positions in columns; padding U
    f_slot = torch.cat([f_cols, f_cols.new_zeros(f_cols.shape[0], 1)], dim=1).gather(1, slot)  # [S, K]
    change = f_slot * (mul[rows] - 1.0) + add[rows]  # f' - f at the clamped features
    df = change.new_zeros(x.shape[0], len(columns) + 1).scatter_add_(1, slot, change)[:, :-1]  # [S, U]
    return (df @ sae.W_dec.index_select(0, columns)) * norm.scale  # [S, d_in]


class LayerSteer:
    """State of the op at one layer: SAE, clamp table, and how the op may run."""

    def __init__(self, sae: SAE, table: ClampTable, graph_safe: bool, activity: FeatureActivity | None = None,
                 recorder: FeatureRecorder | None = None, fault_feature: int | None = None):
        self.sae = sae
        self.fault_feature = fault_feature
        """Testing aid (config.FAULT_ENV): applying a clamp of this feature raises."""
        self.table = table
        self.graph_safe = graph_safe
        """True under CUDA graphs: replays skip Python, so the op must not branch on host state
        and always computes over all tokens. False (CPU, eager): skip or subset on the host."""
        self.activity = None if graph_safe else activity
        """Host-side feature metrics; off under CUDA graphs, whose replays run no Python."""
        self.recorder = None if graph_safe else recorder
        """Feature inspection (per-token top-k of requests that ask); host-side, so eager only."""

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """hidden, residual: [T, d_in] -> hidden' [T, d_in]."""
        if self.graph_safe:  # replays run no Python: nothing to catch, time or observe
            return self._steer(hidden, residual)
        with OpTimer():
            out = self._apply(hidden, residual)
            observe = self.activity is not None and self.activity.due()
            record = self.recorder is not None and self.recorder.num_tokens > 0
            if observe or record:
                stream = out + residual  # what the model continues with, clamps included
                if observe:
                    self.activity.observe(self.sae, stream)
                if record:
                    self.recorder.record(self.sae, stream)
            return out

    def _apply(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The eager path: a failure fails the requests steered in this step (the scheduler finishes
        them with an error and drops this step's tokens), not the step."""
        try:
            if self.fault_feature is not None and bool((self.table.columns == self.fault_feature).any()):
                raise RuntimeError(f"injected fault: applying a clamp of feature {self.fault_feature}")
            return self._steer(hidden, residual)
        except Exception:
            logger.exception("action=failed reqs=%s reason=op_failed", ",".join(self.table.step_steered))
            self.table.fail_step()
            return hidden.clone()

    def _steer(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        t = self.table
        if self.graph_safe:
            rows = t.tok_row[: hidden.shape[0]]  # [T]; -1 also for CUDA-graph padding
            delta = clamp_delta(self.sae, hidden + residual, rows.clamp_min(0).long(), t.feature, t.mul, t.add)
            return torch.where((rows >= 0).unsqueeze(-1), hidden + delta, hidden)
        if t.num_steered_tokens == 0:
            return hidden.clone()
        idx = t.steered_tokens.to(hidden.device, non_blocking=True)  # [S]
        x = hidden.index_select(0, idx) + residual.index_select(0, idx)  # [S, d_in]
        rows = t.tok_row.index_select(0, idx).long()
        columns = (t.columns.to(hidden.device, non_blocking=True), t.compact.to(hidden.device, non_blocking=True))
        delta = clamp_delta(self.sae, x, rows, t.feature, t.mul, t.add, columns)
        return hidden.index_add(0, idx, delta)


_LAYERS: dict[str, LayerSteer] = {}


def register_layer(key: str, state: LayerSteer) -> None:
    _LAYERS[key] = state


@torch.library.custom_op("steer_plugin::steer", mutates_args=())
def steer(hidden: torch.Tensor, residual: torch.Tensor, layer_key: str) -> torch.Tensor:
    """hidden, residual: [T, d_in] (a decoder layer's two outputs) -> steered hidden [T, d_in]."""
    return _LAYERS[layer_key].forward(hidden, residual)


@steer.register_fake
def _steer_fake(hidden: torch.Tensor, residual: torch.Tensor, layer_key: str) -> torch.Tensor:
    return torch.empty_like(hidden)


class SteeredLayer(nn.Module):
    """Wraps a decoder layer that returns (hidden, residual) and applies the op to its output."""

    def __init__(self, inner: nn.Module, layer_key: str):
        super().__init__()
        self.inner = inner
        self.layer_key = layer_key

    def forward(self, *args, **kwargs):
        hidden, residual = self.inner(*args, **kwargs)
        return torch.ops.steer_plugin.steer(hidden, residual, self.layer_key), residual


class SteeredInput(nn.Module):
    """Wraps the first decoder layer and applies the op to its input, the embeddings (an SAE on
    `blocks.0.hook_resid_pre`). Decoder layers take (positions, hidden_states, residual); at layer 0
    the residual is None and the stream is hidden_states alone."""

    def __init__(self, inner: nn.Module, layer_key: str):
        super().__init__()
        self.inner = inner
        self.layer_key = layer_key

    def forward(self, positions, hidden_states, residual=None, *args, **kwargs):
        stream_rest = torch.zeros_like(hidden_states) if residual is None else residual
        hidden_states = torch.ops.steer_plugin.steer(hidden_states, stream_rest, self.layer_key)
        return self.inner(positions, hidden_states, residual, *args, **kwargs)
