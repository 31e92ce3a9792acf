"""The op on a CUDA device, inside a captured CUDA graph and under torch.compile: table changes
between replays take effect, padding rows stay untouched, results match the reference, and feature
metrics and recordings read after each replay see the stream the replay produced."""

import json

import numpy as np
import pytest
import torch

from sae_factory import make_sae
from steer_plugin.core.reference import reference_steer
from steer_plugin.core.sae import SAE
from steer_plugin.core.spec import RECORD_FIELD, Limits, parse_clamps
from steer_plugin.worker.clamp_table import ClampTable
from steer_plugin.worker.metrics import FeatureActivity
from steer_plugin.worker.ops import LayerSteer, register_sae
from steer_plugin.worker.recorder import FeatureRecorder
from steer_plugin.worker.step_layout import StepLayout

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
D_IN, D_SAE, T = 576, 1024, 8
REAL = 6  # two requests of 3 tokens; the last 2 of T are CUDA-graph padding


def _setup(key, architecture="jumprelu", dtype=torch.float32):
    """The float32 SAE (the reference's), limits, table, and an op whose SAE stores its matrices in `dtype`."""
    sae = make_sae(architecture, d_in=D_IN, d_sae=D_SAE, k=32).to("cuda")
    stored = SAE(sae.cfg, {n: getattr(sae, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
                           if getattr(sae, n) is not None}, dtype)
    limits = Limits.one(d_sae=D_SAE, max_clamps=5, max_activation=None)
    table = ClampTable(limits, "sae", max_tokens=64, max_reqs=8, device=torch.device("cuda"))
    activity = FeatureActivity(key, D_SAE, sample_every=1, watch=(), top_n=0)
    recorder = FeatureRecorder("sae")
    op = LayerSteer(stored, table, graph_safe=True, activity=activity, recorder=recorder, graph_columns=8)
    register_sae(key, op)
    return sae, limits, table, op


def _step(table, op, clamps_a, clamps_b, step, record_key=None, computed=5):
    """Fill the table (and the recorder) for two requests of 3 tokens each after `computed` positions
    (prompts of 4), then plan the step."""
    extra = {f"a{step}": {"feature_clamps": clamps_a} if clamps_a else {},
             f"b{step}": {"feature_clamps": clamps_b} if clamps_b else {}}
    if record_key is not None:
        extra[f"a{step}"][RECORD_FIELD] = json.dumps({"key": record_key, "sae": "sae", "top_k": 4,
                                                     "scope": "generation"})
    layout = StepLayout(list(extra), np.array([3, 3]), np.array([computed, computed]), np.array([4, 4]),
                        lambda rid: extra[rid] or None)
    table.fill(layout)
    op.recorder.fill(layout)
    op.prepare(layout.num_tokens)


def _expected(sae, limits, hidden, residual, clamps_a, clamps_b):
    plans = [parse_clamps(c, limits) if c else None for c in (clamps_a, clamps_b)]
    token_plans = [plans[0]] * 3 + [plans[1]] * 3 + [None, None]
    positions = [5, 6, 7] * 2 + [0, 0]
    return reference_steer(sae.to("cpu"), hidden.cpu(), residual.cpu(), token_plans, positions, [4] * T)


def _capture(key, hidden, residual):
    static_out = torch.empty_like(hidden)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture
        static_out.copy_(torch.ops.steer_plugin.steer(hidden, residual, key))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out.copy_(torch.ops.steer_plugin.steer(hidden, residual, key))
    return graph, static_out


def _captured(key):
    """An op set up under `key`, its inputs, and a CUDA graph of it captured on an unsteered step."""
    sae, limits, table, op = _setup(key)
    hidden = torch.randn(T, D_IN, device="cuda") * 3
    residual = torch.randn(T, D_IN, device="cuda") * 3
    _step(table, op, None, None, 0)
    graph, static_out = _capture(key, hidden, residual)
    return sae, limits, table, op, hidden, residual, graph, static_out


def _replay(graph, op):
    graph.replay()
    op.after_forward()
    torch.cuda.synchronize()


def test_cuda_graph_replay_follows_table_contents():
    sae, limits, table, op, hidden, residual, graph, static_out = _captured("gpu-graph")
    cases = [(None, None), ([{"feature": 3, "value": 40.0}], None),
             (None, [{"feature": 9, "value": 2.0, "mode": "scale"}, {"feature": 1, "value": 30.0, "mode": "add"}]),
             ([{"feature": 700, "value": 10.0}], [{"feature": 3, "value": 5.0}]), (None, None)]
    for step, (a, b) in enumerate(cases, start=1):
        _step(table, op, a, b, step)
        assert not op.host_step  # the graph path serves all of them
        _replay(graph, op)
        torch.testing.assert_close(static_out.cpu(), _expected(sae, limits, hidden, residual, a, b),
                                   rtol=1e-3, atol=1e-3)
        assert torch.equal(static_out[REAL:], hidden[REAL:])  # padding rows
        if a is None:
            assert torch.equal(static_out[:3], hidden[:3])
        assert not table.failed


def test_metrics_and_recording_under_a_cuda_graph():
    """Metrics and recordings are read after each replay from the snapshot the graph writes."""
    sae, _, table, op, _, residual, graph, static_out = _captured("gpu-observe")
    clamps = [{"feature": 11, "value": 25.0}]
    sampled = []
    for step in (1, 2):
        _step(table, op, clamps, None, step, record_key="gpu-record-key", computed=5 + 3 * (step - 1))
        _replay(graph, op)
        sampled.append((static_out[:REAL].float() + residual[:REAL]).cpu())
    op.activity.export(wait=True)
    record = op.recorder.pop("gpu-record-key")
    f, _ = sae.to("cpu").encode(torch.cat([s[:3] for s in sampled]))
    assert record["positions"] == list(range(5, 11))
    np.testing.assert_allclose(record["values"], f.topk(4).values.numpy(), rtol=1e-3, atol=1e-3)
    assert 11 in np.asarray(record["ids"])[:, 0]  # the clamped feature leads
    fired = sum((sae.to("cpu").encode(s)[0] > 0).sum(0).numpy() for s in sampled)
    np.testing.assert_array_equal(op.activity.fired, fired)


def test_steered_topk_and_wide_steps_take_the_host_path():
    """TopK cannot be encoded per feature, and a step clamping more features than the slice holds does
    not fit it: both run the host path (vLLM runs such a step without graphs), and match the reference."""
    for architecture, a in (("topk", [{"feature": 3, "value": 40.0}]),
                            ("jumprelu", [{"feature": f, "value": 9.0} for f in range(100, 104)])):
        key = f"gpu-host-{architecture}"
        sae, limits, table, op = _setup(key, architecture)
        b = [{"feature": f, "value": 7.0} for f in range(200, 205)] if architecture == "jumprelu" else None
        hidden = torch.randn(T, D_IN, device="cuda") * 3
        residual = torch.randn(T, D_IN, device="cuda") * 3
        _step(table, op, a, b, 1)
        assert op.host_step
        out = torch.ops.steer_plugin.steer(hidden, residual, key)
        op.after_forward()
        torch.testing.assert_close(out.cpu(), _expected(sae, limits, hidden, residual, a, b), rtol=1e-3, atol=1e-3)
        assert not table.failed


def test_torch_compile_on_cuda():
    sae, limits, table, op = _setup("gpu-compile")

    @torch.compile(fullgraph=True)
    def layer(h, r):
        return torch.ops.steer_plugin.steer(h * 1.0, r, "gpu-compile")

    hidden = torch.randn(T, D_IN, device="cuda")
    residual = torch.randn(T, D_IN, device="cuda")
    for step, a in enumerate([None, [{"feature": 7, "value": 25.0}], None], start=1):
        _step(table, op, a, None, 10 + step)
        out = layer(hidden, residual)
        torch.testing.assert_close(out.cpu(), _expected(sae, limits, hidden, residual, a, None),
                                   rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_sae_stored_in_16_bit_under_a_cuda_graph_matches_the_float32_reference(dtype):
    """`sae_dtype: auto` for a 16-bit model on a GPU: the matrices in the model's dtype (products on its
    16-bit kernels, accumulated in float32); a replayed graph agrees with the float32 SAE's reference
    within that dtype's rounding, and unsteered rows stay bit-identical."""
    key = f"gpu-stored-{dtype}"
    sae, limits, table, op = _setup(key, "standard", dtype)  # ReLU: no threshold for rounding to cross
    assert op.sae.W_enc.dtype == dtype and op.sae.b_enc.dtype == torch.float32
    hidden = torch.randn(T, D_IN, device="cuda") * 3
    residual = torch.randn(T, D_IN, device="cuda") * 3
    _step(table, op, None, None, 0)
    graph, static_out = _capture(key, hidden, residual)
    a, b = [{"feature": 3, "value": 40.0}], [{"feature": 9, "value": 2.0, "mode": "scale"}]
    _step(table, op, a, b, 1)
    _replay(graph, op)
    expected = _expected(sae, limits, hidden, residual, a, b)
    moved = float((expected - hidden.cpu()).abs().max())
    assert moved > 1.0
    torch.testing.assert_close(static_out.cpu(), expected, rtol=2e-2, atol=0.02 * moved)
    assert torch.equal(static_out[REAL:], hidden[REAL:])
