"""The architectures and precisions the plugin claims, each served by a real offline vLLM engine on a
tiny random-weight model built from a transformers config (nothing downloaded):
- a scale-1 clamp leaves replies bit-identical (the SAE error term is kept, in every dtype);
- a strong clamp changes them;
- the steered stream at the SAE's layer, read back through feature recording, matches a
  transformers forward of the same weights plus the reference clamp (`steer_plugin.core.reference`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines import generate_ids, offline_llm, recorded
from sae_factory import write_sae
from steer_plugin.api.admission import new_recording_key
from steer_plugin.core.reference import reference_steer
from steer_plugin.core.sae import SAE
from steer_plugin.core.spec import FeatureRecording, Limits, parse_clamps
from tiny_models import ARCHITECTURES, HIDDEN, stream_after

pytestmark = pytest.mark.slow

LAYER = 1
PROMPTS = [[1, 504, 3575, 282, 4649, 314], [1, 6403, 1980, 253, 655, 28, 281, 253, 1666, 1869, 2025]]
"""Token ids of the default tokenizer: "The capital of France is", "Once upon a time, in a land far away"."""
IDENTITY = [{"feature": 3, "value": 1.0, "mode": "scale"}, {"feature": 10, "value": 0.0, "mode": "add"}]
STRONG = [{"feature": 3, "value": 60.0}]
MODERATE = [{"feature": 5, "value": 2.0}, {"feature": 7, "value": 1.0, "mode": "add"}]
TOP_K = 8


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    return write_sae(tmp_path_factory.mktemp("tiny_sae") / "sae", architecture="jumprelu", d_in=HIDDEN, d_sae=256,
                     layer=LAYER)


def check_steering(model_dir, sae_dir, dtype: str, tolerance: float, also=None, **engine) -> None:
    """also(llm, plain): more checks on the same engine."""
    ids = PROMPTS[1]
    recording = FeatureRecording(key=new_recording_key(), sae="sae", top_k=TOP_K, scope="prompt")
    with offline_llm(sae_dir, model=str(model_dir), dtype=dtype, max_model_len=512, **engine) as llm:
        plain = generate_ids(llm, PROMPTS)
        assert generate_ids(llm, PROMPTS, IDENTITY) == plain
        assert generate_ids(llm, PROMPTS, STRONG) != plain
        record = recorded(llm, [ids], MODERATE, recording)
        if also is not None:
            also(llm, plain)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    x = stream_after(model_dir, LAYER, ids, torch_dtype)  # [T, d] transformers' stream, float32
    sae = SAE.load(sae_dir)
    plan = parse_clamps(MODERATE, Limits.one(d_sae=sae.cfg.d_sae, max_clamps=4))
    t = len(ids)
    steered = reference_steer(sae, x, torch.zeros_like(x), [plan] * t, list(range(t)), [t] * t)
    f, _ = sae.encode(steered)
    assert record["positions"] == list(range(t))
    np.testing.assert_allclose(np.asarray(record["values"]), f.topk(TOP_K).values.numpy(), rtol=tolerance,
                               atol=tolerance)


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "llama"])  # llama: the graph-path test below
def test_architecture_is_steered_exactly(arch, sae_dir, tiny_model):
    check_steering(tiny_model(arch), sae_dir, "float32", 2e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_are_steered_in_float32(dtype, sae_dir, tiny_model):
    """The op reads the half-precision stream into float32, does the SAE math there and casts only
    the change back; transformers runs the same weights in the same dtype (their kernels differ from
    vLLM's, hence the wider tolerance)."""
    check_steering(tiny_model("llama"), sae_dir, dtype, 6e-2)


def test_graph_path_in_a_compiled_cpu_engine(sae_dir, tiny_model):
    """The op's CUDA-graph path (`steer.graph_path` forced on: the code graphs capture and replay,
    step for step), in a compiled Llama engine on the CPU: exact as above, feature recording included
    (the host path is held to the same checks by every other architecture and dtype). A
    step with more clamped features than the graph slice holds goes to the host path (on a GPU, a
    step without graphs) and replies exactly as the graph path does."""
    wide = STRONG + [{"feature": f, "value": 1.0, "mode": "scale"} for f in (20, 21, 22, 23)]  # 5 > 4 features

    def host_path_agrees(llm, plain):
        assert generate_ids(llm, PROMPTS, wide) == generate_ids(llm, PROMPTS, STRONG)

    check_steering(tiny_model("llama"), sae_dir, "float32", 2e-3, also=host_path_agrees, enforce_eager=False,
                   steer={"graph_path": True, "graph_columns": 4})
