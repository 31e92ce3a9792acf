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

`"return_features": k` on the same endpoints asks for the top-k SAE features of every generated
token: the request gets a `steer_record_features` entry (scope "generation"), and when the reply
is complete the records are fetched from the worker and added to it, as `choices[0].features`
(non-streaming) or as one extra chunk before `data: [DONE]` (streaming, `choices: []` like a
usage chunk). Entry i belongs to generated token i; ask for logprobs to see the tokens.
"""

from __future__ import annotations

import json
import logging
import uuid

from steer_plugin.metrics import REJECTED
from steer_plugin.spec import (FIELD, MAX_TOP_K, RECORD_FIELD, ClampError, FeatureRecording, RecordingError,
                               parse_clamps)

logger = logging.getLogger(__name__)
STEERABLE_PATHS = ("/v1/chat/completions", "/v1/completions")
RETURN_FEATURES = "return_features"
"""Request field: top-k SAE features per generated token, returned with the reply."""
_DONE = b"data: [DONE]"
_installed = False


def _error_body(message: str, param: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "BadRequestError", "param": param,
                                 "code": 400}}).encode()


def _recording(data: dict, scope) -> FeatureRecording | None:
    """The worker-side recording a `return_features` field asks for (removed from `data`)."""
    if RETURN_FEATURES not in data:
        return None
    k = data.pop(RETURN_FEATURES)
    if k is None:
        return None
    if type(k) is not int or not 1 <= k <= MAX_TOP_K:
        raise RecordingError(f"{RETURN_FEATURES}: must be an integer from 1 to {MAX_TOP_K}, got {k!r}")
    if data.get("n", 1) not in (1, None) or data.get("use_beam_search"):
        raise RecordingError(f"{RETURN_FEATURES}: needs a single choice (n=1, no beam search)")
    if getattr(scope["app"].state, "steer_features", None) is None:
        raise RecordingError(f"{RETURN_FEATURES}: the steer_features endpoint plugin is not loaded "
                             "(VLLM_PLUGINS must name it; server.py does)")
    return FeatureRecording(key=uuid.uuid4().hex, top_k=k, scope="generation")


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
            rewritten, recording = self._rewrite(body, scope)
        except (ClampError, RecordingError) as e:
            logger.info("action=rejected path=%s reason=%s", scope["path"], e)
            REJECTED.inc()
            return await self._reject(send, str(e), FIELD if isinstance(e, ClampError) else RETURN_FEATURES)
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

        if recording is not None:
            send = _FeatureAppender(send, scope, recording.key).send
        await self.app(scope, replay, send)

    def _rewrite(self, body: bytes, scope) -> tuple[bytes | None, FeatureRecording | None]:
        """New body (None: pass the original through; vLLM reports malformed JSON itself) and the
        feature recording the request asked for."""
        try:
            data = json.loads(body)
        except ValueError:
            return None, None
        if not isinstance(data, dict):
            return None, None
        recording = _recording(data, scope)
        xargs = data.get("vllm_xargs")
        top = FIELD in data
        nested = isinstance(xargs, dict) and FIELD in xargs
        if not (top or nested or recording):
            return None, None
        xargs = dict(xargs) if isinstance(xargs, dict) else {}
        if top or nested:
            if top and nested:
                raise ClampError(f"{FIELD}: given both at top level and in vllm_xargs; send one")
            raw = data.pop(FIELD) if top else xargs[FIELD]
            if data.get("use_beam_search"):
                raise ClampError(f"{FIELD}: not supported with use_beam_search")
            plan = parse_clamps(raw, self._get_limits(scope))
            if plan is None:
                xargs.pop(FIELD, None)  # an empty list means no steering
            else:
                xargs[FIELD] = raw if isinstance(raw, str) else json.dumps(raw)
        if recording is not None:
            xargs[RECORD_FIELD] = recording.model_dump_json()
        data["vllm_xargs"] = xargs or None
        return json.dumps(data).encode(), recording

    @staticmethod
    async def _reject(send, message: str, param: str) -> None:
        body = _error_body(message, param)
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _FeatureAppender:
    """Wraps the ASGI `send` of one request that asked for `return_features`."""

    def __init__(self, send, scope, key: str):
        self._send = send
        self._service = scope["app"].state.steer_features
        self._key = key
        self._start = None  # held back until the body is known (its length changes)
        self._chunks: list[bytes] = []
        self._streaming = False

    async def _features(self) -> list[dict]:
        return await self._service.generated_features(self._key)

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            if message["status"] != 200:
                self._key = None  # an error reply passes through untouched
            elif not content_type.startswith(b"text/event-stream"):
                self._start = message  # held back: the body's length changes
                return None
            else:
                self._streaming = True
            return await self._send(message)
        if message["type"] != "http.response.body" or self._key is None:
            return await self._send(message)
        body = message.get("body", b"")
        if self._streaming:
            cut = body.find(_DONE)
            if cut < 0:
                return await self._send(message)
            event = {"object": "steer.features", "choices": [], "features": await self._features()}
            await self._send({"type": "http.response.body", "body": body[:cut] + b"data: " +
                              json.dumps(event).encode() + b"\n\n", "more_body": True})
            self._key = None
            return await self._send({**message, "body": body[cut:]})
        self._chunks.append(body)
        if message.get("more_body"):
            return None
        reply = json.loads(b"".join(self._chunks))
        reply["choices"][0]["features"] = await self._features()
        out = json.dumps(reply).encode()
        headers = [(k, v) for k, v in self._start["headers"] if k.lower() != b"content-length"]
        await self._send({**self._start, "headers": headers + [(b"content-length", str(len(out)).encode())]})
        await self._send({"type": "http.response.body", "body": out, "more_body": False})


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
