"""Worker side, at model load: load each configured SAE and steering vector onto the model's device,
wrap the decoder layers they read or write with the steering ops, and hand back the state the
per-step hook drives.

Called by `vllm_seam` from vLLM's `Worker.load_model`, after the weights are loaded and before
warm-up, torch.compile and CUDA-graph capture, so the op is part of every graph. Under pipeline
parallelism a rank installs only the SAEs whose layer it holds; under tensor parallelism every
rank holds the whole (replicated) stream and steers it alike, and only the first exports metrics.

SAEs that read the same point of the stream (say `blocks.4.hook_resid_post` and
`blocks.5.hook_resid_pre`) are applied one after the other in configuration order: each reads the
stream as the previous one left it. A layer's steering vectors are added to its output before any
SAE reads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from steer_plugin.core.config import SAESource, SteerConfig, injected_faults
from steer_plugin.core.sae import SAE, STORAGE_DTYPES, SAEFileError
from steer_plugin.core.spec import Limits, limits_for
from steer_plugin.core.vectors import VectorFileError, load_vector
from steer_plugin.worker import metrics
from steer_plugin.worker.clamp_table import ClampTable
from steer_plugin.worker.ops import LayerSteer, LayerVectors, SteeredInput, SteeredLayer, register_sae, register_vectors
from steer_plugin.worker.recorder import FeatureRecorder
from steer_plugin.worker.step_layout import StepLayout
from steer_plugin.worker.vector_table import VectorTable

logger = logging.getLogger(__name__)


@dataclass
class _Installed:
    """One SAE installed on this rank."""

    table: ClampTable
    recorder: FeatureRecorder
    op: LayerSteer


class WorkerSteering:
    """What one worker steers: the clamp table and feature recorder of each SAE it holds, and the vector
    table of the steering vectors at its layers."""

    def __init__(self, saes: list[_Installed], vectors: VectorTable | None, reports_outputs: bool):
        self.saes = saes
        self.vectors = vectors
        self.reports_outputs = reports_outputs
        """Whether this worker's step outputs reach the scheduler (False on pipeline ranks but the last),
        so that it can fail single requests; elsewhere a failure fails the step, loudly."""

    @property
    def _tables(self) -> list:
        """Every per-step table: each SAE's clamp table, then the vector table."""
        return [sae.table for sae in self.saes] + ([self.vectors] if self.vectors is not None else [])

    def on_step(self, layout: StepLayout) -> None:
        """Before each forward: the tables and the recorders read the same layout."""
        try:
            for table in self._tables:
                table.fill(layout)
        except Exception:
            for table in self._tables:
                table.reset()
            raise
        for sae in self.saes:
            sae.recorder.fill(layout)
            sae.op.prepare(layout.num_tokens)

    @property
    def needs_eager_step(self) -> bool:
        """The step must run without CUDA graphs: the graph path of some SAE cannot serve it."""
        return any(sae.op.host_step and sae.op.graph_safe for sae in self.saes)

    def after_forward(self) -> None:
        """After each forward: feature metrics and recordings from the ops' snapshots."""
        for sae in self.saes:
            sae.op.after_forward()

    def take_failed(self) -> list[str]:
        """Requests that failed in the steps since the last call, to be finished with an error."""
        failed = sorted(set().union(*(table.drain_failed() for table in self._tables)))
        if failed:
            metrics.FAILED.labels().inc(len(failed))
            if not self.reports_outputs:
                raise RuntimeError(f"steer_plugin: steering failed for requests {failed} on a pipeline rank "
                                   "that cannot fail single requests")
        return failed

    @property
    def sae_ids(self) -> list[str]:
        return [sae.table.sae_id for sae in self.saes]

    def metrics_snapshot(self) -> dict:
        """This worker's metrics (`worker/metrics.py`), with every sampled step already on the host."""
        for sae in self.saes:
            if sae.op.activity is not None:
                sae.op.activity.export()
        return metrics.snapshot()

    def pop_features(self, key: str) -> dict | None:
        """One finished request's recorded features, or None if this rank recorded none."""
        for sae in self.saes:
            record = sae.recorder.pop(key)
            if record is not None:
                return record
        return None


