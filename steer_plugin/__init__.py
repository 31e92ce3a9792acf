"""steer_plugin: serve-time SAE feature steering for vLLM.

The layout follows the processes vLLM runs:
    api/       the API server process: HTTP edge (middleware.py, request_body.py, reply.py), admission.py,
               variants.py (steered model ids), receipt.py (what ran, on the reply), return_features.py,
               feature_routes.py (/v1/features, /playground), request counters, worker_metrics.py
               (every worker's metrics, fetched over vLLM's RPC, on /metrics)
    worker/    the worker process: attach.py (install at model load), step_layout.py (one per step),
               clamp_table.py, recorder.py (feature inspection), ops.py (the op), metrics.py
    core/      pure parts every side uses: spec.py (the request contract), sae.py and sae_formats.py,
               catalogue_schema.py (the files discovery reads), metric_families.py (the worker metrics'
               schema), config.py (the only env reader)
    search/    the catalogue and concept clamps of an SAE, read and searched (API server)
    launcher/  `server.py` / `steer-server`, `steer-vllm` (vLLM's `vllm serve`), the default model's preparation
    vllm_seam.py     every hook into vLLM, on top: it imports api/ and worker/, nothing imports it
                     but `register` below
    vllm_surface.py  the read-only part of vLLM the API side reads
The offline tools (training, catalogue building, calibration) are a separate distribution,
`steer_workbench` (workbench/), which imports this package and is never imported by it.

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
