"""The op on a CUDA device: under torch.compile and inside a captured CUDA graph, table changes
between replays take effect, padding rows stay untouched, and results match the reference."""

import numpy as np
import pytest
import torch

from sae_factory import make_sae
from steer_plugin.worker.clamp_table import ClampTable
from steer_plugin.worker.ops import LayerSteer, register_sae
from steer_plugin.reference import reference_steer
from steer_plugin.spec import Limits, parse_clamps
from steer_plugin.worker.step_layout import StepLayout

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
D_IN, D_SAE, T = 576, 1024, 8


def _setup(key):
    sae = make_sae("topk", d_in=D_IN, d_sae=D_SAE, k=32).to("cuda")
    limits = Limits.one(d_sae=D_SAE, max_clamps=4, max_activation=None)
    table = ClampTable(limits, "sae", max_tokens=64, max_reqs=8, device=torch.device("cuda"))
    register_sae(key, LayerSteer(sae, table, graph_safe=True))
    return sae, limits, table


def _fill(table, clamps_a, clamps_b, step):
    """Two requests of 3 decode... tokens each + 2 padding tokens (T = 8)."""
    raw = {f"a{step}": clamps_a, f"b{step}": clamps_b}
    table.fill(StepLayout(list(raw), np.array([3, 3]), np.array([5, 5]), np.array([4, 4]),
               lambda rid: {"feature_clamps": raw[rid]} if raw[rid] else None))


def _expected(sae, limits, hidden, residual, clamps_a, clamps_b):
    plans = [parse_clamps(c, limits) if c else None for c in (clamps_a, clamps_b)]
    token_plans = [plans[0]] * 3 + [plans[1]] * 3 + [None, None]
    is_prompt = [False] * T
    return reference_steer(sae.to("cpu"), hidden.cpu(), residual.cpu(), token_plans, is_prompt)


def test_cuda_graph_replay_follows_table_contents():
    sae, limits, table = _setup("gpu-graph")
    hidden = torch.randn(T, D_IN, device="cuda") * 3
    residual = torch.randn(T, D_IN, device="cuda") * 3
    static_out = torch.empty_like(hidden)
    _fill(table, None, None, 0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture
        static_out.copy_(torch.ops.steer_plugin.steer(hidden, residual, "gpu-graph"))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out.copy_(torch.ops.steer_plugin.steer(hidden, residual, "gpu-graph"))

    cases = [(None, None), ([{"feature": 3, "value": 40.0}], None),
             (None, [{"feature": 9, "value": 2.0, "mode": "scale"}, {"feature": 1, "value": 30.0, "mode": "add"}]),
             (None, None)]
    for step, (a, b) in enumerate(cases, start=1):
        _fill(table, a, b, step)
        graph.replay()
        torch.cuda.synchronize()
        expected = _expected(sae, limits, hidden, residual, a, b)
        torch.testing.assert_close(static_out.cpu(), expected, rtol=1e-3, atol=1e-3)
        assert torch.equal(static_out[6:], hidden[6:])  # padding rows
        if a is None:
            assert torch.equal(static_out[:3], hidden[:3])


def test_torch_compile_on_cuda():
    sae, limits, table = _setup("gpu-compile")

    @torch.compile(fullgraph=True)
    def layer(h, r):
        return torch.ops.steer_plugin.steer(h * 1.0, r, "gpu-compile")

    hidden = torch.randn(T, D_IN, device="cuda")
    residual = torch.randn(T, D_IN, device="cuda")
    for step, a in enumerate([None, [{"feature": 7, "value": 25.0}], None], start=1):
        _fill(table, a, None, 10 + step)
        out = layer(hidden, residual)
        torch.testing.assert_close(out.cpu(), _expected(sae, limits, hidden, residual, a, None),
                                   rtol=1e-3, atol=1e-3)
