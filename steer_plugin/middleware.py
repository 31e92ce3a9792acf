"""HTTP edge: moves a top-level `feature_clamps` into `vllm_xargs`, and rejects bad clamps with 400.

vLLM's OpenAI models accept unknown top-level fields and drop them (extra="allow", logged at
DEBUG), so without this a `feature_clamps` would silently run unsteered. This pure-ASGI
middleware rewrites the JSON body of POST /v1/chat/completions and /v1/completions:
    {"feature_clamps": [...], ...}  ->  {"vllm_xargs": {"feature_clamps": "<json>"}, ...}
vLLM copies `vllm_xargs` into `SamplingParams.extra_args`, where admission and the worker read it.

Clamps are validated here too (same parser as admission), because a streamed response has already
sent its 200 header when the engine rejects a request; the edge is where a clean 400 is possible.
It is installed automatically in vLLM's API server by the plugin (see `install`), and can also be
named explicitly with `--middleware steer_plugin.middleware.FeatureClampMiddleware`.
"""

from __future__ import annotations

import json
import logging

from steer_plugin.metrics import REJECTED
from steer_plugin.spec import FIELD, ClampError, parse_clamps

logger = logging.getLogger(__name__)
STEERABLE_PATHS = ("/v1/chat/completions", "/v1/completions")
_installed = False


def _error_body(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "BadRequestError", "param": FIELD,
                                 "code": 400}}).encode()


class FeatureClampMiddleware:
    def __init__(self, app):
        self.app = app
        self._limits = None

    def _get_limits(self, scope):
        if self._limits is None:
            from steer_plugin.config import SteerConfig
            from steer_plugin.worker import limits_for

            self._limits = limits_for(SteerConfig.from_vllm(scope["app"].state.vllm_config))
        return self._limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in STEERABLE_PATHS:
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            rewritten = self._rewrite(body, scope)
        except ClampError as e:
            logger.info("action=rejected path=%s reason=%s", scope["path"], e)
            REJECTED.inc()
            return await self._reject(send, str(e))
        if rewritten is not None:
            body = rewritten
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}

        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # e.g. http.disconnect while streaming
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _rewrite(self, body: bytes, scope) -> bytes | None:
        """New body, or None to pass the original through (vLLM reports malformed JSON itself)."""
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        xargs = data.get("vllm_xargs")
        top = FIELD in data
        nested = isinstance(xargs, dict) and FIELD in xargs
        if not (top or nested):
            return None
        if top and nested:
            raise ClampError(f"{FIELD}: given both at top level and in vllm_xargs; send one")
        raw = data.pop(FIELD) if top else xargs[FIELD]
        if data.get("use_beam_search"):
            raise ClampError(f"{FIELD}: not supported with use_beam_search")
        plan = parse_clamps(raw, self._get_limits(scope))
        xargs = dict(xargs) if isinstance(xargs, dict) else {}
        if plan is None:
            xargs.pop(FIELD, None)  # an empty list means no steering
        else:
            xargs[FIELD] = raw if isinstance(raw, str) else json.dumps(raw)
        data["vllm_xargs"] = xargs or None
        return json.dumps(data).encode()

    @staticmethod
    async def _reject(send, message: str) -> None:
        body = _error_body(message)
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def install() -> None:
    """Add the middleware to every app vLLM's API server builds (no --middleware flag needed).

    vLLM's launcher imports `init_entrypoints_middleware` into `vllm.entrypoints.launchers.app`
    and calls it from `build_app`; wrapping that module attribute covers `vllm serve` and
    `python -m vllm.entrypoints.openai.api_server`."""
    global _installed
    if _installed:
        return
    import vllm.entrypoints.launchers.app as app_module

    original = app_module.init_entrypoints_middleware

    def init_entrypoints_middleware(args, app, *rest, **kwargs):
        original(args, app, *rest, **kwargs)
        configured = getattr(args, "middleware", None) or []
        if f"{__name__}.FeatureClampMiddleware" not in configured:
            app.add_middleware(FeatureClampMiddleware)

    app_module.init_entrypoints_middleware = init_entrypoints_middleware
    _installed = True
