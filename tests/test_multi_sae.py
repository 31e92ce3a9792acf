"""Several SAEs in one server: three layouts written by three libraries at three layers of a model the
project never shipped, steered from one request; two SAEs at one point of the stream, in order.
(Tensor and pipeline parallel: test_distributed.py.)"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from engines import offline_llm, recorded
from sae_factory import write_sae
from steer_plugin.api.admission import new_recording_key
from steer_plugin.core.reference import reference_steer
from steer_plugin.core.sae import SAE
from steer_plugin.core.spec import FeatureRecording, Limits, parse_clamps
from tiny_models import HIDDEN, stream_after

pytestmark = pytest.mark.slow

TEXT = "Once upon a time, in a land far away"
PROMPT = [1, 6403, 1980, 253, 655, 28, 281, 253, 1666, 1869, 2025]
"""TEXT's tokens after a BOS; the tokenizer adds none itself, so TEXT alone is the 10 tokens after it."""


def test_two_saes_at_one_point_apply_in_configuration_order(tiny_model, tmp_path):
    """`a` reads the output of layer 1, `b` the input of layer 2: the same point. `b` reads the stream
    as `a` left it, and what `b` records is the reference of a-then-b, not of b-then-a."""
    model = tiny_model("llama")
    a_dir = write_sae(tmp_path / "a", architecture="jumprelu", d_in=HIDDEN, d_sae=256, layer=1, seed=1)
    b_dir = write_sae(tmp_path / "b", architecture="standard", d_in=HIDDEN, d_sae=128, layer=1, seed=2)
    clamps = [{"sae": "a", "feature": 5, "value": 6.0}, {"sae": "b", "feature": 9, "value": 4.0}]
    record = FeatureRecording(key=new_recording_key(), sae="b", top_k=8, scope="prompt")
    saes = [{"path": str(a_dir), "id": "a"}, {"path": str(b_dir), "id": "b", "layer": 1}]
    with offline_llm(saes, model=str(model), max_model_len=512) as llm:
        got = np.asarray(recorded(llm, [PROMPT], clamps, record)["values"])

    x = stream_after(model, 1, PROMPT)
    a, b = SAE.load(a_dir), SAE.load(b_dir)
    limits = Limits.one(d_sae=256, max_clamps=4)
    plan_a = parse_clamps([{"feature": 5, "value": 6.0}], limits)
    plan_b = parse_clamps([{"feature": 9, "value": 4.0}], limits)
    t = len(PROMPT)

    def steer(sae, stream, plan):
        return reference_steer(sae, stream, torch.zeros_like(stream), [plan] * t, list(range(t)), [t] * t)

    in_order = b.encode(steer(b, steer(a, x, plan_a), plan_b))[0].topk(8).values.numpy()
    reversed_ = b.encode(steer(a, steer(b, x, plan_b), plan_a))[0].topk(8).values.numpy()
    assert np.abs(in_order - reversed_).max() > 0.05  # the order matters for this pair
    np.testing.assert_allclose(got, in_order, rtol=2e-3, atol=2e-3)


def _scrape(server) -> dict:
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.base_url}/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _complete(http: httpx.Client, clamps=None, **extra) -> httpx.Response:
    body = {"model": "SmolLM2-135M-Instruct", "prompt": TEXT, "max_tokens": 8, "temperature": 0, **extra}
    if clamps is not None:
        body["feature_clamps"] = clamps
    return http.post("/v1/completions", json=body)


def _text(http, clamps=None) -> str:
    r = _complete(http, clamps)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_three_layouts_at_three_layers_steer_from_one_request(three_saes):
    server, http = three_saes
    saes = http.get("/v1/saes").json()["data"]
    assert [(s["id"], s["layer"], s["architecture"]) for s in saes] == [
        ("lens", 1, "jumprelu"), ("sparsify", 0, "topk"), ("scope", 2, "jumprelu")]
    plain = _text(http)
    strong = {"lens": 40.0, "sparsify": 40.0, "scope": 40.0}
    each = {sae: _text(http, [{"sae": sae, "feature": 3, "value": value}]) for sae, value in strong.items()}
    assert all(reply != plain for reply in each.values()), each
    before = _scrape(server)
    together = _text(http, [{"sae": sae, "feature": 3, "value": value} for sae, value in strong.items()])
    assert together != plain and together not in each.values()
    identity = [{"sae": sae, "feature": 3, "value": 1.0, "mode": "scale"} for sae in strong]
    assert _text(http, identity) == plain
    after = _scrape(server)
    for sae in strong:  # one set and one scale clamp per SAE; each SAE's metrics carry its id
        key = ("steer_clamps_applied_total", (("mode", "set"), ("sae", sae)))
        assert after[key] - before.get(key, 0) == 1, sae
        assert after[("steer_steered_tokens_total", (("sae", sae),))] > 0


def test_clamps_and_feature_routes_name_their_sae(three_saes):
    _, http = three_saes
    r = _complete(http, [{"feature": 3, "value": 1.0}, {"sae": "nope", "feature": 3, "value": 1.0}])
    assert r.status_code == 400 and "feature_clamps[1].sae: unknown SAE 'nope'" in r.json()["error"]["message"]
    r = _complete(http, [{"sae": s, "feature": f, "value": 1.0} for s in ("lens", "scope") for f in (1, 2, 3)])
    assert r.status_code == 400 and "at most 4" in r.json()["error"]["message"]  # counted over all SAEs
    r = _complete(http, [{"sae": "lens", "feature": 200, "value": 1.0}])  # lens has 128 features, scope 256
    assert r.status_code == 400 and "SAE lens has 128 features" in r.json()["error"]["message"]
    assert _complete(http, [{"sae": "scope", "feature": 200, "value": 1.0}]).status_code == 200

    r = _complete(http, return_features={"top_k": 3, "sae": "sparsify"})
    features = r.json()["choices"][0]["features"]
    assert len(features) == 8 and all(len(f["features"]) <= 3 for f in features)
    assert max(len(f["features"]) for f in features) == 3  # TopK (k=8) features are active on every token
    assert _complete(http, return_features={"top_k": 3, "sae": "x"}).json()["error"]["param"] == "return_features"

    inspected = http.post("/v1/features/inspect", json={"text": TEXT, "sae": "scope", "top_k": 2}).json()
    assert (inspected["sae"], inspected["layer"], inspected["num_tokens"]) == ("scope", 2, len(PROMPT) - 1)
    r = http.get("/v1/features", params={"q": "x", "sae": "nope"})
    assert r.status_code == 400 and "unknown SAE 'nope'" in r.text
    r = http.get("/v1/features", params={"q": "x", "sae": "scope"})  # no catalogue: named, no server path in it
    assert r.status_code == 404 and "'scope' has no feature catalogue" in r.text and "/tmp" not in r.text


def test_the_api_key_guards_steering_and_feature_routes(three_saes):
    server, _ = three_saes
    for path in ("/v1/saes", "/v1/features?q=x"):
        assert httpx.get(server.base_url + path).status_code == 401
    r = httpx.post(server.base_url + "/v1/completions", json={"model": "m", "prompt": "x", "feature_clamps": "bad"})
    assert r.status_code == 401  # the key is checked before the clamps are read
