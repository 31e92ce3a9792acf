"""steer_plugin: serve-time SAE feature steering for vLLM.

Data path, one module a step:
    HTTP body ── middleware.py (top-level `feature_clamps` -> vllm_xargs; 400 on bad input)
             ── admission.py (SamplingParams.extra_args validated, prefix cache salted)
             ── worker.py + clamp_table.py (per-step table filled from extra_args)
             ── ops.py (the registered op at the SAE layer: encode, clamp, decode, error kept)
             ── metrics.py (Prometheus)

Feature discovery (feature_api.py, a `vllm.endpoint_plugins` entry; catalogue.py for search) sends
inspection through the same path: a request carrying `steer_record_features` is admitted like any
other, the op hands its tokens' features to feature_recorder.py, and the API fetches them by key.
"""

from __future__ import annotations

import hashlib
import logging
import sys

logger = logging.getLogger(__name__)
OP_VERSION = "steer_plugin-op-1"
"""Salted into vLLM's config hash: a compiled graph built without the op is never reused."""
_registered = False


def _salt_compile_hash() -> None:
    from vllm.config import VllmConfig

    original = VllmConfig.compute_hash

    def compute_hash(self, *args, **kwargs) -> str:
        base = original(self, *args, **kwargs)
        return hashlib.sha256(f"{base}:{OP_VERSION}".encode()).hexdigest()[: len(base)]

    VllmConfig.compute_hash = compute_hash


def _configure_logging() -> None:
    # vLLM configures only its own "vllm" logger; give ours a handler so decisions are visible.
    root = logging.getLogger(__name__)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def register() -> None:
    """vLLM general-plugin entry point. Runs in every vLLM process, possibly more than once:
    cheap, idempotent, and a no-op when STEER_PLUGIN_DISABLE=1."""
    global _registered
    from steer_plugin.config import plugin_disabled, prefer_v1_model_runner

    if _registered:
        return
    _registered = True
    _configure_logging()
    if plugin_disabled():
        logger.warning("steer_plugin disabled (STEER_PLUGIN_DISABLE=1): this is vanilla vLLM, "
                       "feature_clamps is not understood here")
        return
    prefer_v1_model_runner()
    _salt_compile_hash()
    from steer_plugin import admission, worker

    admission.install()
    worker.install()
    if "vllm.entrypoints.launchers.app" in sys.modules:  # the API server process
        from steer_plugin import middleware

        middleware.install()
