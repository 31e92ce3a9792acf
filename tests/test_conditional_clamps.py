"""Conditional clamps in a real vLLM engine, on both op paths: the stream the op leaves, position by
position, against the reference on transformers' own stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines import offline_llm, recorded
from sae_factory import write_sae
from steer_plugin.api.admission import new_recording_key
from steer_plugin.core.reference import reference_steer
from steer_plugin.core.sae import SAE
from steer_plugin.core.spec import FeatureRecording, Limits, parse_clamps
from tiny_models import HIDDEN, stream_after

pytestmark = pytest.mark.slow

D_SAE = 64
"""Small enough that a recording's top 64 is every feature: the whole encoding of each position."""
PROMPT = [1, *range(400, 423)]


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


def _dense(record: dict, positions: int) -> np.ndarray:
    """A recording's top-k lists as the whole encoding [positions, d_sae]."""
    out = np.zeros((positions, D_SAE), dtype=np.float32)
    for row, (ids, values) in enumerate(zip(record["ids"], record["values"])):
        out[row, ids] = values
    return out


@pytest.mark.parametrize("graph_path", [False, True], ids=["host path", "graph path"])
def test_a_conditional_clamp_changes_exactly_the_positions_where_its_condition_holds(tiny_model, tmp_path,
                                                                                     graph_path):
    model = tiny_model("llama")
    sae_dir = write_sae(tmp_path / "sae", architecture="standard", d_in=HIDDEN, d_sae=D_SAE, layer=1, seed=3)
    sae = SAE.load(sae_dir)
    x = stream_after(model, 1, PROMPT)  # [T, d_in]: the stream before any clamp, unchanged by clamps here
    f = sae.encode(x)[0]
    active, other, above = _conditions(sae, x)
    target = (active + 7) % D_SAE
    clamps = [{"feature": active, "value": 9.0, "when": "active"},
              {"feature": target, "value": 6.0, "mode": "add", "when": {"feature": other, "above": above}}]
    record = FeatureRecording(key=new_recording_key(), sae="sae", top_k=D_SAE, scope="prompt")
    with offline_llm([{"path": str(sae_dir), "id": "sae"}], model=str(model), max_model_len=512,
                     steer={"graph_path": graph_path}) as llm:
        got = _dense(recorded(llm, [PROMPT], clamps, record), len(PROMPT))

    t = len(PROMPT)
    plan = parse_clamps(clamps, Limits.one(d_sae=D_SAE, max_clamps=4))
    expected = sae.encode(reference_steer(sae, x, torch.zeros_like(x), [plan] * t, list(range(t)), [t] * t))[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=2e-3, atol=2e-3)
    holds = ((f[:, active] > 0) | (f[:, other] > above)).numpy()
    assert 0 < holds.sum() < t
    # where no condition holds the op left the stream as it was; everywhere else a clamp acted
    np.testing.assert_allclose(got[~holds], f[~holds].numpy(), rtol=2e-3, atol=2e-3)
    assert (np.abs(got[holds] - f[holds].numpy()).max(axis=1) > 0.5).all()
