"""The steering op: the only code that runs inside vLLM's forward pass (and its compiled graphs).

`torch.ops.steer_plugin.steer(hidden, residual, sae_key) -> hidden'` is a registered custom op
with a fake (meta) implementation, so torch.compile keeps it as one opaque call instead of
tracing (and freezing) Python, and CUDA graphs capture its kernels. It reads only persistent
buffers (the SAE weights and the `ClampTable`), looked up by `sae_key` (one per loaded SAE).

Precision: the SAE math runs in float32 whatever the model's dtype; for a bfloat16 or float16 model
the stream is read into float32 and only the change is cast back (a zero change stays zero, so
unclamped tokens and identity clamps are bit-identical in every dtype).

Math, per token t with a clamp row r (Anthropic's clamp with the SAE error term kept):
    x   = hidden + residual                              the residual stream, [T, d_in]
                                                         (hidden alone for layers without a residual)
    f   = encode(x)                                      [T, d_sae]
    f'  = f with f[i] <- f[i] * mul[r, i] + add[r, i]    for the request's clamped features i
    x'  = x + decode(f') - decode(f) = x + ((f' - f) @ W_dec) * scale
and hidden' = hidden + (x' - x). Tokens without a row are returned bit-identical.
"""

from __future__ import annotations

import inspect
import logging

import torch
from prometheus_client import Histogram
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
                 recorder: FeatureRecorder | None = None, fault_feature: int | None = None,
                 timer: Histogram | None = None):
        self.sae = sae
        self.timer = timer
        """Where the op's host wall time goes (None: not measured, e.g. on tensor-parallel ranks but the first)."""
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

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """hidden, residual: [T, d_in] (residual None: hidden is the whole stream) -> hidden' [T, d_in]."""
        if self.graph_safe:  # replays run no Python: nothing to catch, time or observe
            return self._steer(hidden, residual)
        with OpTimer(self.timer):
            out = self._apply(hidden, residual)
            observe = self.activity is not None and self.activity.due()
            record = self.recorder is not None and self.recorder.num_tokens > 0
            if observe or record:
                stream = _stream(out, residual)  # what the model continues with, clamps included
                if observe:
                    self.activity.observe(self.sae, stream)
                if record:
                    self.recorder.record(self.sae, stream)
            return out

    def _apply(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
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

    def _steer(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        t = self.table
        if self.graph_safe:
            rows = t.tok_row[: hidden.shape[0]]  # [T]; -1 also for CUDA-graph padding
            delta = clamp_delta(self.sae, _stream(hidden, residual), rows.clamp_min(0).long(), t.feature, t.mul, t.add)
            return torch.where((rows >= 0).unsqueeze(-1), hidden + delta.to(hidden.dtype), hidden)
        if t.num_steered_tokens == 0:
            return hidden.clone()
        idx = t.steered_tokens.to(hidden.device, non_blocking=True)  # [S]
        x = _stream(hidden.index_select(0, idx), None if residual is None else residual.index_select(0, idx))
        rows = t.tok_row.index_select(0, idx).long()
        columns = (t.columns.to(hidden.device, non_blocking=True), t.compact.to(hidden.device, non_blocking=True))
        delta = clamp_delta(self.sae, x, rows, t.feature, t.mul, t.add, columns)  # [S, d_in] float32
        return hidden.index_add(0, idx, delta.to(hidden.dtype))


def _stream(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The residual stream [T, d_in] in float32 (the SAE's dtype), from a layer's output."""
    return hidden.float() if residual is None else hidden.float() + residual.float()


_SAES: dict[str, LayerSteer] = {}


def register_sae(key: str, state: LayerSteer) -> None:
    _SAES[key] = state


@torch.library.custom_op("steer_plugin::steer", mutates_args=())
def steer(hidden: torch.Tensor, residual: torch.Tensor | None, sae_key: str) -> torch.Tensor:
    """hidden, residual: [T, d_in] (a decoder layer's two outputs; residual None for layers that
    return the stream as one tensor) -> steered hidden [T, d_in]."""
    return _SAES[sae_key].forward(hidden, residual)


@steer.register_fake
def _steer_fake(hidden: torch.Tensor, residual: torch.Tensor | None, sae_key: str) -> torch.Tensor:
    return torch.empty_like(hidden)


def _steer_all(hidden: torch.Tensor, residual: torch.Tensor | None, sae_keys: tuple[str, ...]) -> torch.Tensor:
    """hidden, residual: [T, d_in], or [1, T, d_in] from layers run by vLLM's transformers backend."""
    shape = hidden.shape
    hidden = hidden.reshape(-1, shape[-1])  # [T, d_in]
    residual = None if residual is None else residual.reshape(-1, shape[-1])
    for key in sae_keys:  # SAEs at one point of the stream, in configuration order
        hidden = torch.ops.steer_plugin.steer(hidden, residual, key)
    return hidden.reshape(shape)


class SteeredLayer(nn.Module):
    """Wraps a decoder layer and applies the op of each SAE that reads its output. Layers return
    (hidden, residual), whose sum is the stream (Llama, Qwen, Gemma, ...), or the stream as one
    tensor (GPT-2, OPT); anything else stops start-up at the first forward (vLLM's profiling run)."""

    def __init__(self, inner: nn.Module, sae_keys: tuple[str, ...]):
        super().__init__()
        self.inner = inner
        self.sae_keys = sae_keys

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return _steer_all(out, None, self.sae_keys)
        if isinstance(out, tuple) and len(out) == 2 and all(isinstance(o, torch.Tensor) for o in out):
            hidden, residual = out
            return _steer_all(hidden, residual, self.sae_keys), residual
        raise RuntimeError(f"steer_plugin: {type(self.inner).__name__} returns {type(out).__name__}, not the "
                           "residual stream as one tensor or as (hidden, residual); this model cannot be steered")


class SteeredInput(nn.Module):
    """Wraps the first decoder layer and applies the op to its input, the embeddings (an SAE on
    `blocks.0.hook_resid_pre`). The layer's `hidden_states` argument is the stream (with `residual`
    None, which vLLM passes to the first layer of models that carry one)."""

    def __init__(self, inner: nn.Module, sae_keys: tuple[str, ...]):
        super().__init__()
        self.inner = inner
        self.sae_keys = sae_keys
        layer = inner.inner if isinstance(inner, SteeredLayer) else inner  # layer 0's output may be steered too
        params = list(inspect.signature(layer.forward).parameters)
        if "hidden_states" not in params:
            raise RuntimeError(f"steer_plugin: {type(layer).__name__}.forward has no hidden_states argument; "
                               "the input of its first layer cannot be steered (hook_resid_pre of layer 0)")
        self._position = params.index("hidden_states")  # found once, not per forward (compiled code)

    def forward(self, *args, **kwargs):
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = _steer_all(kwargs["hidden_states"], None, self.sae_keys)
        else:
            args = (*args[: self._position], _steer_all(args[self._position], None, self.sae_keys),
                    *args[self._position + 1:])
        return self.inner(*args, **kwargs)