def storage_dtype(choice: str, site) -> torch.dtype:
    """`SteerConfig.sae_dtype` resolved for this model and device."""
    if choice != "auto":
        return STORAGE_DTYPES[choice]
    sixteen_bit = site.dtype in (torch.bfloat16, torch.float16)
    return site.dtype if site.device.type == "cuda" and sixteen_bit else torch.float32


def _load(site, source: SAESource, dtype: torch.dtype) -> tuple[SAE, int]:
    """The SAE on the model's device and the layer whose output it reads (-1: the embeddings)."""
    if not Path(source.path).exists():
        raise SAEFileError(f"steer_plugin: SAE {source.id} not found: {source.path}")
    sae = SAE.load(source.path, device=site.device, dtype=dtype)
    if sae.cfg.d_in != site.hidden_size:
        raise SAEFileError(f"steer_plugin: SAE {source.id} has d_in={sae.cfg.d_in}, the model's hidden size is "
                           f"{site.hidden_size} ({source.path})")
    layer = source.stream_layer(sae.cfg)
    if not -1 <= layer < len(site.layers):
        raise SAEFileError(f"steer_plugin: SAE {source.id} reads layer {layer}, the model has "
                           f"{len(site.layers)} layers")
    return sae, layer


def _install_one(site, cfg: SteerConfig, limits: Limits, source: SAESource, sae: SAE, layer: int) -> _Installed:
    exporting = site.exports_metrics
    activity = (metrics.FeatureActivity(source.id, sae.cfg.d_sae, cfg.metrics_sample_every, cfg.metrics_watch,
                                        cfg.metrics_top_n) if exporting else None)

    def on_new_plan(plan):
        if exporting:
            metrics.record_new_plan(source.id, plan)
            activity.pin_clamped(plan)

    faults = injected_faults()

    def check_plan(plan):
        if "prepare" in faults and faults["prepare"] in plan.feature:
            raise RuntimeError(f"injected fault: preparing a clamp of feature {faults['prepare']}")

    steered = metrics.STEERED_TOKENS.labels(sae=source.id) if exporting else None
    table = ClampTable(limits, source.id, max_tokens=site.max_num_tokens, max_reqs=site.max_num_reqs,
                       device=site.device, on_new_plan=on_new_plan, on_step=steered.inc if steered else None,
                       check_plan=check_plan)
    recorder = FeatureRecorder(source.id, limits.saes[source.id].max_activation)
    op = LayerSteer(sae, table, graph_safe=site.graph_safe, activity=activity, recorder=recorder,
                    fault_feature=faults.get("apply"), graph_columns=cfg.graph_columns,
                    timer=metrics.OP_SECONDS.labels(sae=source.id) if exporting else None)
    register_sae(source.id, op)
    memory = {"weights": sae.nbytes, "buffers": op.buffer_bytes}
    if exporting:
        metrics.SAE_INFO.labels(sae=source.id, layer=str(layer), d_sae=str(sae.cfg.d_sae),
                                architecture=sae.cfg.architecture).set(1)
        for part, size in memory.items():
            metrics.DEVICE_BYTES.labels(sae=source.id, part=part, device=site.device.type,
                                        dtype=str(sae.dtype).removeprefix("torch.")).set(size)
    logger.info("action=installed sae=%s layer=%d path=%s arch=%s d_sae=%d device=%s dtype=%s graph_safe=%s "
                "compile_mode=%s weights_mib=%.1f buffers_mib=%.1f", source.id, layer, source.path,
                sae.cfg.architecture, sae.cfg.d_sae, site.device, str(sae.dtype).removeprefix("torch."),
                site.graph_safe, site.compile_mode, memory["weights"] / 2**20, memory["buffers"] / 2**20)
    return _Installed(table, recorder, op)


