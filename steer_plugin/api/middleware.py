"""HTTP edge: moves a top-level `feature_clamps` or `steering_vectors` into `vllm_xargs`, refuses what
must not run.

vLLM's OpenAI models accept unknown top-level fields and drop them (extra="allow", logged at
DEBUG), so without this a `feature_clamps` would silently run unsteered. This pure-ASGI middleware
reads the body of every request that carries one, the way vLLM will read it (`request_body.read`:
vLLM's own decoders, every reading a route may make; what cannot be read so is refused):
- on the steering routes (`routes.STEERED`) it rewrites
      {"feature_clamps": [...], ...}  ->  {"vllm_xargs": {"feature_clamps": "<json>"}, ...}
  (and `steering_vectors` alike)
  (vLLM copies `vllm_xargs` into `SamplingParams.extra_args`, where admission and the worker read
  it), hands `return_features` to `return_features.py`, turns a request for a steered variant's
  model id into a steered request (`variants.py`), and gives a steered reply its receipt
  (`receipt.py`);
- on every other route, and in every form, a body carrying any of these fields is refused (it would run
  unsteered);
- everywhere: bodies over the size, nesting or number limits, near-miss field names and the
  internal `steer_record_features` get a 400 naming the field (`request_body.py`);
- on /metrics it adds the workers' steering metrics to vLLM's reply (`worker_metrics.py`), on
  /v1/models the steered variants.
Clamps and vectors are validated here too (same parsers as admission), because a streamed response has already
sent its 200 header when the engine rejects a request; the edge is where a clean 400 is possible.

The plugin adds it to vLLM's app itself (see `vllm_seam`) as the innermost middleware, so vLLM's
API-key check runs first and CORS headers reach its 400s. vLLM's own error replies that quote
client input are cut short here too.
"""

from __future__ import annotations

import json
import logging

from steer_plugin.api import receipt, request_body, return_features, routes, worker_metrics
from steer_plugin.api.metrics import REJECTED
from steer_plugin.api.reply import holding
from steer_plugin.api.request_body import ERROR_CHARS, BodyError, clip
from steer_plugin.api.variants import ServedVariant, served_variants, with_variants
from steer_plugin.api.admission import error_field, refused
from steer_plugin.core.spec import (FIELD, RECORD_FIELD, VECTOR_FIELD, ClampError, FeatureRecording, Limits,
                                    RecordingError, Steering, VectorError, clamp_list, parse_clamps, parse_vectors,
                                    vector_list)

logger = logging.getLogger(__name__)
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
"""Methods whose body a route may read (vLLM's routes that take one are all POST)."""
STEERING_FIELDS = (FIELD, VECTOR_FIELD)
"""The request fields that steer; each moves into `vllm_xargs` as a JSON string."""
_ERRORS = {FIELD: ClampError, VECTOR_FIELD: VectorError}
MAX_ERROR_BYTES = 4096
"""Error replies longer than this (vLLM's own echo client input) have their message cut short."""


def error_body(message: str, param: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "BadRequestError", "param": param,
                                 "code": 400}}).encode()


