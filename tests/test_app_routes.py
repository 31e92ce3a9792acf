"""vLLM's real app (build_app, with the plugin's hooks and its endpoint plugin, as server.py loads
them), no engine: every route is classified, the plugin's own included,
the API-key check runs before the plugin, CORS headers reach its 400s, and routes that do not steer
refuse the steering fields. Requests here never reach an engine: each is answered by a middleware."""

from __future__ import annotations

import json
import logging
import os

import httpx
import pytest

from steer_plugin import vllm_seam
from steer_plugin.api import routes
from steer_plugin.core.config import DEFAULT_SAE_DIR, default_model_dir

pytestmark = pytest.mark.anyio
KEY = "sk-test"
CLAMPS = [{"feature": 3, "value": 1.0}]


def _build(*flags: str, **engine_args):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm_seam.install({"frontend"})
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", *flags])
    previous = os.environ.get("VLLM_PLUGINS")
    os.environ["VLLM_PLUGINS"] = "steer,steer_features"  # what server.py sets: the endpoint plugin too
    try:
        app = build_app(args, supported_tasks=("generate",))
    finally:
        if previous is None:
            os.environ.pop("VLLM_PLUGINS")
        else:
            os.environ["VLLM_PLUGINS"] = previous
    app.state.vllm_config = EngineArgs(
        model=str(default_model_dir()), dtype="float32", max_model_len=512,
        additional_config={"steer": {"saes": [{"path": str(DEFAULT_SAE_DIR)}]}}, **engine_args).create_engine_config()
    return app


@pytest.fixture(scope="module")
def app():
    return _build("--api-key", KEY, "--allowed-origins", '["https://playground.example"]')


async def _post(app, path, body, key=KEY, **kwargs):
    headers = {"content-type": "application/json", "origin": "https://playground.example"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, **kwargs), base_url="http://test") as c:
        return await c.post(path, content=json.dumps(body), headers=headers)


def test_every_route_of_the_app_is_classified(app, caplog):
    paths = [getattr(r, "path", None) for r in app.routes]
    assert {"/v1/chat/completions", "/v1/concepts", "/v1/features/inspect", "/playground"} <= set(paths)
    assert routes.unclassified(paths) == []
    with caplog.at_level(logging.INFO, logger=routes.__name__):
        routes.log_routes(paths)
    assert "routes_unclassified" not in caplog.text and "action=routes" in caplog.text


async def test_the_api_key_is_checked_before_clamps(app):
    r = await _post(app, "/v1/chat/completions", {"model": "m", "feature_clamps": "garbage"}, key=None)
    assert r.status_code == 401


async def test_plugin_400s_carry_cors_headers(app):
    r = await _post(app, "/v1/chat/completions", {"model": "m", "messages": [], "feature_clamps": [{"feature": -1}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "feature_clamps"
    assert r.headers["access-control-allow-origin"] == "https://playground.example"


@pytest.mark.parametrize("path", sorted(routes.ENGINE_REFUSED & {
    "/v1/responses", "/v1/messages", "/invocations", "/generative_scoring", "/inference/v1/generate",
    "/v1/chat/completions/batch", "/v1/systemone"}))
@pytest.mark.parametrize("field, value", [("feature_clamps", CLAMPS), ("return_features", 3)])
async def test_routes_that_do_not_steer_refuse_the_fields(app, path, field, value):
    r = await _post(app, path, {"model": "m", "input": "hi", field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field and path in r.json()["error"]["message"]


async def test_routes_under_a_root_path():
    app = _build("--root-path", "/api")
    r = await _post(app, "/api/v1/responses", {"model": "m", "input": "hi", "feature_clamps": CLAMPS},
                    root_path="/api")
    assert r.status_code == 400 and r.json()["error"]["param"] == "feature_clamps"
    r = await _post(app, "/api/v1/completions", {"model": "m", "prompt": "x", "feature_clamps": [{"feature": -1}]},
                    root_path="/api")
    assert r.status_code == 400 and "feature_clamps[0]" in r.json()["error"]["message"]


async def test_with_a_kv_connector_streamed_clamps_are_refused_before_the_stream_starts():
    """At the edge too (a streamed reply has sent its 200 once the engine sees the request): a server
    with a KV connector answers clamps with a 400 naming the field."""
    from vllm.config import KVTransferConfig

    app = _build(kv_transfer_config=KVTransferConfig(kv_connector="LMCacheConnectorV1", kv_role="kv_both"))
    r = await _post(app, "/v1/completions", {"model": "m", "prompt": "x", "stream": True, "feature_clamps": CLAMPS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "feature_clamps"
    assert "KV connector LMCacheConnectorV1" in r.json()["error"]["message"]
