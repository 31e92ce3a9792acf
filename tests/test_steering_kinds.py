"""Conditional clamps and steering vectors in a real vLLM engine, on both op paths: the stream the ops
leave, position by position, against the references on transformers' own stream; vectors mixed in
one batch with clamps and unsteered requests.

One engine per op path serves a tiny Llama with an SAE reading layer 1's output and two vectors: a
GGUF control vector written by the `gguf` package in llama.cpp's layout (directions at layers 1 and
2), and one the workbench built from two lists of texts (layer 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engines import offline_llm
from sae_factory import write_gguf, write_sae
from steer_plugin.api.admission import new_recording_key
from steer_plugin.core.reference import reference_steer, reference_vectors
from steer_plugin.core.sae import SAE
from steer_plugin.core.spec import FeatureRecording, Limits, parse_clamps, parse_vectors
from steer_plugin.core.vectors import load_vector
from tiny_models import HIDDEN, stream_after

pytestmark = pytest.mark.slow

D_SAE = 64
"""Small enough that a recording's top 64 is every feature: the whole encoding of each position."""
PROMPT = [1, *range(400, 423)]
LIMITS = Limits.one(d_sae=D_SAE, max_clamps=4, vectors=("calm", "built"))


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    """The model, the SAE and the two vector files."""
    from steer_workbench.capture import load_hf_model
    from steer_workbench.vectors import contrast, write_vector

    model = tiny_model("llama")
    root = tmp_path_factory.mktemp("kinds")
    sae_dir = write_sae(root / "sae", architecture="standard", d_in=HIDDEN, d_sae=D_SAE, layer=1, seed=3)
    rng = np.random.default_rng(5)
    calm = write_gguf(root / "calm.gguf", {f"direction.{k}": rng.normal(size=HIDDEN).astype(np.float32)
                                           for k in (1, 2)})
    hf, tokenizer = load_hf_model(str(model))
    built = contrast(hf, tokenizer, ["What a lovely sunny day, I am so happy.", "Great news, we won!"],
                     ["What a dreadful rainy day, I am so sad.", "Terrible news, we lost."], [2])
    write_vector(root / "built.gguf", built, "llama")
    return {"model": model, "sae": sae_dir, "calm": calm, "built": root / "built.gguf"}


@pytest.fixture(scope="module", params=[False, True], ids=["host path", "graph path"])
def llm(request, files):
    vectors = [{"name": "calm", "path": str(files["calm"])}, {"name": "built", "path": str(files["built"])}]
    with offline_llm([{"path": str(files["sae"]), "id": "sae"}], model=str(files["model"]), max_model_len=512,
                     steer={"graph_path": request.param, "vectors": vectors}) as engine:
        yield engine


def _dense(record: dict, positions: int) -> np.ndarray:
    """A recording's top-k lists as the whole encoding [positions, d_sae]."""
    out = np.zeros((positions, D_SAE), dtype=np.float32)
    for row, (ids, values) in enumerate(zip(record["ids"], record["values"])):
        out[row, ids] = values
    return out


def _record(llm, clamps=None, vectors=None) -> np.ndarray:
    """The SAE's whole encoding of the stream the ops left at layer 1, per prompt position."""
    from vllm import SamplingParams

    record = FeatureRecording(key=new_recording_key(), sae="sae", top_k=D_SAE, scope="prompt")
    extra = {"steer_record_features": record.model_dump_json()}
    if clamps is not None:
        extra["feature_clamps"] = json.dumps(clamps)
    if vectors is not None:
        extra["steering_vectors"] = json.dumps(vectors)
    llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=1, extra_args=extra),
                 use_tqdm=False)
    reply = next(r for r in llm.collective_rpc("steer_pop_features", args=(record.key,)) if r)
    return _dense(reply, len(PROMPT))