class FeatureClampMiddleware:
    def __init__(self, app, limits: Limits | None = None, variants: dict[str, ServedVariant] | None = None):
        self.app = app
        self._limits = limits
        """What clamps may ask; None: read from the SAEs of the app's vLLM config on first use."""
        self._refusal: str | None = None
        """Why this server refuses steering (`admission.steering_refusal`), read with the limits."""
        self._variants = variants
        """Steered variants by model id; read from the app's vLLM config with the limits unless given."""

    def _get_limits(self, scope) -> Limits:
        if self._limits is None:
            from steer_plugin.api.admission import server_checks
            from steer_plugin.core.config import SteerConfig
            from steer_plugin.vllm_surface import app_vllm_config, served_model_name

            vllm_config = app_vllm_config(scope["app"])
            self._limits, self._refusal = server_checks(vllm_config)
            self._variants = served_variants(SteerConfig.from_vllm(vllm_config), served_model_name(vllm_config),
                                             self._limits)
        return self._limits

    def _get_variants(self, scope) -> dict[str, ServedVariant]:
        self._get_limits(scope)
        return self._variants or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET":
            path = routes.route_path(scope)
            if path.startswith("/metrics"):
                return await worker_metrics.serve(self.app, scope, receive, send)
            if path == "/v1/models" and self._get_variants(scope):
                async def listed(start: dict, body: bytes) -> bytes:
                    return with_variants(body, self._get_variants(scope))

                return await self.app(scope, receive, holding(send, lambda start: start["status"] == 200, listed))
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > request_body.MAX_BODY_BYTES:
                return await self._reject(send, scope, BodyError(
                    f"request body: over {request_body.MAX_BODY_BYTES} bytes", "body"))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        path = routes.route_path(scope)
        service = getattr(scope["app"].state, "steer_features", None) if "app" in scope else None
        try:
            rewritten, recording, steering = await self._rewrite(body, path, scope, service)
        except (ClampError, VectorError, RecordingError, BodyError) as e:
            return await self._reject(send, scope, e)
        if rewritten is not None:
            body = rewritten
            scope = {**scope, "headers": request_body.with_length(scope["headers"], len(body))}

        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # e.g. http.disconnect while streaming
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        send = holding(send, lambda start: start["status"] >= 400, _clipped)
        if steering is not None:
            send = receipt.with_receipt(send, steering)
        if recording is None:
            return await self.app(scope, replay, send)
        appender = return_features.FeatureAppender(send, service.generated_features, recording.key)
        try:
            await self.app(scope, replay, appender.send)
        finally:
            await appender.discard()  # records of a reply that never completed (client gone, error)

    async def _rewrite(self, body: bytes, path: str, scope, service
                       ) -> tuple[bytes | None, FeatureRecording | None, Steering | None]:
        """New body (None: pass the original through), the feature recording the request asked for,
        and its steering (None: unsteered)."""
        data, form = await request_body.read(scope, body)
        if form is not None:  # no route steers a form (audio uploads): the fields would be dropped
            request_body.near_miss(form)
            for field in (*STEERING_FIELDS, return_features.FIELD):
                if field in form:
                    raise BodyError(f"{field}: not supported in a form ({clip(path)})", field)
        if not isinstance(data, dict):
            return None, None, None  # not a JSON object: vLLM reports it itself
        request_body.near_miss(data)
        xargs = data.get("vllm_xargs") if isinstance(data.get("vllm_xargs"), dict) else None
        if xargs is not None and RECORD_FIELD in xargs:
            raise BodyError(f"vllm_xargs.{RECORD_FIELD}: an internal field the server sets; clients "
                            "cannot send it (use return_features)", RECORD_FIELD)
        top = [field for field in STEERING_FIELDS if field in data]
        nested = [field for field in STEERING_FIELDS if xargs is not None and field in xargs]
        model = data.get("model")
        variant = self._get_variants(scope).get(model) if isinstance(model, str) else None
        if path not in routes.STEERED:
            if variant is not None:  # a route that does not steer must not serve it as the plain model
                raise BodyError(f"model: {clip(model)} is a steered variant; steering runs on "
                                f"{' and '.join(sorted(routes.STEERED))}", "model")
            for field in (*top, *nested, *([return_features.FIELD] if return_features.FIELD in data else [])):
                raise BodyError(f"{field}: not supported on {clip(path)}; steering runs on "
                                f"{' and '.join(sorted(routes.STEERED))}", field)
            return None, None, None
        recording = return_features.requested_recording(data, service, lambda: self._get_limits(scope))
        if not (top or nested or recording or variant):
            return None, None, None
        limits = self._get_limits(scope)
        xargs = dict(xargs or {})
        raw = {}
        for field in STEERING_FIELDS:
            if field in top and field in nested:
                raise _ERRORS[field](f"{field}: given both at top level and in vllm_xargs; send one")
            if field in top or field in nested:
                raw[field] = data.pop(field) if field in top else xargs[field]
        clamps, vectors = parse_clamps(raw.get(FIELD), limits), parse_vectors(raw.get(VECTOR_FIELD), limits)
        if variant is not None:
            clamps, vectors = variant.apply(data, clamps, vectors, limits)
            raw = {FIELD: clamps and clamp_list(clamps, limits), VECTOR_FIELD: vectors and vector_list(vectors, limits)}
        steering = Steering.of(clamps, vectors, limits)
        if steering is not None and data.get("use_beam_search"):
            raise refused(steering, "not supported with use_beam_search" +
                          (f" (model {clip(model)} is steered)" if variant is not None else ""))
        if steering is not None and self._refusal is not None:
            raise refused(steering, self._refusal)
        for field, plan in ((FIELD, clamps), (VECTOR_FIELD, vectors)):
            if plan is None:
                xargs.pop(field, None)  # an empty list means none
            else:  # vllm_xargs carries structured values as JSON strings
                xargs[field] = raw[field] if isinstance(raw[field], str) else json.dumps(raw[field])
        if recording is not None:
            xargs[RECORD_FIELD] = recording.model_dump_json()
        data["vllm_xargs"] = xargs or None
        return json.dumps(data).encode(), recording, steering

    @staticmethod
    async def _reject(send, scope, error: ValueError) -> None:
        param = error.param if isinstance(error, BodyError) else (
            return_features.FIELD if isinstance(error, RecordingError) else error_field(error))
        message = clip(str(error), ERROR_CHARS)
        logger.info("action=rejected path=%s param=%s reason=%s", clip(scope["path"]), param, message)
        REJECTED.inc()
        body = error_body(message, param)
        await send({"type": "http.response.start", "status": 400,
                    "headers": request_body.with_length([(b"content-type", b"application/json")], len(body))})
        await send({"type": "http.response.body", "body": body})


async def _clipped(start: dict, body: bytes) -> bytes:
    """An error reply's body with its message cut short if the reply is over MAX_ERROR_BYTES, so no
    reply repeats megabytes of client input (vLLM's validation errors quote the input)."""
    if len(body) <= MAX_ERROR_BYTES:
        return body
    try:
        reply = json.loads(body)
        reply["error"]["message"] = clip(reply["error"]["message"], ERROR_CHARS)
        return json.dumps(reply).encode()
    except (ValueError, KeyError, TypeError):
        return clip(body.decode(errors="replace"), ERROR_CHARS).encode()
