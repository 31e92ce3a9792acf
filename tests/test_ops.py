"""The registered op (ops.py) against the eager reference (reference.py) on random batches."""

import numpy as np
import pytest
import torch

from sae_factory import make_sae
from steer_plugin.worker.clamp_table import ClampTable
from steer_plugin.worker.ops import LayerSteer, register_sae
from steer_plugin.reference import reference_steer
from steer_plugin.spec import Limits, parse_clamps
from steer_plugin.worker.step_layout import StepLayout

D_IN, D_SAE = 32, 64


def _batch(seed: int):
    """Four requests: prefill of a fresh prompt, decode, a chunk crossing prompt->generated, unsteered."""
    rng = np.random.default_rng(seed)
    req_ids = ["a", "b", "c", "d"]
    num_sched = np.array([5, 1, 4, 3])
    num_computed = np.array([0, 9, 6, 2])
    num_prompt = np.array([7, 6, 8, 9])
    plans = {
        "a": [{"feature": 3, "value": 5.0}, {"feature": 10, "value": 0.0}],
        "b": [{"feature": 7, "value": 2.0, "mode": "add", "tokens": "generated"}],
        "c": [{"feature": 1, "value": 3.0, "mode": "scale", "tokens": "prompt"},
              {"feature": int(rng.integers(0, D_SAE)) | 32, "value": -4.0, "tokens": "generated"}],
        "d": None,
    }
    return req_ids, num_sched, num_computed, num_prompt, plans


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize("graph_safe", [False, True])
def test_op_matches_reference(arch, normalize, graph_safe):
    sae = make_sae(arch, d_in=D_IN, d_sae=D_SAE, k=8, normalize=normalize)
    limits = Limits.one(d_sae=D_SAE, max_clamps=4, max_activation=None)
    table = ClampTable(limits, "sae", max_tokens=32, max_reqs=8, device=torch.device("cpu"))
    req_ids, num_sched, num_computed, num_prompt, raw = _batch(0)
    table.fill(StepLayout(req_ids, num_sched, num_computed, num_prompt,
               lambda rid: {"feature_clamps": raw[rid]} if raw[rid] else None))
    key = f"test-{arch}-{normalize}-{graph_safe}"
    register_sae(key, LayerSteer(sae, table, graph_safe=graph_safe))

    T = int(num_sched.sum())
    torch.manual_seed(1)
    hidden, residual = torch.randn(T, D_IN) * 3, torch.randn(T, D_IN) * 3
    out = torch.ops.steer_plugin.steer(hidden, residual, key)

    token_plans, positions, prompt_lens = [], [], []
    for i, rid in enumerate(req_ids):
        plan = parse_clamps(raw[rid], limits) if raw[rid] else None
        for j in range(num_sched[i]):
            token_plans.append(plan)
            positions.append(int(num_computed[i] + j))
            prompt_lens.append(int(num_prompt[i]))
    expected = reference_steer(sae, hidden, residual, token_plans, positions, prompt_lens)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # Request "d" is unclamped: bit-identical.
    assert torch.equal(out[-3:], hidden[-3:])
    assert not torch.equal(out[:5], hidden[:5])


def test_identity_clamps_change_nothing_but_rounding():
    sae = make_sae("topk", d_in=D_IN, d_sae=D_SAE, k=8)
    limits = Limits.one(d_sae=D_SAE, max_clamps=4, max_activation=None)
    table = ClampTable(limits, "sae", max_tokens=16, max_reqs=4, device=torch.device("cpu"))
    clamps = [{"feature": 2, "value": 1.0, "mode": "scale"}, {"feature": 5, "value": 0.0, "mode": "add"}]
    table.fill(StepLayout(["r"], np.array([6]), np.array([0]), np.array([6]), lambda _: {"feature_clamps": clamps}))
    register_sae("identity", LayerSteer(sae, table, graph_safe=False))
    hidden, residual = torch.randn(6, D_IN), torch.randn(6, D_IN)
    assert torch.equal(torch.ops.steer_plugin.steer(hidden, residual, "identity"), hidden)


