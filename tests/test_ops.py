"""The registered op (ops.py) against the eager reference (reference.py) on random batches."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sae_factory import make_sae
from steer_plugin.worker.attach import storage_dtype
from steer_plugin.worker.clamp_table import ClampTable
from steer_plugin.worker.ops import LayerSteer, LayerVectors, register_sae, register_vectors
from steer_plugin.worker.vector_table import VectorTable
from steer_plugin.core.reference import reference_steer, reference_vectors
from steer_plugin.core.sae import SAE
from steer_plugin.core.spec import Limits, parse_clamps, parse_vectors
from steer_plugin.worker.step_layout import StepLayout

D_IN, D_SAE = 32, 64


def _install(key: str, sae, table, graph_safe: bool, **kwargs) -> LayerSteer:
    op = LayerSteer(sae, table, graph_safe=graph_safe, **kwargs)
    register_sae(key, op)
    return op


def _step(table: ClampTable, op: LayerSteer, layout: StepLayout) -> None:
    """What the worker does before each forward: fill the table, then let the op plan the step."""
    table.fill(layout)
    op.prepare(layout.num_tokens)


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
    key = f"test-{arch}-{normalize}-{graph_safe}"
    op = _install(key, sae, table, graph_safe)
    _step(table, op, StepLayout(req_ids, num_sched, num_computed, num_prompt,
                                lambda rid: {"feature_clamps": raw[rid]} if raw[rid] else None))
    # the graph path serves per-feature SAEs; a steered TopK step goes to the host path
    assert op.host_step == (not graph_safe or arch == "topk")

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


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize("graph_safe", [False, True])
def test_conditional_clamps_act_exactly_where_their_condition_holds(arch, graph_safe):
    """Two requests of one step, each with a conditional clamp ("active", and another feature above a
    threshold) beside an unconditional one on the other: positions where no condition holds are
    bit-identical, the rest match the reference, on both paths."""
    sae = make_sae(arch, d_in=D_IN, d_sae=D_SAE, k=8)
    torch.manual_seed(2)
    hidden, residual = torch.randn(12, D_IN) * 3, torch.randn(12, D_IN) * 3
    f = sae.encode(hidden + residual)[0]  # [12, d_sae] before any clamp
    share = (f > 0).float().mean(0)
    x = int((share - 0.5).abs().argmin())  # a feature active at about half the positions
    y = int((share - 0.5).abs().argsort()[1])
    values = f[:, y].sort().values
    cut = int((values[1:] - values[:-1])[4:8].argmax()) + 4  # a threshold far from every value
    above = float(values[cut] + values[cut + 1]) / 2
    raw = {"a": [{"feature": x, "value": 6.0, "when": "active"}, {"feature": 7, "value": 1.5, "mode": "scale"}],
           "b": [{"feature": x ^ 1, "value": 3.0, "mode": "add", "when": {"feature": y, "above": above}}]}
    limits = Limits.one(d_sae=D_SAE, max_clamps=4, max_activation=None)
    table = ClampTable(limits, "sae", max_tokens=16, max_reqs=4, device=torch.device("cpu"))
    op = _install(f"when-{arch}-{graph_safe}", sae, table, graph_safe)
    _step(table, op, StepLayout(["a", "b"], np.array([6, 6]), np.array([0, 0]), np.array([6, 6]),
                                lambda rid: {"feature_clamps": raw[rid]}))
    assert op.host_step == (not graph_safe or arch == "topk")
    out = torch.ops.steer_plugin.steer(hidden, residual, f"when-{arch}-{graph_safe}")

    plans = [parse_clamps(raw[rid], limits) for rid in ("a", "b")]
    expected = reference_steer(sae, hidden, residual, [plans[0]] * 6 + [plans[1]] * 6,
                               list(range(6)) * 2, [6] * 12)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # request b has only its conditional clamp: untouched exactly where the condition fails
    holds = f[6:, y] > above
    assert 0 < int(holds.sum()) < 6
    assert torch.equal(out[6:][~holds], hidden[6:][~holds])
    assert not (out[6:][holds] == hidden[6:][holds]).all(dim=1).any()


@pytest.mark.parametrize("graph_safe", [False, True])
def test_vectors_are_added_at_each_requests_scope_and_scale(graph_safe):
    """Four requests of one step (prefill, decode, a chunk across the prompt's end, and one at scale 0)
    against the reference; the request at scale 0 is bit-identical."""
    limits = Limits.one(d_sae=D_SAE, max_clamps=4, vectors=("a", "b"))
    table = VectorTable(limits, max_tokens=32, max_reqs=8, device=torch.device("cpu"))
    torch.manual_seed(3)
    directions = torch.randn(2, D_IN)
    register_vectors(f"vectors-{graph_safe}", LayerVectors(directions, table, graph_safe))
    req_ids, num_sched, num_computed, num_prompt = ["p", "q", "r", "s"], [5, 1, 4, 3], [0, 9, 6, 2], [7, 6, 8, 9]
    raw = {"p": [{"vector": "a", "scale": 2.0}], "q": [{"vector": "b", "scale": -1.0, "tokens": "generated"}],
           "r": [{"vector": "a", "scale": 0.5, "tokens": "prompt"}, {"vector": "b", "scale": 3.0}],
           "s": [{"vector": "a", "scale": 0.0}]}
    table.fill(StepLayout(req_ids, np.array(num_sched), np.array(num_computed), np.array(num_prompt),
                          lambda rid: {"steering_vectors": raw[rid]}))
    assert table.step_steered == ["p", "q", "r"]  # scale 0: no row at all
    hidden = torch.randn(13, D_IN)
    out = torch.ops.steer_plugin.add_vectors(hidden, f"vectors-{graph_safe}")
    plans, positions, prompt_lens = [], [], []
    for i, rid in enumerate(req_ids):
        for j in range(num_sched[i]):
            plans.append(parse_vectors(raw[rid], limits))
            positions.append(num_computed[i] + j)
            prompt_lens.append(num_prompt[i])
    torch.testing.assert_close(out, reference_vectors(directions, hidden, plans, positions, prompt_lens))
    assert torch.equal(out[-3:], hidden[-3:])
    assert not torch.equal(out[:5], hidden[:5])


def test_identity_clamps_change_nothing_but_rounding():
    sae = make_sae("topk", d_in=D_IN, d_sae=D_SAE, k=8)
    limits = Limits.one(d_sae=D_SAE, max_clamps=4, max_activation=None)
    table = ClampTable(limits, "sae", max_tokens=16, max_reqs=4, device=torch.device("cpu"))
    clamps = [{"feature": 2, "value": 1.0, "mode": "scale"}, {"feature": 5, "value": 0.0, "mode": "add"}]
    _step(table, _install("identity", sae, table, False),
          StepLayout(["r"], np.array([6]), np.array([0]), np.array([6]), lambda _: {"feature_clamps": clamps}))
    hidden, residual = torch.randn(6, D_IN), torch.randn(6, D_IN)
    assert torch.equal(torch.ops.steer_plugin.steer(hidden, residual, "identity"), hidden)


def test_op_under_torch_compile_follows_table_changes():
    """The compiled graph keeps the op as a call: a table change after compilation takes effect."""
    sae = make_sae("topk", d_in=D_IN, d_sae=D_SAE, k=8)
    limits = Limits.one(d_sae=D_SAE, max_clamps=4, max_activation=None)
    table = ClampTable(limits, "sae", max_tokens=16, max_reqs=4, device=torch.device("cpu"))
    op = _install("compiled", sae, table, True)

    @torch.compile(fullgraph=True, dynamic=False)
    def layer(h, r):
        h = h * 1.0 + 0.0
        return torch.ops.steer_plugin.steer(h, r, "compiled") + 0.0

    hidden, residual = torch.randn(4, D_IN), torch.randn(4, D_IN)
    _step(table, op, StepLayout(["r1"], np.array([4]), np.array([0]), np.array([4]), lambda _: None))
    assert torch.equal(layer(hidden, residual), hidden)
    _step(table, op, StepLayout(["r2"], np.array([4]), np.array([0]), np.array([4]),
                                lambda _: {"feature_clamps": [{"feature": 3, "value": 50.0}]}))
    assert not torch.allclose(layer(hidden, residual), hidden)
    _step(table, op, StepLayout(["r3"], np.array([4]), np.array([0]), np.array([4]), lambda _: None))
    assert torch.equal(layer(hidden, residual), hidden)


def _three_requests(dtype, graph_safe: bool, key: str, sae, reference, steered: list[dict]):
    """One step of a `dtype` stream: `steered` clamps on request s (3 tokens), an identity clamp on i
    (2), none on u (2). Checks that i and u come back bit-identical; returns (out, hidden, the float32
    reference's change of s's tokens, computed with the SAE `reference`)."""
    limits = Limits.one(d_sae=D_SAE, max_clamps=4, max_activation=None)
    table = ClampTable(limits, "sae", max_tokens=16, max_reqs=4, device=torch.device("cpu"))
    clamps = {"s": steered, "i": [{"feature": 2, "value": 1.0, "mode": "scale"}], "u": None}
    _step(table, _install(key, sae, table, graph_safe),
          StepLayout(["s", "i", "u"], np.array([3, 2, 2]), np.array([0, 0, 0]), np.array([3, 2, 2]),
                     lambda rid: {"feature_clamps": clamps[rid]} if clamps[rid] else None))
    hidden, residual = (torch.randn(7, D_IN) * 2).to(dtype), (torch.randn(7, D_IN) * 2).to(dtype)
    out = torch.ops.steer_plugin.steer(hidden, residual, key)
    assert out.dtype == dtype and torch.equal(out[3:], hidden[3:])
    h32, r32 = hidden[:3].float(), residual[:3].float()
    return out, hidden, reference_steer(reference, h32, r32, [parse_clamps(steered, limits)] * 3, [0, 1, 2],
                                        [3] * 3) - h32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("graph_safe", [False, True])
def test_half_precision_stream_is_steered_in_float32(dtype, graph_safe):
    """The op reads a half-precision stream into float32, does the SAE math there and adds the change
    cast back: out == hidden + (reference delta of the float32 stream).to(dtype); identity clamps and
    unclamped tokens are bit-identical."""
    sae = make_sae("jumprelu", d_in=D_IN, d_sae=D_SAE)
    out, hidden, delta = _three_requests(dtype, graph_safe, f"half-{dtype}-{graph_safe}", sae, sae,
                                         [{"feature": 3, "value": 5.0}])
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
    _step(table, _install("single", sae, table, False),
          StepLayout(["r"], np.array([5]), np.array([0]), np.array([5]), lambda _: {"feature_clamps": clamps}))
    stream = torch.randn(5, D_IN)
    expected = reference_steer(sae, stream, torch.zeros_like(stream), [parse_clamps(clamps, limits)] * 5,
                               list(range(5)), [5] * 5)
    for shape in ((5, D_IN), (1, 5, D_IN)):
        layer = SteeredLayer(nn.Identity(), ("single",))
        torch.testing.assert_close(layer(stream.reshape(shape)), expected.reshape(shape), rtol=1e-5, atol=1e-5)


def _one_request(features: list[int], n: int = 3, rid: str = "r") -> StepLayout:
    clamps = [{"feature": f, "value": 20.0 + f} for f in features]
    return StepLayout([rid], np.array([n]), np.array([0]), np.array([n]), lambda _: {"feature_clamps": clamps})


def _expected_one(sae, limits, hidden, residual, features):
    plan = parse_clamps([{"feature": f, "value": 20.0 + f} for f in features], limits)
    n = hidden.shape[0]
    return reference_steer(sae, hidden, residual, [plan] * n, list(range(n)), [n] * n)


def test_graph_path_slice_follows_changing_clamp_sets_and_overflows_to_the_host_path():
    """The graph path's fixed slice is reloaded when the clamped features change (and only then);
    a step clamping more features than it holds is sent to the host path, with the same result."""
    sae = make_sae("jumprelu", d_in=D_IN, d_sae=D_SAE)
    limits = Limits.one(d_sae=D_SAE, max_clamps=4, max_activation=None)
    table = ClampTable(limits, "sae", max_tokens=16, max_reqs=4, device=torch.device("cpu"))
    op = _install("slice", sae, table, True, graph_columns=2)
    hidden, residual = torch.randn(3, D_IN) * 3, torch.randn(3, D_IN) * 3
    for features, host in (([5, 9], False), ([9, 5], False), ([1, 40], False), ([5], False), ([2, 7, 11], True)):
        _step(table, op, _one_request(features, rid=f"r{features}"))
        assert op.host_step == host
        if not host:
            assert op.columns.ids.tolist() == sorted(features)
        out = torch.ops.steer_plugin.steer(hidden, residual, "slice")
        torch.testing.assert_close(out, _expected_one(sae, limits, hidden, residual, features), rtol=1e-4, atol=1e-4)
        op.after_forward()
        assert not table.failed


def test_a_host_step_replayed_as_a_graph_fails_its_requests():
    """If vLLM replayed a graph for a step that needed the host path (the op's Python never ran),
    the steered requests fail instead of being answered unsteered."""
    sae = make_sae("topk", d_in=D_IN, d_sae=D_SAE, k=8)
    limits = Limits.one(d_sae=D_SAE, max_clamps=4, max_activation=None)
    table = ClampTable(limits, "sae", max_tokens=16, max_reqs=4, device=torch.device("cpu"))
    op = _install("replayed", sae, table, True)
    _step(table, op, _one_request([3], rid="steered"))
    assert op.host_step
    op.after_forward()  # no forward ran the op's Python
    assert table.drain_failed() == ["steered"]


@pytest.mark.parametrize("graph_safe", [False, True])
def test_metrics_and_recording_read_the_steered_stream_after_the_forward(graph_safe):
    """Feature metrics and recordings come from the op's snapshot of the stream it returns, read
    after the forward: on the graph path (every step) as on the host path (steps that need it)."""
    import json

    from steer_plugin.core.spec import RECORD_FIELD
    from steer_plugin.worker.metrics import FeatureActivity
    from steer_plugin.worker.recorder import FeatureRecorder

    sae = make_sae("jumprelu", d_in=D_IN, d_sae=D_SAE)
    limits = Limits.one(d_sae=D_SAE, max_clamps=4, max_activation=None)
    table = ClampTable(limits, "sae", max_tokens=16, max_reqs=4, device=torch.device("cpu"))
    activity = FeatureActivity(f"snap-{graph_safe}", D_SAE, sample_every=1, watch=(), top_n=0)
    recorder = FeatureRecorder("sae")
    op = _install(f"snap-{graph_safe}", sae, table, graph_safe, activity=activity, recorder=recorder)
    key = f"snapshot-key-{graph_safe}"
    extra = {"feature_clamps": [{"feature": 6, "value": 30.0}],
             RECORD_FIELD: json.dumps({"key": key, "sae": "sae", "top_k": 3, "scope": "prompt"})}
    layout = StepLayout(["r"], np.array([4]), np.array([0]), np.array([4]), lambda _: extra)
    table.fill(layout)
    recorder.fill(layout)
    op.prepare(layout.num_tokens)
    hidden, residual = torch.randn(4, D_IN) * 3, torch.randn(4, D_IN) * 3
    out = torch.ops.steer_plugin.steer(hidden, residual, f"snap-{graph_safe}")
    op.after_forward()
    f, _ = sae.encode(out + residual)
    assert f[:, 6].min() > 0  # the recorded stream is the steered one
    record = recorder.pop(key)
    np.testing.assert_allclose(record["values"], f.topk(3).values.numpy(), rtol=1e-4, atol=1e-5)
    assert activity.fired.sum() == int((f > 0).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("graph_safe", [False, True])
def test_an_sae_stored_in_the_models_16_bit_dtype_steers_within_that_dtypes_tolerance(dtype, graph_safe):
    """The GPU default for a 16-bit model (`sae_dtype: auto`): the SAE's matrices in the model's dtype,
    biases in float32, the math in float32. Half the weight memory; against the float32 SAE's
    reference the steered tokens agree within the model dtype's own rounding, and unclamped tokens
    and identity clamps stay bit-identical."""
    full = make_sae("standard", d_in=D_IN, d_sae=D_SAE)  # ReLU: no threshold for rounding to cross
    sae = SAE(full.cfg, {n: getattr(full, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}, dtype)
    assert sae.W_enc.dtype == sae.W_dec.dtype == dtype and sae.b_enc.dtype == sae.b_dec.dtype == torch.float32
    assert sae.nbytes < 0.6 * full.nbytes
    out, hidden, delta = _three_requests(dtype, graph_safe, f"stored-{dtype}-{graph_safe}", sae, full,
                                         [{"feature": 3, "value": 5.0}, {"feature": 9, "value": -2.0, "mode": "add"}])
    assert delta.abs().max() > 0.5  # the clamps do move the stream
    torch.testing.assert_close(out[:3].float(), (hidden[:3] + delta.to(dtype)).float(), rtol=2e-2,
                               atol=0.03 * float(delta.abs().max()))


def test_auto_storage_is_the_models_16_bit_dtype_on_a_gpu_only():
    def site(device: str, dtype: torch.dtype):
        return SimpleNamespace(device=torch.device(device), dtype=dtype)

    assert storage_dtype("auto", site("cuda", torch.bfloat16)) == torch.bfloat16
    assert storage_dtype("auto", site("cuda", torch.float16)) == torch.float16
    assert storage_dtype("auto", site("cuda", torch.float32)) == torch.float32
    assert storage_dtype("auto", site("cpu", torch.bfloat16)) == torch.float32  # 16-bit products are slow on CPUs
    assert storage_dtype("float16", site("cpu", torch.float32)) == torch.float16
