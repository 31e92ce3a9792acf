"""Admission: every request entering the engine has its clamps validated and its prefix cache keyed.

Wraps vLLM's `InputProcessor.process_inputs`, the one place every request passes through (HTTP
chat/completions, `vllm_xargs`, offline `LLM.generate`) before reaching the engine core:
- `SamplingParams.extra_args["feature_clamps"]` is parsed with the same parser and limits as the
  worker; bad input raises `VLLMValidationError` (HTTP 400 naming the field), so a steering
  request is never admitted to run unsteered;
- the request's `cache_salt` is derived from the canonical clamp set, so KV blocks computed under
  one clamp set are never reused by a request with another (or none);
- `extra_args["steer_record_features"]` (feature inspection) is validated the same way; a request
  that records its prompt gets a cache salt of its own, so every prompt position is computed, and
  read, rather than served from the prefix cache.
"""

from __future__ import annotations

import logging
from functools import wraps

from steer_plugin import metrics
from steer_plugin.config import SteerConfig
from steer_plugin.spec import (FIELD, RECORD_FIELD, ClampError, RecordingError, SAELimits, cache_salt,
                               parse_clamps, parse_recording)

logger = logging.getLogger(__name__)
_installed = False


def _limits(processor) -> SAELimits:
    limits = getattr(processor, "_steer_limits", None)
    if limits is None:
        from steer_plugin.worker import limits_for

        limits = limits_for(SteerConfig.from_vllm(processor.vllm_config))
        processor._steer_limits = limits
    return limits


def install() -> None:
    global _installed
    if _installed:
        return
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from steer_plugin.worker import runs_graph_safe

    original = InputProcessor.process_inputs

    @wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        extra = (params.extra_args if isinstance(params, SamplingParams) else None) or {}
        plan = recording = None
        try:
            plan = parse_clamps(extra.get(FIELD), _limits(self))
            recording = parse_recording(extra.get(RECORD_FIELD))
            if recording is not None and runs_graph_safe(self.vllm_config):
                raise RecordingError(f"{RECORD_FIELD}: feature inspection runs on the host and is off under CUDA "
                                     "graphs; start the server with --enforce-eager to use it")
        except (ClampError, RecordingError) as e:
            logger.info("action=rejected req=%s reason=%s", request_id, e)
            metrics.REJECTED.inc()
            field = FIELD if isinstance(e, ClampError) else RECORD_FIELD
            raise VLLMValidationError(str(e), parameter=field) from None
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if plan is not None:
            request.cache_salt = cache_salt(plan, request.cache_salt)
        if recording is not None and recording.scope == "prompt":
            request.cache_salt = f"{request.cache_salt or ''}:record:{recording.key}"
        metrics.record_admission(steered=plan is not None)
        return request

    InputProcessor.process_inputs = process_inputs
    _installed = True