def test_op_under_torch_compile_follows_table_changes():
    """The compiled graph keeps the op as a call: a table change after compilation takes effect."""
    sae = make_sae("topk", d_in=D_IN, d_sae=D_SAE, k=8)
    limits = Limits.one(d_sae=D_SAE, max_clamps=4, max_activation=None)
    table = ClampTable(limits, "sae", max_tokens=16, max_reqs=4, device=torch.device("cpu"))
    register_sae("compiled", LayerSteer(sae, table, graph_safe=True))

    @torch.compile(fullgraph=True, dynamic=False)
    def layer(h, r):
        h = h * 1.0 + 0.0
        return torch.ops.steer_plugin.steer(h, r, "compiled") + 0.0

    hidden, residual = torch.randn(4, D_IN), torch.randn(4, D_IN)
    table.fill(StepLayout(["r1"], np.array([4]), np.array([0]), np.array([4]), lambda _: None))
    assert torch.equal(layer(hidden, residual), hidden)
    table.fill(StepLayout(["r2"], np.array([4]), np.array([0]), np.array([4]),
               lambda _: {"feature_clamps": [{"feature": 3, "value": 50.0}]}))
    assert not torch.allclose(layer(hidden, residual), hidden)
    table.fill(StepLayout(["r3"], np.array([4]), np.array([0]), np.array([4]), lambda _: None))
    assert torch.equal(layer(hidden, residual), hidden)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("graph_safe", [False, True])
def test_half_precision_stream_is_steered_in_float32(dtype, graph_safe):
    """The op reads a half-precision stream into float32, does the SAE math there and adds the change
    cast back: out == hidden + (reference delta of the float32 stream).to(dtype); identity clamps and
    unclamped tokens are bit-identical."""
    sae = make_sae("jumprelu", d_in=D_IN, d_sae=D_SAE)
    limits = Limits.one(d_sae=D_SAE, max_clamps=4, max_activation=None)
    table = ClampTable(limits, "sae", max_tokens=16, max_reqs=4, device=torch.device("cpu"))
    clamps = {"s": [{"feature": 3, "value": 5.0}], "i": [{"feature": 2, "value": 1.0, "mode": "scale"}], "u": None}
    table.fill(StepLayout(["s", "i", "u"], np.array([3, 2, 2]), np.array([0, 0, 0]), np.array([3, 2, 2]),
                          lambda rid: {"feature_clamps": clamps[rid]} if clamps[rid] else None))
    key = f"half-{dtype}-{graph_safe}"
    register_sae(key, LayerSteer(sae, table, graph_safe=graph_safe))
    hidden, residual = (torch.randn(7, D_IN) * 2).to(dtype), (torch.randn(7, D_IN) * 2).to(dtype)
    out = torch.ops.steer_plugin.steer(hidden, residual, key)
    assert out.dtype == dtype and torch.equal(out[3:], hidden[3:])
    plan = parse_clamps(clamps["s"], limits)
    h32, r32 = hidden[:3].float(), residual[:3].float()
    delta = reference_steer(sae, h32, r32, [plan] * 3, [0, 1, 2], [3] * 3) - h32
    assert torch.equal(out[:3], hidden[:3] + delta.to(dtype))


def test_layers_that_return_one_tensor_and_batched_streams():
    """GPT-2-like layers return the stream as one tensor (no residual); vLLM's transformers backend
    hands [1, T, d] to its layers. Both are steered like (hidden, residual) = (stream, 0)."""
    from torch import nn

    from steer_plugin.worker.ops import SteeredLayer

    sae = make_sae("standard", d_in=D_IN, d_sae=D_SAE)
    limits = Limits.one(d_sae=D_SAE, max_clamps=4, max_activation=None)
    table = ClampTable(limits, "sae", max_tokens=16, max_reqs=4, device=torch.device("cpu"))
    clamps = [{"feature": 3, "value": 5.0}]
    table.fill(StepLayout(["r"], np.array([5]), np.array([0]), np.array([5]), lambda _: {"feature_clamps": clamps}))
    register_sae("single", LayerSteer(sae, table, graph_safe=False))
    stream = torch.randn(5, D_IN)
    expected = reference_steer(sae, stream, torch.zeros_like(stream), [parse_clamps(clamps, limits)] * 5,
                               list(range(5)), [5] * 5)
    for shape in ((5, D_IN), (1, 5, D_IN)):
        layer = SteeredLayer(nn.Identity(), ("single",))
        torch.testing.assert_close(layer(stream.reshape(shape)), expected.reshape(shape), rtol=1e-5, atol=1e-5)
