"""The read-only surface of vLLM that the API side uses: what it reads from vLLM's app, engine client
and exceptions, and nothing else. It installs no hook and imports nothing of the plugin, so the API
modules can use it without importing the hooks (`vllm_seam` imports the API, never the other way).
Listed, with the hooks, in `vllm_seam`'s inventory (each function says which vLLM object it reads).
"""

from __future__ import annotations

from typing import Any


def validation_error(message: str, parameter: str) -> Exception:
    """The exception vLLM's server turns into an OpenAI-style HTTP 400 naming `parameter`
    (vllm.exceptions.VLLMValidationError)."""
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(message, parameter=parameter)


def app_vllm_config(app) -> Any:
    """The VllmConfig vLLM's `init_app_state` stores on the FastAPI app (`app.state.vllm_config`)."""
    return app.state.vllm_config


def tokenizer_of(engine_client) -> Any:
    """The tokenizer of an engine client (vLLM's renderer holds it: `engine_client.renderer`)."""
    return engine_client.renderer.get_tokenizer()
