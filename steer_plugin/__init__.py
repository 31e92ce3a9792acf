"""steer_plugin: serve-time SAE feature steering for vLLM.

The layout follows the processes vLLM runs:
    api/      the API server process: HTTP edge (middleware.py), admission.py, return_features.py,
              feature_routes.py (/v1/features), and the request counters (metrics.py)
    worker/   the worker process: attach.py (install at model load), step_layout.py (one per step),
              clamp_table.py, recorder.py (feature inspection), ops.py (the op), metrics.py
    spec.py, sae.py, config.py, catalogue.py, reference.py: pure parts both sides use
    vllm_seam.py: the only module that patches vLLM or touches its internals

Data path: HTTP body -> api/middleware.py (`feature_clamps` -> `vllm_xargs`, 400 on bad input) ->
api/admission.py (`SamplingParams.extra_args` validated, prefix cache salted) -> worker: the step
layout -> clamp table -> the op at the SAE layer (encode, clamp, decode, error kept) -> metrics.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
_registered = False


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
    cheap, idempotent, and a no-op when STEER_PLUGIN_DISABLE=1. Stops start-up on an unsupported
    vLLM (see `vllm_seam.SUPPORTED_VLLM`)."""
    global _registered
    from steer_plugin.core.config import allow_any_vllm, plugin_disabled

    _configure_logging()
    if plugin_disabled():
        if not _registered:
            logger.warning("steer_plugin disabled (STEER_PLUGIN_DISABLE=1): this is vanilla vLLM, "
                           "feature_clamps is not understood here")
        _registered = True
        return
    _registered = True
    from steer_plugin import vllm_seam

    vllm_seam.check_vllm_version(vllm_seam.installed_vllm_version(), allow_any_vllm())
    vllm_seam.prefer_v1_model_runner()
    vllm_seam.install(vllm_seam.roles_of_this_load())
