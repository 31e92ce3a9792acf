"""HTTP edge: moves a top-level `feature_clamps` into `vllm_xargs`, and rejects bad clamps with 400.

vLLM's OpenAI models accept unknown top-level fields and drop them (extra="allow", logged at
DEBUG), so without this a `feature_clamps` would silently run unsteered. This pure-ASGI
middleware rewrites the JSON body of POST /v1/chat/completions and /v1/completions:
    {"feature_clamps": [...], ...}  ->  {"vllm_xargs": {"feature_clamps": "<json>"}, ...}
vLLM copies `vllm_xargs` into `SamplingParams.extra_args`, where admission and the worker read it.

Clamps are validated here too (same parser as admission), because a streamed response has already
sent its 200 header when the engine rejects a request; the edge is where a clean 400 is possible.
The plugin adds it to vLLM's app itself (see `vllm_seam`); it can also be named explicitly with
`--middleware steer_plugin.api.middleware.FeatureClampMiddleware`. `return_features` is handled by
`return_features.py`.
"""

from __future__ import annotations

import json
import logging

from steer_plugin.api import return_features
from steer_plugin.api.metrics import REJECTED
from steer_plugin.spec import FIELD, RECORD_FIELD, ClampError, FeatureRecording, RecordingError, SAELimits, parse_clamps

logger = logging.getLogger(__name__)
STEERABLE_PATHS = ("/v1/chat/completions", "/v1/completions")


def error_body(message: str, param: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "BadRequestError", "param": param,
                                 "code": 400}}).encode()


class FeatureClampMiddleware:
    def __init__(self, app, limits: SAELimits | None = None):
        self.app = app
        self._limits = limits
        """What clamps may ask; None: read from the SAE of the app's vLLM config on first use."""

    def _get_limits(self, scope) -> SAELimits:
        if self._limits is None:
            from steer_plugin.config import SteerConfig
            from steer_plugin.spec import limits_for
            from steer_plugin.vllm_seam import app_vllm_config

            self._limits = limits_for(SteerConfig.from_vllm(app_vllm_config(scope["app"])))
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
        service = getattr(scope["app"].state, "steer_features", None) if "app" in scope else None
        try:
            rewritten, recording = self._rewrite(body, scope, service)
        except (ClampError, RecordingError) as e:
            logger.info("action=rejected path=%s reason=%s", scope["path"], e)
            REJECTED.inc()
            return await self._reject(send, str(e), FIELD if isinstance(e, ClampError) else return_features.FIELD)
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
            send = return_features.FeatureAppender(send, service.generated_features, recording.key).send
        await self.app(scope, replay, send)

    def _rewrite(self, body: bytes, scope, service) -> tuple[bytes | None, FeatureRecording | None]:
        """New body (None: pass the original through; vLLM reports malformed JSON itself) and the
        feature recording the request asked for."""
        try:
            data = json.loads(body)
        except ValueError:
            return None, None
        if not isinstance(data, dict):
            return None, None
        recording = return_features.requested_recording(data, service)
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
        body = error_body(message, param)
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
