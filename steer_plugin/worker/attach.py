"""Worker side, at model load: load the SAE onto the model's device, wrap the configured decoder
layer with the steering op, and hand back the state the per-step hook drives.

Called by `vllm_seam` from vLLM's `Worker.load_model`, after the weights are loaded and before
warm-up, torch.compile and CUDA-graph capture, so the op is part of every graph. Under pipeline
parallelism only the rank that holds the layer installs anything.
"""

from __future__ import annotations

import logging
from pathlib import Path

from steer_plugin.config import SteerConfig, injected_faults
from steer_plugin.sae import SAE, SAEFileError
from steer_plugin.spec import limits_for
from steer_plugin.worker import metrics
from steer_plugin.worker.clamp_table import ClampTable
from steer_plugin.worker.ops import LayerSteer, SteeredInput, SteeredLayer, register_layer
from steer_plugin.worker.recorder import FeatureRecorder
from steer_plugin.worker.step_layout import StepLayout

logger = logging.getLogger(__name__)


class WorkerSteering:
    """What one worker steers: the clamp table and feature recorder of its SAE layer."""

    def __init__(self, table: ClampTable, recorder: FeatureRecorder, reports_outputs: bool):
        self.table = table
        self.recorder = recorder
        self.reports_outputs = reports_outputs
        """Whether this worker's step outputs reach the scheduler (False on pipeline ranks but the last),
        so that it can fail single requests; elsewhere a failure fails the step, loudly."""

    def on_step(self, layout: StepLayout) -> None:
        """Before each forward: the table and the recorder read the same layout."""
        try:
            self.table.fill(layout)
        except Exception:
            self.table.reset()
            raise
        self.recorder.fill(layout)

    def take_failed(self) -> list[str]:
        """Requests that failed in the steps since the last call, to be finished with an error."""
        failed = self.table.drain_failed()
        if failed:
            metrics.FAILED.inc(len(failed))
            if not self.reports_outputs:
                raise RuntimeError(f"steer_plugin: steering failed for requests {failed} on a pipeline rank "
                                   "that cannot fail single requests")
        return failed

    def pop_features(self, key: str) -> dict | None:
        """One finished request's recorded features, or None if this rank recorded none."""
        return self.recorder.pop(key)


def attach(site, cfg: SteerConfig) -> WorkerSteering | None:
    """site: `vllm_seam.ModelSite` of the loaded model. None when this rank does not hold the layer."""
    if not Path(cfg.sae_path).exists():
        raise SAEFileError(f"steer_plugin: SAE not found: {cfg.sae_path}")
    sae = SAE.load(cfg.sae_path, device=site.device)
    if sae.cfg.d_in != site.hidden_size:
        raise SAEFileError(
            f"steer_plugin: SAE d_in={sae.cfg.d_in} does not match the model's hidden size {site.hidden_size} "
            f"({cfg.sae_path})")
    layer = cfg.layer if cfg.layer is not None else sae.cfg.layer
    if not -1 <= layer < len(site.layers):
        raise SAEFileError(f"steer_plugin: layer {layer} out of range, the model has {len(site.layers)} layers")
    wrapped = max(layer, 0)  # -1, the embeddings: steer the input of layer 0
    if not site.held[wrapped]:
        logger.info("action=skip_install layer=%d reason=held_by_another_pipeline_rank", layer)
        return None
    if isinstance(site.layers[wrapped], (SteeredLayer, SteeredInput)):
        raise RuntimeError(f"steer_plugin: layer {wrapped} is already steered (model loaded twice?)")

    activity = metrics.FeatureActivity(sae.cfg.d_sae, cfg.metrics_sample_every, cfg.metrics_watch, cfg.metrics_top_n)

    def on_new_plan(plan):
        metrics.record_new_plan(plan)
        activity.pin_clamped(plan)

    faults = injected_faults()

    def check_plan(plan):
        if "prepare" in faults and faults["prepare"] in plan.feature:
            raise RuntimeError(f"injected fault: preparing a clamp of feature {faults['prepare']}")

    limits = limits_for(cfg)
    table = ClampTable(limits, max_tokens=site.max_num_tokens, max_reqs=site.max_num_reqs, device=site.device,
                       on_new_plan=on_new_plan, on_step=metrics.STEERED_TOKENS.inc, check_plan=check_plan)
    recorder = FeatureRecorder(limits.max_activation)
    key = f"layer{layer}"
    register_layer(key, LayerSteer(sae, table, graph_safe=site.graph_safe, activity=activity, recorder=recorder,
                                   fault_feature=faults.get("apply")))
    metrics.SAE_INFO.labels(sae=Path(cfg.sae_path).name, layer=str(layer), d_sae=str(sae.cfg.d_sae),
                            architecture=sae.cfg.architecture).set(1)
    site.layers[wrapped] = (SteeredLayer if layer >= 0 else SteeredInput)(site.layers[wrapped], key)
    logger.info("action=installed layer=%d sae=%s arch=%s d_sae=%d device=%s graph_safe=%s compile_mode=%s",
                layer, cfg.sae_path, sae.cfg.architecture, sae.cfg.d_sae, site.device, site.graph_safe,
                site.compile_mode)
    return WorkerSteering(table, recorder, site.reports_outputs)
