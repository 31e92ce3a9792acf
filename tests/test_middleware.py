"""The HTTP edge as an ASGI app: vLLM-shaped routes behind the real middleware, driven over httpx."""

from __future__ import annotations

import hashlib
import json

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from steer_plugin.api.middleware import FeatureClampMiddleware
from steer_plugin.api.variants import served_variants
from steer_plugin.core.config import SteerConfig, Variant
from steer_plugin.core.spec import RECORD_FIELD, Limits

pytestmark = pytest.mark.anyio

LIMITS = Limits.one(d_sae=64, max_clamps=4, max_activation=np.full(64, 2.0, dtype=np.float32), vectors=("calm",))
CLAMPS = [{"feature": 3, "value": 1.5}]
TRICKY = "data: [DONE]\n\nnot the end"
"""Reply text that contains the stream's end marker."""


class Features:
    """Stands in for the app's FeatureService: what the worker recorded, by key."""

    def __init__(self):
        self.fetched: list[str] = []

    async def generated_features(self, key: str) -> list[dict]:
        self.fetched.append(key)
        return [{"index": 0, "features": [{"id": 3, "activation": 1.0, "label": "x"}]}]


def _events(pieces: list[str]):
    async def stream():
        for piece in pieces:
            yield piece
    return StreamingResponse(stream(), media_type="text/event-stream")


def _app(variants=None) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "vllm",
                                                          "root": "/models/m", "parent": None, "max_model_len": 4096}]})

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def generate(request: Request):
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "vLLM's own JSON error"}, status_code=422)
        if body.get("max_tokens", 1) < 1:  # like vLLM's checks of sampling parameters, after the edge
            return JSONResponse({"error": {"message": "max_tokens must be at least 1", "code": 400}}, status_code=400)
        if body.get("stream"):
            chunk = json.dumps({"choices": [{"delta": {"content": TRICKY}}]})
            # split mid-event on purpose: framing must not depend on chunk boundaries
            return _events([f"data: {chunk[:10]}", f"{chunk[10:]}\n\n", "data: [DONE]\n\n"])
        return JSONResponse({"received": body, "choices": [{"message": {"content": TRICKY}}]})

    @app.post("/other")
    async def other(request: Request):
        if request.headers.get("content-type", "").startswith("multipart/"):
            return JSONResponse({"received": "form"})
        return JSONResponse({"received": await request.json()})

    @app.post("/echo_error")
    async def echo_error(request: Request):  # like vLLM's validation errors, which quote the input
        return JSONResponse({"error": {"message": "bad: " + (await request.body()).decode()[12:], "code": 400}},
                            status_code=400)

    app.add_middleware(FeatureClampMiddleware, limits=LIMITS, variants=variants)
    app.state.steer_features = Features()
    return app


@pytest.fixture
def app():
    return _app()


async def _post(app, path: str, body) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_top_level_clamps_move_into_vllm_xargs(app, path):
    r = await _post(app, path, {"model": "m", "feature_clamps": CLAMPS, "vllm_xargs": {"other": 1}})
    received = r.json()["received"]
    assert "feature_clamps" not in received
    assert json.loads(received["vllm_xargs"]["feature_clamps"]) == CLAMPS and received["vllm_xargs"]["other"] == 1


async def test_empty_clamp_list_means_no_steering(app):
    received = (await _post(app, "/v1/completions", {"model": "m", "feature_clamps": []})).json()["received"]
    assert "feature_clamps" not in (received.get("vllm_xargs") or {}) and "feature_clamps" not in received