def _install_vectors(site, cfg: SteerConfig, limits: Limits) -> tuple[VectorTable | None, dict[int, str]]:
    """The vector table and, by decoder layer held here, the key of its `LayerVectors`."""
    if not cfg.vectors:
        return None, {}
    loaded = [load_vector(source.name, source.path) for source in cfg.vectors]  # every file checked
    for vector, source in zip(loaded, cfg.vectors):
        if vector.d_model != site.hidden_size:
            raise VectorFileError(f"steer_plugin: vector {vector.name} has size {vector.d_model}, the model's "
                                  f"hidden size is {site.hidden_size} ({source.path})")
        if vector.layers[-1] >= len(site.layers):
            raise VectorFileError(f"steer_plugin: vector {vector.name} has a direction for layer "
                                  f"{vector.layers[-1]}, the model has {len(site.layers)} layers ({source.path})")
    exporting = site.exports_metrics

    def on_new_plan(plan):
        if exporting:
            for position in plan.vector:
                metrics.VECTORS_APPLIED.labels(vector=limits.vectors[position]).inc()

    table = VectorTable(limits, site.max_num_tokens, site.max_num_reqs, site.device, on_new_plan)
    keys = {}
    for layer in sorted(set().union(*(vector.layers for vector in loaded))):
        if not site.held[layer]:
            continue
        directions = torch.zeros(len(loaded), site.hidden_size)  # [V, d_in]
        for i, vector in enumerate(loaded):
            if layer in vector.directions:
                directions[i] = torch.from_numpy(vector.directions[layer])
        keys[layer] = f"vectors@{layer}"
        register_vectors(keys[layer], LayerVectors(directions.to(site.device), table, site.graph_safe))
    logger.info("action=installed_vectors vectors=%s layers=%s", ",".join(limits.vectors),
                ",".join(map(str, keys)))
    return table, keys


def attach(site, cfg: SteerConfig) -> tuple[WorkerSteering | None, dict[int, torch.nn.Module]]:
    """site: `vllm_seam.ModelSite` of the loaded model. Returns the worker's steering state (None when
    this rank holds none of the SAEs' or vectors' layers) and, by decoder-layer index, the steered
    wrapper that replaces that layer (the seam puts them into vLLM's model)."""
    dtype = storage_dtype(cfg.sae_dtype, site)
    loaded = [(source, *_load(site, source, dtype)) for source in cfg.saes]  # every SAE checked, held here or not
    limits = limits_for(cfg)
    installed, keys_at = [], {}  # keys_at: stream point (layer, -1: embeddings) -> SAE ids in order
    for source, sae, layer in loaded:
        if not site.held[max(layer, 0)]:
            logger.info("action=skip_install sae=%s layer=%d reason=held_by_another_pipeline_rank", source.id, layer)
            continue
        installed.append(_install_one(site, cfg, limits, source, sae, layer))
        keys_at.setdefault(layer, []).append(source.id)
    vectors, vector_keys = _install_vectors(site, cfg, limits)
    wrappers: dict[int, torch.nn.Module] = {}
    for layer in sorted(set(keys_at) | set(vector_keys), reverse=True):  # layer 0's output wrapped before its input
        index = max(layer, 0)
        inner = wrappers.get(index, site.layers[index])
        if layer >= 0 and isinstance(inner, (SteeredLayer, SteeredInput)):
            raise RuntimeError(f"steer_plugin: layer {index} is already steered (model loaded twice?)")
        keys = tuple(keys_at.get(layer, ()))
        wrappers[index] = SteeredLayer(inner, keys, vector_keys.get(layer)) if layer >= 0 else SteeredInput(inner, keys)
    steering = WorkerSteering(installed, vectors if vector_keys else None, site.reports_outputs)
    return (steering if installed or vector_keys else None), wrappers
