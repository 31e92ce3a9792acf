"""Worker side: install the steering op at model load, fill the clamp table before each step.

vLLM 0.32 hook points (see ../shared/notes/vllm_internals.md):
- `Worker.load_model` (gpu_worker.py; inherited by the CPU worker) runs after weights load and
  before warm-up, torch.compile and CUDA-graph capture, so the op is part of every graph.
  (`CPUModelRunner.load_model` does not call super(), so the runner's method is not a hook point.)
- V1 `GPUModelRunner._prepare_inputs(scheduler_output, num_scheduled_tokens)` (inherited by
  `CPUModelRunner`) runs once per step after the batch is updated and reordered, with
  `num_scheduled_tokens` in `input_batch.req_ids` order: the table is filled exactly there.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from steer_plugin import metrics
from steer_plugin.clamp_table import ClampTable
from steer_plugin.config import SteerConfig
from steer_plugin.feature_recorder import FeatureRecorder
from steer_plugin.ops import LayerSteer, SteeredLayer, register_layer
from steer_plugin.sae import SAE, SAEFileError, load_config, load_max_activations
from steer_plugin.spec import SAELimits

logger = logging.getLogger(__name__)
_installed = False


def limits_for(cfg: SteerConfig) -> SAELimits:
    """What requests may ask of the configured SAE (also used at admission)."""
    sae_cfg = load_config(cfg.sae_path)
    max_act = load_max_activations(cfg.sae_path)
    return SAELimits(d_sae=sae_cfg.d_sae, max_clamps=cfg.max_clamps,
                     max_activation=None if max_act is None else max_act.numpy())


def runs_graph_safe(vllm_config) -> bool:
    """Whether the op runs under CUDA graphs, whose replays skip Python: then it must not branch on
    host state, and the host-side features (metrics by feature, inspection) are off."""
    compilation = vllm_config.compilation_config
    return (vllm_config.device_config.device_type == "cuda"
            and str(compilation.cudagraph_mode) not in ("NONE", "CUDAGraphMode.NONE"))


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise RuntimeError(f"steer_plugin: cannot find decoder layers (model.model.layers) in {type(model).__name__}")
    return layers


def attach(runner, vllm_config) -> None:
    """Load the SAE onto the runner's device and wrap the configured layer, if this rank holds it."""
    from vllm.model_executor.models.utils import PPMissingLayer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not isinstance(runner, GPUModelRunner):
        # The V2 runner never calls _prepare_inputs: steering would be silently skipped.
        raise RuntimeError(f"steer_plugin supports vLLM's V1 model runner only, got {type(runner).__module__}; "
                           "set VLLM_USE_V2_MODEL_RUNNER=0")
    cfg = SteerConfig.from_vllm(vllm_config)
    if not Path(cfg.sae_path).is_dir():
        raise SAEFileError(f"steer_plugin: SAE directory not found: {cfg.sae_path}")
    model = runner.get_model()
    device = next(model.parameters()).device
    sae = SAE.load(cfg.sae_path, device=device)
    hidden_size = vllm_config.model_config.get_hidden_size()
    if sae.cfg.d_in != hidden_size:
        raise SAEFileError(
            f"steer_plugin: SAE d_in={sae.cfg.d_in} does not match the model's hidden size {hidden_size} "
            f"({cfg.sae_path})")
    layer = cfg.layer if cfg.layer is not None else sae.cfg.layer
    layers = _decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise SAEFileError(f"steer_plugin: layer {layer} out of range, the model has {len(layers)} layers")
    if isinstance(layers[layer], PPMissingLayer):
        logger.info("action=skip_install layer=%d reason=held_by_another_pipeline_rank", layer)
        return
    if isinstance(layers[layer], SteeredLayer):
        return

    graph_safe = runs_graph_safe(vllm_config)
    activity = metrics.FeatureActivity(sae.cfg.d_sae, cfg.metrics_sample_every, cfg.metrics_watch, cfg.metrics_top_n)

    def on_new_plan(plan):
        metrics.record_new_plan(plan)
        activity.pin_clamped(plan)

    limits = limits_for(cfg)
    table = ClampTable(limits, max_tokens=runner.max_num_tokens, max_reqs=runner.max_num_reqs,
                       device=device, on_new_plan=on_new_plan, on_step=metrics.STEERED_TOKENS.inc)
    key = f"layer{layer}"
    recorder = FeatureRecorder(limits.max_activation)
    register_layer(key, LayerSteer(sae, table, graph_safe=graph_safe, activity=activity, recorder=recorder))
    metrics.SAE_INFO.labels(sae=Path(cfg.sae_path).name, layer=str(layer), d_sae=str(sae.cfg.d_sae),
                            architecture=sae.cfg.architecture).set(1)
    layers[layer] = SteeredLayer(layers[layer], key)
    runner._steer_table = table
    runner._steer_recorder = recorder
    logger.info("action=installed layer=%d sae=%s arch=%s d_sae=%d device=%s graph_safe=%s compile_mode=%s",
                layer, cfg.sae_path, sae.cfg.architecture, sae.cfg.d_sae, device, graph_safe,
                vllm_config.compilation_config.mode)


def _fill(runner, num_scheduled_tokens: np.ndarray) -> None:
    table: ClampTable | None = getattr(runner, "_steer_table", None)
    if table is None:
        return
    batch = runner.input_batch
    n = batch.num_reqs
    requests = runner.requests

    def extra_args_of(req_id: str) -> dict | None:
        params = requests[req_id].sampling_params
        return params.extra_args if params is not None else None

    step = (batch.req_ids[:n], num_scheduled_tokens, batch.num_computed_tokens_cpu, batch.num_prompt_tokens,
            extra_args_of)
    try:
        table.fill(*step)
    except Exception:
        table.reset()
        raise
    runner._steer_recorder.fill(*step)


def pop_features(worker, key: str) -> dict | None:
    """RPC target (`collective_rpc("steer_pop_features", args=(key,))`): one request's recorded
    features, from the rank that holds the SAE layer; None elsewhere."""
    recorder: FeatureRecorder | None = getattr(worker.model_runner, "_steer_recorder", None)
    return None if recorder is None else recorder.pop(key)


def install() -> None:
    """Patch the vLLM worker classes (idempotent)."""
    global _installed
    if _installed:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    original_load = Worker.load_model
    original_prepare = GPUModelRunner._prepare_inputs

    def load_model(self, *args, **kwargs):
        original_load(self, *args, **kwargs)
        attach(self.model_runner, self.vllm_config)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        _fill(self, num_scheduled_tokens)
        return original_prepare(self, scheduler_output, num_scheduled_tokens)

    Worker.load_model = load_model
    Worker.steer_pop_features = pop_features
    GPUModelRunner._prepare_inputs = _prepare_inputs
    _installed = True