@pytest.mark.parametrize("body, param, words", [
    ({"feature_clamps": [{"feature": 64, "value": 1}]}, "feature_clamps", "feature_clamps[0].feature"),
    ({"feature_clamps": CLAMPS, "vllm_xargs": {"feature_clamps": json.dumps(CLAMPS)}}, "feature_clamps", "both"),
    ({"feature_clamps": CLAMPS, "use_beam_search": True}, "feature_clamps", "beam"),
    ({"return_features": 0}, "return_features", "greater than or equal to 1"),
    ({"return_features": "5"}, "return_features", "integer from 1 to"),
    ({"return_features": {"top_k": 2, "sae": "other"}}, "return_features", "return_features.sae: unknown SAE"),
    ({"return_features": 3, "n": 2}, "return_features", "single choice"),
    ({"return_features": 3, "prompt": ["a", "b"]}, "return_features", "single prompt"),
])
async def test_bad_input_is_an_openai_style_400_naming_the_field(app, body, param, words):
    r = await _post(app, "/v1/completions", {"model": "m", **body})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["code"] == 400


async def test_other_routes_refuse_the_fields_and_pass_the_rest(app):
    for field in ("feature_clamps", "return_features"):
        r = await _post(app, "/other", {field: 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == field and "/other" in r.text
    assert (await _post(app, "/other", {"prompt": "x"})).json()["received"] == {"prompt": "x"}
    r = await _post(app, "/other", {"vllm_xargs": {"feature_clamps": json.dumps(CLAMPS)}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "feature_clamps"


async def test_malformed_json_is_left_to_vllm(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.post("/v1/completions", content=b"{not json")
    assert r.status_code == 422  # vLLM's own parser reports it


@pytest.mark.parametrize("key, wanted", [
    ("feature_clamp", "feature_clamps"), ("featureClamps", "feature_clamps"), ("feature-clamps", "feature_clamps"),
    ("FeatureClamps", "feature_clamps"), ("clamps", "feature_clamps"), ("return_feature", "return_features"),
    ("returnFeatures", "return_features"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/other"])
async def test_near_miss_field_names_name_the_right_field(app, key, wanted, path):
    r = await _post(app, path, {"model": "m", key: CLAMPS})
    assert r.status_code == 400 and r.json()["error"]["param"] == wanted and f"did you mean {wanted}" in r.text


@pytest.mark.parametrize("body, param", [
    ({"vllm_xargs": {"feature_clamp": "[]"}}, "feature_clamps"),
    ({"extra_body": {"feature_clamps": CLAMPS}}, "feature_clamps"),
    ({"vllm_xargs": {"return_features": 2}}, "return_features"),
])
async def test_fields_in_the_wrong_place_are_refused(app, body, param):
    r = await _post(app, "/v1/chat/completions", {"model": "m", **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


async def test_internal_recording_field_cannot_be_sent(app):
    record = json.dumps({"key": "k" * 40, "sae": "s", "top_k": 3, "scope": "prompt"})
    for path in ("/v1/chat/completions", "/other"):
        r = await _post(app, path, {"model": "m", "vllm_xargs": {RECORD_FIELD: record}})
        assert r.status_code == 400 and r.json()["error"]["param"] == RECORD_FIELD


@pytest.mark.parametrize("depth", [100, 5000, 100_000])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/other"])
@pytest.mark.parametrize("clamps", [False, True])
async def test_deep_nesting_is_a_400_not_a_500(app, depth, path, clamps):
    extra = f', "feature_clamps": {json.dumps(CLAMPS)}' if clamps else ""
    body = '{"model": "m", "messages": ' + "[" * depth + "1" + "]" * depth + extra + "}"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.post(path, content=body)
    assert r.status_code == 400 and "nested deeper" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, param", [
    ('{"model": "m", "max_tokens": 1' + "0" * 5000 + "}", "max_tokens"),
    ('{"model": "m", "feature_clamps": [{"feature": 1' + "0" * 300 + ', "value": 1}]}', "feature_clamps"),
    ('{"model": "m", "seed": -' + "9" * 200 + "}", "seed"),
])
async def test_huge_numbers_are_a_400_naming_the_field(app, body, param):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.post("/v1/completions", content=body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and "digits" in error["message"]


async def test_oversized_body_is_refused(app, monkeypatch):
    from steer_plugin.api import request_body

    monkeypatch.setattr(request_body, "MAX_BODY_BYTES", 1000)
    r = await _post(app, "/v1/completions", {"model": "m", "prompt": "x" * 2000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"


async def test_client_text_in_errors_is_short_and_has_no_control_characters(app):
    key = "\x1b[31m" + "A" * 1_000_000
    r = await _post(app, "/v1/completions", {"model": "m", "feature_clamps": [{"feature": 1, "value": 1, key: 2}]})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and len(r.content) < 2000 and "\x1b" not in message and "more characters" in message
    r = await _post(app, "/v1/completions", {"model": "m", "return_features": "\x07" + "B" * 100_000})
    assert r.status_code == 400 and len(r.content) < 2000 and "\x07" not in r.json()["error"]["message"]


async def test_long_error_replies_from_vllm_are_cut_short(app):
    r = await _post(app, "/echo_error", {"prompt": "C" * 100_000})
    assert r.status_code == 400 and len(r.content) < 2000 and r.json()["error"]["message"].startswith("bad: C")


async def test_multipart_uploads_refuse_the_fields(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.post("/other", files={"file": ("a.wav", b"RIFF....")}, data={"feature_clamps": "[]"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "feature_clamps"


async def test_root_path_prefix_is_understood():
    app = _app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, root_path="/api"),
                                 base_url="http://test") as client:
        r = await client.post("/api/v1/completions", content=json.dumps({"model": "m", "feature_clamps": CLAMPS}))
    assert r.status_code == 200 and "feature_clamps" in r.json()["received"]["vllm_xargs"]


async def test_return_features_non_streaming_joins_the_reply(app):
    r = await _post(app, "/v1/chat/completions", {"model": "m", "return_features": 2})
    reply = r.json()
    assert int(r.headers["content-length"]) == len(r.content)
    recording = json.loads(reply["received"]["vllm_xargs"][RECORD_FIELD])
    assert recording["top_k"] == 2 and recording["scope"] == "generation"
    assert reply["choices"][0]["features"][0]["features"][0]["id"] == 3
    assert app.state.steer_features.fetched == [recording["key"]]


async def test_return_features_streaming_adds_one_event_before_done(app):
    r = await _post(app, "/v1/chat/completions", {"model": "m", "stream": True, "return_features": 2})
    events = [e for e in r.text.split("\n\n") if e]
    assert len(events) == 3 and events[-1] == "data: [DONE]"
    assert json.loads(events[0][len("data: "):])["choices"][0]["delta"]["content"] == TRICKY
    features = json.loads(events[1][len("data: "):])
    assert features["object"] == "steer.features" and features["choices"] == []
    assert features["features"][0]["index"] == 0


async def _raw(app, path: str, content: bytes, headers: list[tuple[str, str]]) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.post(path, content=content, headers=headers)


JSON = [("content-type", "application/json")]
ESCAPED = '{"model": "m", "\\u0066eature_\\u0063lamps": [{"\\u0066eature": 3, "value": 1.5}]}'
"""`feature_clamps` with two letters written as JSON escapes: the same field to any JSON decoder."""


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/other"])
@pytest.mark.parametrize("order", [("application/json", "multipart/form-data; boundary=x"),
                                   ("multipart/form-data; boundary=x", "application/json"),
                                   ("application/json", "application/json")])
async def test_two_content_type_headers_are_refused(app, path, order):
    """Starlette reads the first of two Content-Type headers, other stacks the last: ambiguous."""
    body = json.dumps({"model": "m", "feature_clamps": [{"feature": 99, "value": 1}]}).encode()
    r = await _raw(app, path, body, [("content-type", order[0]), ("content-type", order[1])])
    assert r.status_code == 400 and r.json()["error"]["param"] == "content-type"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-le", "utf-32", "utf-8-sig"])
async def test_a_body_is_read_in_the_encoding_json_detects(app, encoding):
    """json.loads (and so vLLM) reads UTF-16 and UTF-32 bodies too: so does the plugin."""
    body = json.dumps({"model": "m", "feature_clamps": CLAMPS}).encode(encoding)
    r = await _raw(app, "/other", body, JSON)
    assert r.status_code == 400 and r.json()["error"]["param"] == "feature_clamps"
    r = await _raw(app, "/v1/completions", body, JSON)
    assert json.loads(r.json()["received"]["vllm_xargs"]["feature_clamps"]) == CLAMPS
    bad = json.dumps({"model": "m", "feature_clamps": [{"feature": 99, "value": 1}]}).encode(encoding)
    r = await _raw(app, "/v1/completions", bad, JSON)
    assert r.status_code == 400 and r.json()["error"]["param"] == "feature_clamps"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/other"])
async def test_field_names_written_with_escapes_are_the_fields(app, path):
    r = await _raw(app, path, ESCAPED.encode(), JSON)
    if path == "/other":
        assert r.status_code == 400 and r.json()["error"]["param"] == "feature_clamps"
    else:
        assert json.loads(r.json()["received"]["vllm_xargs"]["feature_clamps"]) == CLAMPS
    near = '{"model": "m", "\\u0066eature_clamp": []}'
    r = await _raw(app, path, near.encode(), JSON)
    assert r.status_code == 400 and "did you mean feature_clamps" in r.text


@pytest.mark.parametrize("content_type", ["text/plain", "multipart/form-data; boundary=x", ""])
async def test_a_json_body_under_another_content_type_is_still_read(app, content_type):
    """Routes that call request.json() themselves (vLLM's /invocations) read JSON whatever the header."""
    headers = [("content-type", content_type)] if content_type else []
    r = await _raw(app, "/other", ESCAPED.encode("utf-16"), headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "feature_clamps"


async def test_urlencoded_form_fields_are_read_as_starlette_reads_them(app):
    form = [("content-type", "application/x-www-form-urlencoded")]
    r = await _raw(app, "/other", b"model=m&feature%5Fclamps=%5B%5D", form)
    assert r.status_code == 400 and r.json()["error"]["param"] == "feature_clamps"
    r = await _raw(app, "/other", b"model=m&return%5ffeatures=3", form)
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_features"


async def test_compressed_bodies_are_refused(app):
    import gzip

    body = gzip.compress(json.dumps({"model": "m", "feature_clamps": CLAMPS}).encode())
    r = await _raw(app, "/other", body, [*JSON, ("content-encoding", "gzip")])
    assert r.status_code == 400 and r.json()["error"]["param"] == "content-encoding"


@pytest.mark.parametrize("place", ["top", "vllm_xargs"])
@pytest.mark.parametrize("value, words", [
    ("[" * 20_000 + "]" * 20_000, "nested deeper"),
    ('[{"feature": 1' + "0" * 5000 + ', "value": 1}]', "feature_clamps[0].feature: a number with 5001 digits"),
])
async def test_the_string_form_has_the_limits_of_a_body(app, place, value, words):
    body = {"model": "m", "feature_clamps": value} if place == "top" else {
        "model": "m", "vllm_xargs": {"feature_clamps": value}}
    r = await _post(app, "/v1/completions", body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "feature_clamps" and words in error["message"]


def _canonical_digest(steering: dict) -> str:
    """The receipt's digest written out by hand: SHA-256 of {"clamps": the sorted [sae, feature, mul,
    add, tokens] rows, "vectors": the sorted [name, scale, tokens] rows}."""
    return hashlib.sha256(json.dumps(steering, separators=(",", ":")).encode()).hexdigest()


CANONICAL = {"clamps": [["sae", 3, 0.0, 1.5, 0], ["sae", 7, 1.0, 0.5, 2]]}
RECEIPT = {"digest": _canonical_digest(CANONICAL), "clamps": 2, "vectors": 0, "canonical": CANONICAL}
TWO = [{"feature": 7, "value": 0.25, "unit": "max", "mode": "add", "tokens": "generated"}, *CLAMPS]
"""Two clamps, out of order, one in max units (0.25 × 2.0): the receipt has them sorted, in activation units."""


@pytest.mark.parametrize("place", ["top", "vllm_xargs"])
async def test_a_steered_reply_carries_its_receipt(app, place):
    body = {"model": "m", "feature_clamps": TWO} if place == "top" else {
        "model": "m", "vllm_xargs": {"feature_clamps": json.dumps(TWO)}}
    r = await _post(app, "/v1/chat/completions", body)
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
    assert r.headers["x-steer-digest"] == RECEIPT["digest"] and r.headers["x-steer-clamps"] == "2"
    assert r.headers["x-steer-vectors"] == "0" and r.json()["steering"] == RECEIPT


@pytest.mark.parametrize("place", ["top", "vllm_xargs"])
async def test_vectors_move_into_vllm_xargs_and_join_the_receipt(app, place):
    vectors = [{"vector": "calm", "scale": 0.5, "tokens": "prompt"}]
    body = {"model": "m", "feature_clamps": CLAMPS, "steering_vectors": vectors} if place == "top" else {
        "model": "m", "vllm_xargs": {"feature_clamps": json.dumps(CLAMPS), "steering_vectors": json.dumps(vectors)}}
    r = await _post(app, "/v1/chat/completions", body)
    assert json.loads(r.json()["received"]["vllm_xargs"]["steering_vectors"]) == vectors
    canonical = {"clamps": [["sae", 3, 0.0, 1.5, 0]], "vectors": [["calm", 0.5, 1]]}
    assert r.headers["x-steer-vectors"] == "1" and r.headers["x-steer-clamps"] == "1"
    assert r.json()["steering"] == {"digest": _canonical_digest(canonical), "clamps": 1, "vectors": 1,
                                    "canonical": canonical}


@pytest.mark.parametrize("body, words", [
    ({"steering_vectors": [{"vector": "storm", "scale": 1}]}, "steering_vectors[0].vector: unknown vector 'storm'"),
    ({"steering_vectors": [{"vector": "calm", "scale": 1}], "use_beam_search": True}, "steering_vectors: not supported"),
    ({"steering_vectors": [], "vllm_xargs": {"steering_vectors": "[]"}}, "given both at top level and in vllm_xargs"),
    ({"steeringVectors": [{"vector": "calm", "scale": 1}]}, "did you mean steering_vectors"),
])
async def test_bad_vectors_are_a_400_naming_the_field(app, body, words):
    r = await _post(app, "/v1/chat/completions", {"model": "m", **body})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "steering_vectors" and words in error["message"]


async def test_vectors_are_refused_on_a_route_that_does_not_steer(app):
    r = await _post(app, "/v1/embeddings", {"model": "m", "input": "x", "steering_vectors": [{"vector": "calm",
                                                                                            "scale": 1}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering_vectors"


async def test_a_streamed_steered_reply_has_the_receipt_in_its_headers(app):
    r = await _post(app, "/v1/completions", {"model": "m", "stream": True, "feature_clamps": TWO,
                                             "return_features": 1})
    assert r.headers["x-steer-digest"] == RECEIPT["digest"]
    events = [e for e in r.text.split("\n\n") if e]
    assert len(events) == 3 and events[-1] == "data: [DONE]"  # the events themselves are unchanged


async def test_receipt_and_features_both_join_a_reply(app):
    reply = (await _post(app, "/v1/chat/completions", {"model": "m", "feature_clamps": TWO,
                                                       "return_features": 1})).json()
    assert reply["steering"] == RECEIPT and reply["choices"][0]["features"][0]["index"] == 0


@pytest.mark.parametrize("body", [{"model": "m"}, {"model": "m", "feature_clamps": []},
                                  {"model": "m", "return_features": 1}])
async def test_unsteered_replies_carry_no_receipt(app, body):
    r = await _post(app, "/v1/chat/completions", body)
    assert r.status_code == 200 and "x-steer-digest" not in r.headers and "steering" not in r.json()


@pytest.mark.parametrize("stream", [False, True])
async def test_an_error_reply_carries_no_receipt(app, stream):
    r = await _post(app, "/v1/chat/completions", {"model": "m", "feature_clamps": TWO, "max_tokens": 0,
                                                  "stream": stream})
    assert r.status_code == 400 and "x-steer-digest" not in r.headers and "steering" not in r.json()


GOLDEN = Variant(name="golden", feature_clamps=({"feature": 7, "value": 0.25, "unit": "max", "mode": "add",
                                                  "tokens": "generated"}, {"feature": 3, "value": 9}),
                 sampling={"temperature": 0.7, "max_tokens": 12})
CALMED = Variant(name="calmed", steering_vectors=({"vector": "calm", "scale": 4},))


@pytest.fixture
def variant_app():
    return _app(served_variants(SteerConfig(variants=(GOLDEN, Variant(name="plain", model="calm"), CALMED)), "m",
                                LIMITS))


async def test_variants_are_listed_beside_the_served_model(variant_app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=variant_app), base_url="http://test") as client:
        listed = (await client.get("/v1/models")).json()["data"]
    assert [m["id"] for m in listed] == ["m", "m:golden", "calm", "m:calmed"]
    assert listed[1]["root"] == "m" and listed[1]["max_model_len"] == 4096


async def test_a_request_for_a_variant_is_a_steered_request_for_the_served_model(variant_app):
    reply = (await _post(variant_app, "/v1/chat/completions",
                         {"model": "m:golden", "temperature": 0, "feature_clamps": CLAMPS})).json()
    received = reply["received"]
    assert received["model"] == "m" and received["temperature"] == 0 and received["max_tokens"] == 12
    # the request's clamp on feature 3 (1.5) replaces the variant's (9); feature 7 is the variant's
    assert reply["steering"] == RECEIPT
    sent = json.loads(received["vllm_xargs"]["feature_clamps"])
    assert {(c["feature"], c["value"]) for c in sent} == {(3, 1.5), (7, 0.5)}


async def test_a_variants_vector_is_replaced_by_the_requests_own(variant_app):
    for own, scale in (([], 4), ([{"vector": "calm", "scale": 0}], 0)):
        reply = (await _post(variant_app, "/v1/completions", {"model": "m:calmed", "prompt": "x",
                                                              "steering_vectors": own})).json()
        assert json.loads(reply["received"]["vllm_xargs"]["steering_vectors"]) == [
            {"vector": "calm", "scale": scale, "tokens": "all"}]
        assert reply["steering"]["canonical"] == {"vectors": [["calm", scale, 0]]}


async def test_a_variant_without_clamps_changes_only_the_model(variant_app):
    received = (await _post(variant_app, "/v1/completions", {"model": "calm", "prompt": "x"})).json()["received"]
    assert received["model"] == "m" and received.get("vllm_xargs") is None


@pytest.mark.parametrize("body, words", [
    ({"model": "m:golden", "feature_clamps": [{"feature": f, "value": 1} for f in (1, 20, 21)]},
     "brings 2 clamps and the request 3: 5 in all, at most 4"),
    ({"model": "m:golden", "feature_clamps": [{"feature": 99, "value": 1}]}, "feature_clamps[0].feature: 99"),
])
async def test_a_variants_clamps_and_the_requests_are_checked_together(variant_app, body, words):
    r = await _post(variant_app, "/v1/chat/completions", body)
    assert r.status_code == 400 and words in r.json()["error"]["message"]


async def test_a_variant_on_a_route_that_does_not_steer_is_refused(variant_app):
    r = await _post(variant_app, "/other", {"model": "m:golden", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    assert (await _post(variant_app, "/other", {"model": "m"})).status_code == 200


def test_a_variant_with_a_bad_clamp_stops_the_start():
    bad = Variant(name="bad", feature_clamps=({"feature": 64, "value": 1},))
    with pytest.raises(ValueError, match="variant bad: feature_clamps\\[0\\].feature: 64 is out of range"):
        served_variants(SteerConfig(variants=(bad,)), "m", LIMITS)
    with pytest.raises(ValueError, match="model id m is already served"):
        served_variants(SteerConfig(variants=(Variant(name="x", model="m"),)), "m", LIMITS)
