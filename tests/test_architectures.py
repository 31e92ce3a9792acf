"""The architectures and precisions the plugin claims, each served by a real offline vLLM engine on a
tiny random-weight model built from a transformers config (nothing downloaded):
- a scale-1 clamp leaves replies bit-identical (the SAE error term is kept, in every dtype);
- a strong clamp changes them;
- the steered stream at the SAE's layer, read back through feature recording, matches a
  transformers forward of the same weights plus the reference clamp (`steer_plugin.reference`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engines import offline_llm
from sae_factory import write_sae
from steer_plugin.api.admission import new_recording_key
from steer_plugin.reference import reference_steer
from steer_plugin.sae import SAE
from steer_plugin.spec import FIELD, RECORD_FIELD, FeatureRecording, Limits, parse_clamps
from tiny_models import ARCHITECTURES, HIDDEN, build, stream_after

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


def _generate(llm, clamps=None, record: FeatureRecording | None = None, prompts=PROMPTS, max_tokens=8):
    from vllm import SamplingParams

    extra = {}
    if clamps is not None:
        extra[FIELD] = json.dumps(clamps)
    if record is not None:
        extra[RECORD_FIELD] = record.model_dump_json()
    params = SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=extra or None)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def check_steering(model_dir, sae_dir, dtype: str, tolerance: float) -> None:
    ids = PROMPTS[1]
    recording = FeatureRecording(key=new_recording_key(), sae="sae", top_k=TOP_K, scope="prompt")
    with offline_llm(sae_dir, model=str(model_dir), dtype=dtype, max_model_len=512) as llm:
        plain = _generate(llm)
        assert _generate(llm, IDENTITY) == plain
        assert _generate(llm, STRONG) != plain
        _generate(llm, MODERATE, recording, prompts=[ids], max_tokens=1)
        record = next(r for r in llm.collective_rpc("steer_pop_features", args=(recording.key,)) if r)
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


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_is_steered_exactly(arch, sae_dir, tmp_path_factory):
    check_steering(build(arch, tmp_path_factory.mktemp(arch) / arch), sae_dir, "float32", 2e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_are_steered_in_float32(dtype, sae_dir, tmp_path_factory):
    """The op reads the half-precision stream into float32, does the SAE math there and casts only
    the change back; transformers runs the same weights in the same dtype (their kernels differ from
    vLLM's, hence the wider tolerance)."""
    check_steering(build("llama", tmp_path_factory.mktemp("llama") / "llama"), sae_dir, dtype, 6e-2)