def _conditions(sae: SAE, x: torch.Tensor) -> tuple[int, int, float]:
    """A feature active at about half the positions (and far from 0 before its ReLU everywhere), and
    another one with a threshold in the widest gap between its values: conditions that transformers'
    stream and vLLM's decide alike."""
    pre = sae.encode_pre(sae.normalize(x)[0])  # [T, d_sae]
    share = (pre > 0).float().mean(0)
    margin = pre.abs().min(0).values
    mixed = (share > 0.25) & (share < 0.75)
    active = int(torch.where(mixed, margin, -1.0).argmax())
    other = int(torch.where(mixed, margin, -1.0).argsort(descending=True)[1])
    values = torch.relu(pre[:, other]).sort().values
    gap = int((values[1:] - values[:-1]).argmax())
    return active, other, float(values[gap] + values[gap + 1]) / 2


def test_a_conditional_clamp_changes_exactly_the_positions_where_its_condition_holds(llm, files):
    sae = SAE.load(files["sae"])
    x = stream_after(files["model"], 1, PROMPT)  # [T, d_in]: the stream before any clamp, unchanged by clamps here
    f = sae.encode(x)[0]
    active, other, above = _conditions(sae, x)
    target = (active + 7) % D_SAE
    clamps = [{"feature": active, "value": 9.0, "when": "active"},
              {"feature": target, "value": 6.0, "mode": "add", "when": {"feature": other, "above": above}}]
    got = _record(llm, clamps=clamps)

    t = len(PROMPT)
    plan = parse_clamps(clamps, LIMITS)
    expected = sae.encode(reference_steer(sae, x, torch.zeros_like(x), [plan] * t, list(range(t)), [t] * t))[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=2e-3, atol=2e-3)
    holds = ((f[:, active] > 0) | (f[:, other] > above)).numpy()
    assert 0 < holds.sum() < t
    # where no condition holds the op left the stream as it was; everywhere else a clamp acted
    np.testing.assert_allclose(got[~holds], f[~holds].numpy(), rtol=2e-3, atol=2e-3)
    assert (np.abs(got[holds] - f[holds].numpy()).max(axis=1) > 0.5).all()


def test_a_gguf_control_vector_adds_its_direction_to_its_layers_output(llm, files):
    """llama.cpp's convention: direction.1 is added to the output of layer 1, which the SAE reads next."""
    sae = SAE.load(files["sae"])
    x = stream_after(files["model"], 1, PROMPT)
    vectors = [{"vector": "calm", "scale": 1.5, "tokens": "prompt"}]
    got = _record(llm, vectors=vectors)
    t = len(PROMPT)
    directions = torch.from_numpy(np.stack([load_vector("calm", files["calm"]).directions[1], np.zeros(HIDDEN)]))
    steered = reference_vectors(directions.float(), x, [parse_vectors(vectors, LIMITS)] * t, list(range(t)), [t] * t)
    np.testing.assert_allclose(got, sae.encode(steered)[0].numpy(), rtol=2e-3, atol=2e-3)
    # scale 0 is the identity: the recording equals the unsteered stream's
    np.testing.assert_array_equal(_record(llm, vectors=[{"vector": "calm", "scale": 0.0}]), _record(llm))


def test_vectors_mix_with_clamps_and_unsteered_requests_in_one_batch(llm):
    """vLLM is not batch-invariant, so unsteered replies are compared under the same batch composition."""
    prompts = [PROMPT[: 8 + i] for i in range(6)]
    from vllm import SamplingParams

    steering = [{"steering_vectors": [{"vector": "calm", "scale": 6.0}]},
                {"steering_vectors": [{"vector": "built", "scale": 8.0}]},
                {"feature_clamps": [{"feature": 5, "value": 30.0}]},
                None,
                {"steering_vectors": [{"vector": "calm", "scale": 0.0}, {"vector": "built", "scale": 0.0}]},
                {"feature_clamps": [{"feature": 9, "value": 1.0, "mode": "scale"}],
                 "steering_vectors": [{"vector": "built", "scale": 0.0, "tokens": "generated"}]}]

    def params(extra):
        return SamplingParams(temperature=0, max_tokens=12, extra_args=None if extra is None else {
            key: json.dumps(value) for key, value in extra.items()})

    def batch(extras):
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], [params(e) for e in extras], use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    plain = batch([None] * len(prompts))
    mixed = batch(steering)
    assert mixed[3] == plain[3] and mixed[4] == plain[4] and mixed[5] == plain[5]  # unsteered, scale 0, identity
    assert mixed[0] != plain[0] and mixed[1] != plain[1] and mixed[2] != plain[2]
