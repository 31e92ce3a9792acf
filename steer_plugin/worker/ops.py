"""The steering ops: the only code that runs inside vLLM's forward pass (and its compiled graphs).

`torch.ops.steer_plugin.steer(hidden, residual, sae_key) -> hidden'` (an SAE's clamps) and
`torch.ops.steer_plugin.add_vectors(hidden, layer_key) -> hidden'` (steering vectors at a layer's
output) are registered custom ops with fake (meta) implementations, so torch.compile keeps each as
one opaque call instead of tracing (and freezing) Python, and CUDA graphs capture their kernels.
They read and write only persistent buffers (the SAE weights, the `ClampTable`, `GraphColumns`, the
stream snapshot; a layer's directions and the `VectorTable`), looked up by key.

Precision: the SAE math runs in float32 whatever the model's dtype (its matrices may be stored in the
model's 16-bit dtype on a GPU; their products still come out in float32, see `sae.matmul`); for a
bfloat16 or float16 model the stream is read into float32 and only the change is cast back (a zero
change stays zero, so unclamped tokens and identity clamps are bit-identical in every dtype).

Math, per token t with a clamp row r (Anthropic's clamp with the SAE error term kept):
    x   = hidden + residual                              the residual stream, [T, d_in]
                                                         (hidden alone for layers without a residual)
    f   = encode(x)                                      [T, d_sae]
    f'  = f with f[i] <- f[i] * mul[r, i] + add[r, i]    for the request's clamped features i whose
                                                         condition holds: f[cond i] > above[r, i]
    x'  = x + decode(f') - decode(f) = x + ((f' - f) @ W_dec) * scale
and hidden' = hidden + (x' - x). Tokens without a row are returned bit-identical.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from steer_plugin.core.sae import SAE, matmul, tensor_bytes
from steer_plugin.worker.clamp_table import ClampTable
from steer_plugin.worker.graph_columns import GraphColumns
from steer_plugin.worker.metrics import FeatureActivity, OpTimer, Series
from steer_plugin.worker.recorder import FeatureRecorder
from steer_plugin.worker.vector_table import VectorTable

logger = logging.getLogger(__name__)


def clamp_delta(f_cols: torch.Tensor, scale: torch.Tensor, W_dec_rows: torch.Tensor, slot: torch.Tensor,
                mul: torch.Tensor, add: torch.Tensor, cond_slot: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
    """decode(f') - decode(f) from the activations of U features only:
    f_cols [S, U] activations of those features; scale [S, 1] (or []) the SAE's output scale;
    W_dec_rows [U, d_in] their decoder rows; slot/mul/add [S, K] each token's clamps, as positions in
    the U features (padding: U, with mul 1 and add 0: no change); cond_slot/above [S, K] each clamp's
    condition, the position of its feature (U: none, reads 0) and the threshold it must exceed (-inf
    for none) -> delta [S, d_in]."""
    f_pad = torch.cat([f_cols, f_cols.new_zeros(f_cols.shape[0], 1)], dim=1)  # [S, U + 1]
    f_slot = f_pad.gather(1, slot)  # [S, K]
    holds = f_pad.gather(1, cond_slot) > above  # [S, K]; the stream before any clamp of this SAE
    change = torch.where(holds, f_slot * (mul - 1.0) + add, 0.0)  # f' - f at the clamped features
    df = change.new_zeros(f_cols.shape[0], f_cols.shape[1] + 1).scatter_add_(1, slot, change)[:, :-1]  # [S, U]
    return matmul(df, W_dec_rows) * scale


class LayerSteer:
    """The op at one SAE's layer: its SAE, clamp table and metrics, and the per-step decisions.

    Two paths compute the same thing:
    - host path (eager: CPU, --enforce-eager, or a GPU step run without graphs): steered tokens only,
      through the U features the step clamps (ReLU, JumpReLU; TopK encodes every feature of the
      steered tokens); nothing at all for a step without steered tokens.
    - graph path (what CUDA graphs capture and replay, Python-free): every token through the
      fixed-capacity slice of `GraphColumns`; tokens without a clamp row keep their values.
      `prepare` sends a step the graph path cannot serve (more clamped features than the slice holds,
      or a TopK SAE with a steered token) to the host path, and vLLM runs it without graphs
      (`vllm_seam`: force_eager).
    Either path leaves the stream the model continues with in `snapshot` when the step needs it
    (under graphs: always, a [T, d_in] copy), and `after_forward` reads feature metrics and
    recordings from there, outside the forward and the same way in every mode.
    """

    def __init__(self, sae: SAE, table: ClampTable, graph_safe: bool, activity: FeatureActivity | None = None,
                 recorder: FeatureRecorder | None = None, fault_feature: int | None = None,
                 timer: Series | None = None, graph_columns: int = 512):
        self.sae = sae
        self.table = table
        self.graph_safe = graph_safe
        """The op may be captured in CUDA graphs: outside host-path steps it must not branch on host state."""
        self.activity = activity
        """Feature metrics (None: not exported on this rank)."""
        self.recorder = recorder
        """Feature inspection: the per-token top-k of requests that ask."""
        self.fault_feature = fault_feature
        """Testing aid (config.FAULT_ENV): applying a clamp of this feature raises."""
        self.timer = timer
        """Where the op's host wall time goes (None: not measured, e.g. on tensor-parallel ranks but the first)."""
        max_tokens = table.tok_row.shape[0]
        self.snapshot = torch.zeros(max_tokens, sae.cfg.d_in, device=sae.W_enc.device)
        """[max_tokens, d_in] float32: the stream after the op, for metrics and recordings."""
        self.columns = (GraphColumns(sae, graph_columns, *table.feature.shape)
                        if graph_safe and sae.per_feature else None)
        self.host_step = not graph_safe
        """This step runs the host path (set by `prepare`)."""
        self._snapshot_due = False
        self._observe = False
        self._num_tokens = 0
        self._ran_host = False

    @property
    def buffer_bytes(self) -> int:
        """Device bytes of the op's persistent buffers beside the SAE's weights: the stream snapshot, the
        clamp table and, on the graph path, the feature slice."""
        t, c = self.table, self.columns
        graph = () if c is None else (*c.part, c.slot, c.cond_slot)
        return tensor_bytes(self.snapshot, t.tok_row, t.feature, t.mul, t.add, t.above, *graph)

    # ---- between steps (host) -----------------------------------------------------------------
    def prepare(self, num_tokens: int) -> None:
        """Before the forward, after the table and the recorder were filled for the step."""
        t = self.table
        self._num_tokens = num_tokens
        self._observe = self.activity is not None and self.activity.due()
        self._snapshot_due = self._observe or (self.recorder is not None and self.recorder.num_tokens > 0)
        self._ran_host = False
        if not self.graph_safe:
            self.host_step = True
        elif t.num_steered_tokens == 0:
            self.host_step = False
        else:
            columns = t.columns.numpy()  # only a steered step on the graph path needs the step's columns
            self.host_step = self.columns is None or not self.columns.fits(columns)
            if not self.host_step:
                self.columns.load(columns, t.compact.numpy(), t.cond_compact.numpy())

    def after_forward(self) -> None:
        """After the forward: check the step was steered as planned, then metrics and recordings."""
        if self.host_step and not self._ran_host and self.table.num_steered_tokens:
            # vLLM replayed a graph for a step the graph path cannot serve: never answer unsteered
            logger.error("action=failed reqs=%s reason=graph_replayed_for_host_step", ",".join(self.table.step_steered))
            self.table.fail_step()
        if self.activity is not None:
            self.activity.export()
        stream = self.snapshot[: self._num_tokens]
        if self._observe:
            self.activity.observe(self.sae, stream)
        if self.recorder is not None and self.recorder.num_tokens > 0:
            self.recorder.record(self.sae, stream)
        # between steps (warm-up, capture, data-parallel dummy runs) the graph path is the default
        self.host_step = not self.graph_safe

    # ---- in the forward ---------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """hidden, residual: [T, d_in] (residual None: hidden is the whole stream) -> hidden' [T, d_in]."""
        if not self.host_step:  # captured, or replayed without Python: fixed shapes, no branching
            out = self._steer_graph(hidden, residual)
            self.snapshot[: hidden.shape[0]].copy_(_stream(out, residual))
            return out
        self._ran_host = True
        with OpTimer(self.timer):
            out = self._apply(hidden, residual)
            if self._snapshot_due:
                self.snapshot[: hidden.shape[0]].copy_(_stream(out, residual))
            return out

    def _apply(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The host path: a failure fails the requests steered in this step (the scheduler finishes
        them with an error and drops this step's tokens), not the step."""
        try:
            if self.fault_feature is not None and bool((self.table.columns == self.fault_feature).any()):
                raise RuntimeError(f"injected fault: applying a clamp of feature {self.fault_feature}")
            return self._steer_host(hidden, residual)
        except Exception:
            logger.exception("action=failed reqs=%s reason=op_failed", ",".join(self.table.step_steered))
            self.table.fail_step()
            return hidden.clone()

    def _steer_host(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        t = self.table
        if t.num_steered_tokens == 0:
            return hidden.clone()
        device = hidden.device
        idx = t.steered_tokens.to(device, non_blocking=True)  # [S]
        x = _stream(hidden.index_select(0, idx), None if residual is None else residual.index_select(0, idx))
        rows = t.tok_row.index_select(0, idx).long()  # [S]
        columns = t.columns.to(device, non_blocking=True)  # [U]
        if self.sae.per_feature:
            part = self.sae.slice(columns)
            f_cols, norm = self.sae.encode_slice(x, part)  # [S, U]
            W_dec_rows = part.W_dec
        else:  # TopK: which k survive depends on every pre-activation
            f, norm = self.sae.encode(x)  # [S, d_sae]
            f_cols, W_dec_rows = f.index_select(1, columns), self.sae.W_dec.index_select(0, columns)
        slot = t.compact.to(device, non_blocking=True)[rows]  # [S, K] positions in columns; padding U
        cond_slot = t.cond_compact.to(device, non_blocking=True)[rows]  # [S, K]
        delta = clamp_delta(f_cols, norm.scale, W_dec_rows, slot, t.mul[rows], t.add[rows],
                            cond_slot, t.above[rows])  # [S, d_in] float32
        return hidden.index_add(0, idx, delta.to(hidden.dtype))

    def _steer_graph(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if self.columns is None:  # TopK: steps that steer run on the host path
            return hidden.clone()
        t, c = self.table, self.columns
        rows = t.tok_row[: hidden.shape[0]]  # [T]; -1: unsteered, and CUDA-graph padding
        r = rows.clamp_min(0).long()
        f_cols, norm = self.sae.encode_slice(_stream(hidden, residual), c.part)  # [T, C]
        delta = clamp_delta(f_cols, norm.scale, c.part.W_dec, c.slot[r], t.mul[r], t.add[r],
                            c.cond_slot[r], t.above[r])  # [T, d_in]
        return torch.where((rows >= 0).unsqueeze(-1), hidden + delta.to(hidden.dtype), hidden)


class LayerVectors:
    """The steering vectors at one layer's output: hidden' = hidden + scale[row] @ directions for the
    tokens with a row of the `VectorTable` (added to `hidden`, so to the stream hidden + residual).
    Host path: the steered tokens only, nothing for a step without any; graph path (CUDA graphs, no
    branching on host state): every token, those without a row keep their values."""

    def __init__(self, directions: torch.Tensor, table: VectorTable, graph_safe: bool):
        self.directions = directions
        """[V, d_in] float32: each loaded vector's direction at this layer (zeros where it has none)."""
        self.table = table
        self.graph_safe = graph_safe

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [T, d_in] -> [T, d_in]."""
        t = self.table
        if self.graph_safe:
            rows = t.tok_row[: hidden.shape[0]]  # [T]; -1: unsteered, and CUDA-graph padding
            delta = matmul(t.scale[rows.clamp_min(0).long()], self.directions)  # [T, d_in]
            return torch.where((rows >= 0).unsqueeze(-1), hidden + delta.to(hidden.dtype), hidden)
        if t.num_steered_tokens == 0:
            return hidden.clone()
        idx = t.steered_tokens.to(hidden.device, non_blocking=True)  # [S]
        rows = t.tok_row.index_select(0, idx).long()  # [S]
        delta = matmul(t.scale[rows], self.directions)  # [S, d_in] float32
        return hidden.index_add(0, idx, delta.to(hidden.dtype))


def _stream(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The residual stream [T, d_in] in float32 (the SAE's dtype), from a layer's output."""
    return hidden.float() if residual is None else hidden.float() + residual.float()


_SAES: dict[str, LayerSteer] = {}
_VECTORS: dict[str, LayerVectors] = {}


def register_sae(key: str, state: LayerSteer) -> None:
    _SAES[key] = state


def register_vectors(key: str, state: LayerVectors) -> None:
    _VECTORS[key] = state


@torch.library.custom_op("steer_plugin::steer", mutates_args=())
def steer(hidden: torch.Tensor, residual: torch.Tensor | None, sae_key: str) -> torch.Tensor:
    """hidden, residual: [T, d_in] (a decoder layer's two outputs; residual None for layers that
    return the stream as one tensor) -> steered hidden [T, d_in]."""
    return _SAES[sae_key].forward(hidden, residual)


@steer.register_fake
def _steer_fake(hidden: torch.Tensor, residual: torch.Tensor | None, sae_key: str) -> torch.Tensor:
    return torch.empty_like(hidden)


@torch.library.custom_op("steer_plugin::add_vectors", mutates_args=())
def add_vectors(hidden: torch.Tensor, layer_key: str) -> torch.Tensor:
    """hidden: [T, d_in] a decoder layer's output (its hidden part) -> with the step's vectors added."""
    return _VECTORS[layer_key].forward(hidden)


@add_vectors.register_fake
def _add_vectors_fake(hidden: torch.Tensor, layer_key: str) -> torch.Tensor:
    return torch.empty_like(hidden)


def _steer_all(hidden: torch.Tensor, residual: torch.Tensor | None, sae_keys: tuple[str, ...],
               vector_key: str | None = None) -> torch.Tensor:
    """hidden, residual: [T, d_in], or [1, T, d_in] from layers run by vLLM's transformers backend.
    Vectors first: they are part of the layer's output (llama.cpp's convention), which SAEs read."""
    shape = hidden.shape
    hidden = hidden.reshape(-1, shape[-1])  # [T, d_in]
    residual = None if residual is None else residual.reshape(-1, shape[-1])
    if vector_key is not None:
        hidden = torch.ops.steer_plugin.add_vectors(hidden, vector_key)
    for key in sae_keys:  # SAEs at one point of the stream, in configuration order
        hidden = torch.ops.steer_plugin.steer(hidden, residual, key)
    return hidden.reshape(shape)


class SteeredLayer(nn.Module):
    """Wraps a decoder layer and applies its steering vectors and the op of each SAE that reads its
    output. Layers return (hidden, residual), whose sum is the stream (Llama, Qwen, Gemma, ...), or
    the stream as one tensor (GPT-2, OPT); anything else stops start-up at the first forward (vLLM's
    profiling run)."""

    def __init__(self, inner: nn.Module, sae_keys: tuple[str, ...], vector_key: str | None = None):
        super().__init__()
        self.inner = inner
        self.sae_keys = sae_keys
        self.vector_key = vector_key

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return _steer_all(out, None, self.sae_keys, self.vector_key)
        if isinstance(out, tuple) and len(out) == 2 and all(isinstance(o, torch.Tensor) for o in out):
            hidden, residual = out
            return _steer_all(hidden, residual, self.sae_keys, self.vector_key), residual
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
