"""The HTTP edge as an ASGI app: vLLM-shaped routes behind the real middleware, driven over httpx."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from steer_plugin.api.middleware import FeatureClampMiddleware
from steer_plugin.spec import RECORD_FIELD, SAELimits

pytestmark = pytest.mark.anyio

LIMITS = SAELimits(d_sae=64, max_clamps=4, max_activation=np.full(64, 2.0, dtype=np.float32))
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


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def generate(request: Request):
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "vLLM's own JSON error"}, status_code=422)
        if body.get("stream"):
            chunk = json.dumps({"choices": [{"delta": {"content": TRICKY}}]})
            # split mid-event on purpose: framing must not depend on chunk boundaries
            return _events([f"data: {chunk[:10]}", f"{chunk[10:]}\n\n", "data: [DONE]\n\n"])
        return JSONResponse({"received": body, "choices": [{"message": {"content": TRICKY}}]})

    @app.post("/other")
    async def other(request: Request):
        return JSONResponse({"received": await request.json()})

    app.add_middleware(FeatureClampMiddleware, limits=LIMITS)
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
    ({"return_features": 0}, "return_features", "integer"),
    ({"return_features": 3, "n": 2}, "return_features", "single choice"),
    ({"return_features": 3, "prompt": ["a", "b"]}, "return_features", "single prompt"),
])
async def test_bad_input_is_an_openai_style_400_naming_the_field(app, body, param, words):
    r = await _post(app, "/v1/completions", {"model": "m", **body})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["code"] == 400


async def test_other_routes_and_malformed_json_pass_through(app):
    assert (await _post(app, "/other", {"feature_clamps": "x"})).json()["received"] == {"feature_clamps": "x"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.post("/v1/completions", content=b"{not json")
    assert r.status_code == 422  # left to vLLM's own parser


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
