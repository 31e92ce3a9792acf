"""Admission on vLLM's real InputProcessor (built from the default model's config; no engine runs)."""

from __future__ import annotations

import json

import pytest
from prometheus_client import REGISTRY

from steer_plugin import vllm_seam
from steer_plugin.api.admission import new_recording_key
from steer_plugin.core.config import DEFAULT_SAE_DIR, default_model_dir
from steer_plugin.core.spec import FIELD, RECORD_FIELD, SALT_PREFIX, VECTOR_FIELD

CLAMPS = [{"feature": 3, "value": 2.0}, {"feature": 10, "value": 1.0, "mode": "add"}]


@pytest.fixture(scope="module")
def processor():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.renderers import renderer_from_config
    from vllm.v1.engine.input_processor import InputProcessor

    vllm_seam.install({"frontend"})
    config = EngineArgs(model=str(default_model_dir()), dtype="float32", max_model_len=512,
                        additional_config={"steer": {"saes": [{"path": str(DEFAULT_SAE_DIR)}]}}).create_engine_config()
    return InputProcessor(config, renderer_from_config(config))


def _process(processor, extra_args=None, salt=None, request_id="r"):
    from vllm import SamplingParams

    prompt = {"prompt_token_ids": [1, 2, 3, 4]}
    if salt is not None:
        prompt["cache_salt"] = salt
    return processor.process_inputs(request_id, prompt, SamplingParams(max_tokens=2, extra_args=extra_args),
                                    ("generate",))


def _count(name: str, labels: dict | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_clamp_sets_key_the_prefix_cache(processor):
    plain = _process(processor)
    a = _process(processor, {FIELD: json.dumps(CLAMPS)})
    a_again = _process(processor, {FIELD: list(reversed(CLAMPS))})  # same set, other order and form
    b = _process(processor, {FIELD: json.dumps(CLAMPS[:1])})
    assert plain.cache_salt is None
    assert a.cache_salt == a_again.cache_salt and a.cache_salt not in (None, b.cache_salt)
    with_user_salt = _process(processor, {FIELD: json.dumps(CLAMPS)}, salt="user").cache_salt
    assert with_user_salt.startswith(SALT_PREFIX) and with_user_salt != a.cache_salt
    forged = _process(processor, salt=a.cache_salt).cache_salt  # an unsteered request sending the derived salt
    assert forged != a.cache_salt


def test_prompt_recording_gets_a_salt_of_its_own(processor):
    key = new_recording_key()
    recording = json.dumps({"key": key, "sae": "smollm2-135m-instruct-l15", "top_k": 3, "scope": "prompt"})
    assert key in _process(processor, {RECORD_FIELD: recording}).cache_salt


def test_recording_is_internal_clients_cannot_forge_it(processor):
    from vllm.exceptions import VLLMValidationError

    real = new_recording_key()
    forged = real[:-1] + ("1" if real.endswith("0") else "0")  # one signature digit changed
    for key in (forged, "a" * 32, "0" * 32 + "-" + "0" * 24):
        with pytest.raises(VLLMValidationError, match="internal field") as info:
            _process(processor, {RECORD_FIELD: json.dumps({"key": key, "sae": "smollm2-135m-instruct-l15", "top_k": 3,
                                                           "scope": "generation"})})
        assert info.value.parameter == RECORD_FIELD


@pytest.mark.parametrize("extra, field, words", [
    ({FIELD: json.dumps([{"feature": 10**6, "value": 1}])}, FIELD, "out of range"),
    ({FIELD: "[{"}, FIELD, "not valid JSON"),
    ({FIELD: json.dumps([{"feature": 1, "value": 1, "mode": "clamp"}])}, FIELD, "feature_clamps[0].mode"),
    ({RECORD_FIELD: json.dumps({"key": "short", "sae": "smollm2-135m-instruct-l15", "top_k": 3, "scope": "prompt"})}, RECORD_FIELD, "key"),
])
def test_bad_steering_is_a_validation_error_naming_the_field(processor, extra, field, words):
    from vllm.exceptions import VLLMValidationError

    before = _count("steer_requests_rejected_total")
    with pytest.raises(VLLMValidationError) as info:
        _process(processor, extra)
    assert info.value.parameter == field and words in str(info.value)
    assert _count("steer_requests_rejected_total") == before + 1


def test_admissions_are_counted_by_steering(processor):
    steered = _count("steer_requests_total", {"steered": "true"})
    plain = _count("steer_requests_total", {"steered": "false"})
    _process(processor, {FIELD: json.dumps(CLAMPS)})
    _process(processor)
    assert _count("steer_requests_total", {"steered": "true"}) == steered + 1
    assert _count("steer_requests_total", {"steered": "false"}) == plain + 1


def test_a_server_with_a_kv_connector_refuses_clamps_and_serves_the_rest():
    """KV blocks leave vLLM's prefix cache through a connector, keyed as the connector keys them: steered
    KV could serve other requests, so clamps and vectors are refused (400 naming their field); the rest
    runs."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.exceptions import VLLMValidationError
    from vllm.renderers import renderer_from_config
    from vllm.v1.engine.input_processor import InputProcessor

    config = EngineArgs(model=str(default_model_dir()), dtype="float32", max_model_len=512,
                        kv_transfer_config=KVTransferConfig(kv_connector="LMCacheConnectorV1", kv_role="kv_both"),
                        additional_config={"steer": {"saes": [{"path": str(DEFAULT_SAE_DIR)}],
                                                     "vectors": [{"name": "v", "path": "v.gguf"}]}}
                        ).create_engine_config()
    processor = InputProcessor(config, renderer_from_config(config))
    for field, value in ((FIELD, CLAMPS), (VECTOR_FIELD, [{"vector": "v", "scale": 1.0}])):
        with pytest.raises(VLLMValidationError, match="KV connector LMCacheConnectorV1") as refused:
            _process(processor, {field: json.dumps(value)})
        assert refused.value.parameter == field
    assert _process(processor).cache_salt is None  # unsteered requests run as on vanilla vLLM
