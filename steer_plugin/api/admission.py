"""Admission: every request entering the engine has its steering validated and its prefix cache keyed.

`vllm_seam` calls `admit` from vLLM's `InputProcessor.process_inputs`, the one place every request
passes through (HTTP chat/completions, `vllm_xargs`, offline `LLM.generate`) before the engine core:
- `extra_args["feature_clamps"]` and `extra_args["steering_vectors"]` are parsed with the same parsers
  and limits as the worker; bad input raises `AdmissionError` (HTTP 400 naming the field), so a
  steering request is never admitted to run unsteered;
- the request's prefix-cache salt is derived from its canonical steering (and, for scoped clamps or
  vectors, the prompt length) in a namespace no client salt can reach (`spec.cache_salt`), so KV
  blocks computed under one steering are never reused by a request with another (or none);
- `extra_args["steer_record_features"]` (feature inspection) is validated the same way; a request
  that records its prompt gets a cache salt of its own, so every prompt position is computed, and
  read, rather than served from the prefix cache;
- on a server with a KV connector (`steering_refusal`) steering is refused: KV blocks leave vLLM's
  prefix cache there, keyed by whatever the connector keys them by.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import uuid
from dataclasses import dataclass

from steer_plugin.api import metrics
from steer_plugin.api.request_body import ERROR_CHARS, clip
from steer_plugin.core.spec import (FIELD, RECORD_FIELD, VECTOR_FIELD, ClampError, FeatureRecording, Limits,
                                    RecordingError, Steering, VectorError, cache_salt, parse_clamps, parse_recording,
                                    parse_vectors)

logger = logging.getLogger(__name__)
_SECRET = secrets.token_bytes(32)
"""Signs the recording keys this API process hands out: `steer_record_features` is internal, and a
request carrying a key this process did not sign is refused, whatever route it came by."""


def new_recording_key() -> str:
    """A fresh key for `steer_record_features`, signed by this process."""
    nonce = uuid.uuid4().hex
    return f"{nonce}-{_signature(nonce)}"


def _signature(nonce: str) -> str:
    return hmac.new(_SECRET, nonce.encode(), hashlib.sha256).hexdigest()[:24]


def _signed(key: str) -> bool:
    nonce, _, signature = key.rpartition("-")
    return bool(nonce) and hmac.compare_digest(signature, _signature(nonce))


class AdmissionError(ValueError):
    """A request the engine must not run; `field` is the request field to name in the 400."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Admitted:
    """What a request asked of the plugin, validated."""

    steering: Steering | None
    recording: FeatureRecording | None

    def count(self) -> None:
        """Count the request as admitted (once the engine accepted it)."""
        metrics.record_admission(steered=self.steering is not None)

    def cache_salt(self, client_salt: str | None, prompt_len: int) -> str | None:
        """The request's prefix-cache salt, given the salt it came with and its prompt length. A request
        that records its prompt gets a salt of its own, so every prompt position is computed."""
        prompt_recording = self.recording is not None and self.recording.scope == "prompt"
        return cache_salt(client_salt, self.steering, prompt_len, self.recording.key if prompt_recording else None)


def steering_refusal(kv_connector: str | None) -> str | None:
    """Why this server refuses steering, None if it takes it. A KV connector (`--kv-transfer-config`)
    moves KV blocks between vLLM and an outside cache or another instance; not every connector keys
    them by the request's cache salt (LMCache's did not, vLLM issue #44250), so KV computed under
    clamps could be served to a request with other clamps or none. The plugin cannot prove the
    isolation of a connector, so it steers none."""
    if kv_connector is None:
        return None
    return (f"this server runs the KV connector {kv_connector} (--kv-transfer-config), which may share KV "
            "cache between requests without their steering; steering is off here. Serve steered traffic from "
            "instances without a KV connector")


def server_checks(vllm_config) -> tuple[Limits, str | None]:
    """What every request of this server is checked against, read from its vLLM config: the SAEs'
    limits and the server's refusal of steering (`steering_refusal`), the latter logged."""
    from steer_plugin.core.config import SteerConfig
    from steer_plugin.core.spec import limits_for
    from steer_plugin.vllm_surface import kv_connector_of

    connector = kv_connector_of(vllm_config)
    refusal = steering_refusal(connector)
    if refusal is not None:
        logger.warning("action=steering_refused reason=kv_connector connector=%s", connector)
    return limits_for(SteerConfig.from_vllm(vllm_config)), refusal


def admit(request_id: str, extra_args: dict | None, limits: Limits, refusal: str | None = None) -> Admitted:
    """Validate one request's `extra_args` (a refusal is counted here, an admission by `Admitted.count`).
    refusal: `steering_refusal` of the server (steering is refused with it)."""
    extra = extra_args or {}
    try:
        steering = Steering.of(parse_clamps(extra.get(FIELD), limits), parse_vectors(extra.get(VECTOR_FIELD), limits),
                               limits)
        if steering is not None and refusal is not None:
            raise refused(steering, refusal)
        recording = parse_recording(extra.get(RECORD_FIELD))
        if recording is not None:
            if not _signed(recording.key):
                raise RecordingError(f"{RECORD_FIELD}: an internal field the server sets; clients cannot send it "
                                     "(use return_features or /v1/features/inspect)")
            limits.index(recording.sae, f"{RECORD_FIELD}.sae", RecordingError)
    except (ClampError, VectorError, RecordingError) as e:
        message = clip(str(e), ERROR_CHARS)  # it may quote client input (an unknown key, say)
        logger.info("action=rejected req=%s reason=%s", request_id, message)
        metrics.REJECTED.inc()
        raise AdmissionError(message, error_field(e)) from None
    return Admitted(steering, recording)


def refused(steering: Steering, refusal: str) -> ValueError:
    """The error of a steered request on a server that refuses steering, naming the field it steers by."""
    if steering.clamps is not None:
        return ClampError(f"{FIELD}: {refusal}")
    return VectorError(f"{VECTOR_FIELD}: {refusal}")


def error_field(error: ValueError) -> str:
    """The request field a steering error names in its 400."""
    return {ClampError: FIELD, VectorError: VECTOR_FIELD}.get(type(error), RECORD_FIELD)
