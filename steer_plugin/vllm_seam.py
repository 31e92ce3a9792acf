"""The one seam into vLLM: every monkeypatch, every private vLLM attribute the plugin reads or sets,
every vLLM object it changes and every vLLM environment setting it makes live here, each with the
reason and the vLLM function it mirrors. The one exception is `vllm_surface.py`, the read-only
surface the API side reads (no hook, no change). The seam sits on top: it imports the API and the
worker; nothing but the plugin's entry point (`steer_plugin.register`) imports it.

Supported vLLM: `SUPPORTED_VLLM` (checked at start; `STEER_PLUGIN_ALLOW_ANY_VLLM=1` skips the check
for people who want to try another version; the hooks below may then break loudly).

Hooks, by the process that needs them (`install(roles_of_this_load())`):
    frontend (API server, or the process of an offline `vllm.LLM`)
        InputProcessor.process_inputs        admission: every request passes it before the engine
        launchers.app.init_entrypoints_middleware   the HTTP edge middleware, added to vLLM's app
    worker (the process that runs the model; the EngineCore with one worker)
        VllmConfig.compute_hash              salted, so a compiled graph without the op is never reused
        Worker.load_model                    install the op once weights are loaded, before compile
        GPUModelRunner._prepare_inputs       the per-step token layout, before every forward
        GPUModelRunner._determine_batch_execution_and_padding   a step the op's graph path cannot
                                             serve runs without CUDA graphs
        GPUModelRunner._model_forward        after every forward: metrics and recordings
        Worker.execute_model, sample_tokens  requests whose steering failed ride on the step's output
        Worker.steer_pop_features            RPC target for recorded features (collective_rpc)
        Worker.steer_metrics                 RPC target for the worker's metrics (collective_rpc)
        Worker.steer_installed               RPC target: which SAEs the worker steers (checked at start)
    engine (the EngineCore process)
        Scheduler.update_from_output         those requests are finished with an error, not the step

What else of vLLM the plugin touches (docs/guides/upgrading-vllm.md lists the tests):
    every process     VLLM_USE_V2_MODEL_RUNNER defaulted to 0 (`prefer_v1_model_runner`)
    frontend          InputProcessor: the SAE limits cached on it; EngineCoreRequest.cache_salt set;
                      args.middleware read and filtered; app.add_middleware; app.routes read
    worker            the model's decoder-layer ModuleList: SAE layers replaced by their steered
                      wrappers (`_swap_layers`); runner.get_model(), input_batch, requests,
                      max_num_tokens, max_num_reqs read; the worker state set on the runner;
                      failed request ids set on ModelRunnerOutput; PPMissingLayer, PP/TP groups read
    engine            Scheduler.requests, kv_cache_manager (blocks evicted), encoder_cache_mismatch_reqs
    read-only (vllm_surface.py)   app.state.vllm_config, app.state.engine_client, engine_client.renderer's
                      tokenizer, engine_client.engine_core.call_utility_all_async (RPC to every engine),
                      vllm.exceptions.VLLMValidationError, vLLM's `serve` CLI subcommand
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from functools import wraps

import numpy as np
import torch

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = ">=0.32.0,<0.33"
"""vLLM versions whose internals below were read and tested."""
OP_VERSION = "steer_plugin-op-2"
"""Salted into vLLM's config hash: a compiled graph built without (this version of) the op is never reused."""
_STATE_ATTR = "_steer_worker"
"""Set on the model runner at load: the worker-side steering state (`worker.attach.WorkerSteering`)."""
_LIMITS_ATTR = "_steer_limits"
"""Set on an InputProcessor: the SAE limits admission checks against and the server's refusal of
clamps, if any (read once per processor)."""
_installed: set[str] = set()


class UnsupportedVllmError(SystemExit):
    """Raised at start on an unsupported vLLM. A SystemExit on purpose: vLLM catches `Exception` from
    plugins and carries on without them, which would serve `feature_clamps` unsteered."""


def check_vllm_version(installed: str, allow_any: bool) -> None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        ok = Version(installed) in SpecifierSet(SUPPORTED_VLLM)
    except InvalidVersion:
        ok = False
    if ok:
        return
    if allow_any:
        logger.warning("action=version_override vllm=%s supported=%s", installed, SUPPORTED_VLLM)
        return
    raise UnsupportedVllmError(
        f"steer_plugin supports vLLM {SUPPORTED_VLLM}, found vLLM {installed}. Install a supported vLLM, "
        "or set STEER_PLUGIN_ALLOW_ANY_VLLM=1 to try this one at your own risk.")


def installed_vllm_version() -> str:
    from vllm import __version__

    return __version__


_LOADERS = {("vllm.v1.worker.worker_base", "init_worker"): {"worker"},
            ("vllm.v1.engine.core", "__init__"): {"engine", "worker"}}
"""vLLM functions that load general plugins as a worker, or as an engine core (which may hold the
worker in its own process); every other load (building the engine config) is a frontend's."""
FAILED_ATTR = "steer_failed"
"""Set on a ModelRunnerOutput by the worker: ids of requests whose steering failed in the step. The
output is pickled to the engine core with its instance attributes."""


def roles_of_this_load() -> set[str]:
    """Which hooks the current `load_general_plugins` call needs, told by who called it: a process
    loads plugins once as what it is (frontend, engine core, worker), whatever its name."""
    from steer_plugin.core.config import engine_in_process

    frame = sys._getframe(1)
    while frame is not None:
        roles = _LOADERS.get((frame.f_globals.get("__name__"), frame.f_code.co_name))
        if roles is not None:
            return set(roles)
        frame = frame.f_back
    # vLLM loads plugins once per process: with the engine in the frontend's process the engine
    # core's and worker's loads never reach the plugin, so the first load installs their hooks too
    # (else clamps would be silently ignored there).
    return {"frontend", "engine", "worker"} if engine_in_process() else {"frontend"}


def install(roles: set[str]) -> None:
    """Install the hooks of the given roles ("frontend", "worker", "engine"); idempotent per role."""
    for role in sorted(roles - _installed):
        {"frontend": _install_frontend, "worker": _install_worker, "engine": _install_engine}[role]()
        _installed.add(role)
        logger.info("action=hooks_installed role=%s", role)


# ---------------------------------------------------------------------------------------------- frontend

def prefer_v1_model_runner() -> None:
    """The plugin fills its clamp table from the V1 runner; make vLLM pick it unless told otherwise
    (vLLM reads VLLM_USE_V2_MODEL_RUNNER when it builds its config, after plugins load)."""
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


def _prompt_len(request) -> int:
    """Prompt length of an EngineCoreRequest (token ids, or embeddings when the prompt is embeds)."""
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    return int(request.prompt_embeds.shape[0])


def _install_frontend() -> None:
    import vllm.entrypoints.launchers.app as app_module
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from steer_plugin.api import admission
    from steer_plugin.api.middleware import FeatureClampMiddleware
    from steer_plugin.vllm_surface import validation_error
    from steer_plugin.api.routes import log_routes

    original_process = InputProcessor.process_inputs

    # Mirrors InputProcessor.process_inputs (v1/engine/input_processor.py): the one place every
    # request (HTTP, vllm_xargs, offline LLM) passes before reaching the engine core.
    @wraps(original_process)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        extra = params.extra_args if isinstance(params, SamplingParams) else None
        checks = getattr(self, _LIMITS_ATTR, None)
        if checks is None:
            checks = admission.server_checks(self.vllm_config)
            setattr(self, _LIMITS_ATTR, checks)
        limits, refusal = checks
        try:
            admitted = admission.admit(request_id, extra, limits, refusal)
        except admission.AdmissionError as e:
            raise validation_error(str(e), e.field) from None
        request = original_process(self, request_id, prompt, params, *args, **kwargs)
        request.cache_salt = admitted.cache_salt(request.cache_salt, _prompt_len(request))
        admitted.count()
        return request

    original_middleware = app_module.init_entrypoints_middleware

    # Mirrors init_entrypoints_middleware (entrypoints/serve/middleware/register.py), which
    # launchers/app.py imports and calls from build_app once every router is attached. Our
    # middleware is added before vLLM's, which makes it the innermost: vLLM's API-key check runs
    # first and its CORS headers reach our 400s. Named in --middleware too, it would be added
    # outermost; it is taken out of that list so it runs once, in its place.
    @wraps(original_middleware)
    def init_entrypoints_middleware(args, app, *rest, **kwargs):
        name = f"{FeatureClampMiddleware.__module__}.{FeatureClampMiddleware.__name__}"
        args.middleware = [m for m in (getattr(args, "middleware", None) or []) if m != name]
        app.add_middleware(FeatureClampMiddleware)
        log_routes(getattr(route, "path", None) for route in app.routes)
        original_middleware(args, app, *rest, **kwargs)

    InputProcessor.process_inputs = process_inputs
    app_module.init_entrypoints_middleware = init_entrypoints_middleware


# ---------------------------------------------------------------------------------------------- worker

def runs_graph_safe(vllm_config, forced: bool | None = None) -> bool:
    """Whether the op runs under CUDA graphs, whose replays skip Python: then it must not branch on
    host state but in steps run without graphs. forced: `SteerConfig.graph_path` (None: decide)."""
    if forced is not None:
        return forced
    compilation = vllm_config.compilation_config
    return (vllm_config.device_config.device_type == "cuda"
            and str(compilation.cudagraph_mode) not in ("NONE", "CUDAGraphMode.NONE"))


@dataclass(frozen=True)
class ModelSite:
    """What the worker side needs to know of the loaded model, read from vLLM's runner and config."""

    layers: torch.nn.ModuleList
    """The decoder layers; entries may be placeholders of other PP ranks."""
    held: tuple[bool, ...]
    """Per layer: whether this pipeline rank holds it (False for vLLM's PPMissingLayer)."""
    device: torch.device
    dtype: torch.dtype
    """The model's dtype (what vLLM computes the forward pass in)."""
    hidden_size: int
    max_num_tokens: int
    """Most tokens one forward step carries (the clamp table's token dimension)."""
    max_num_reqs: int
    """Most requests one step carries."""
    graph_safe: bool
    """The op runs inside CUDA graphs (see `runs_graph_safe`)."""
    compile_mode: str
    reports_outputs: bool
    """This rank's step outputs reach the scheduler (the last pipeline rank)."""
    exports_metrics: bool
    """This rank exports the worker-side metrics: the first tensor-parallel rank (every TP rank
    steers the same replicated stream; counting on each would multiply the counts)."""


def _decoder_layers(model, num_layers: int) -> torch.nn.ModuleList:
    """The model's decoder layers: the outermost ModuleList with one entry per hidden layer
    (`model.layers` in Llama-like models, `transformer.h` in GPT-2, `model.decoder.layers` in OPT)."""
    for _, module in model.named_modules():  # parents before children
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise RuntimeError(f"steer_plugin: cannot find the {num_layers} decoder layers of {type(model).__name__} "
                       "(no ModuleList of that length); this model cannot be steered")


def _model_site(runner, vllm_config, graph_path: bool | None) -> ModelSite:
    from vllm.distributed import get_pp_group, get_tp_group
    from vllm.model_executor.models.utils import PPMissingLayer

    model = runner.get_model()  # unwraps vLLM's CUDAGraphWrapper
    layers = _decoder_layers(model, vllm_config.model_config.get_total_num_hidden_layers())
    return ModelSite(layers=layers, held=tuple(not isinstance(layer, PPMissingLayer) for layer in layers),
                     device=next(model.parameters()).device, dtype=vllm_config.model_config.dtype,
                     hidden_size=vllm_config.model_config.get_hidden_size(),
                     max_num_tokens=runner.max_num_tokens, max_num_reqs=runner.max_num_reqs,
                     graph_safe=runs_graph_safe(vllm_config, graph_path), compile_mode=str(vllm_config.compilation_config.mode),
                     reports_outputs=get_pp_group().is_last_rank, exports_metrics=get_tp_group().rank_in_group == 0)


def _swap_layers(layers: torch.nn.ModuleList, wrappers: dict[int, torch.nn.Module]) -> None:
    """Put the steered wrappers in place of the decoder layers they wrap, in vLLM's model: before
    warm-up and compilation, so the op is part of every graph vLLM builds."""
    for index, wrapper in wrappers.items():
        layers[index] = wrapper


def _step_layout(runner, num_scheduled_tokens: np.ndarray):
    from steer_plugin.worker.step_layout import StepLayout

    batch = runner.input_batch
    n = batch.num_reqs
    requests = runner.requests

    def extra_args_of(req_id: str) -> dict | None:
        params = requests[req_id].sampling_params
        return params.extra_args if params is not None else None

    return StepLayout(batch.req_ids[:n], num_scheduled_tokens[:n], batch.num_computed_tokens_cpu[:n],
                      batch.num_prompt_tokens[:n], extra_args_of, alive=requests)


def _install_worker() -> None:
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from steer_plugin.core.config import SteerConfig
    from steer_plugin.worker.attach import attach

    original_hash = VllmConfig.compute_hash

    # Mirrors VllmConfig.compute_hash (config/vllm.py), the key of torch.compile's cache.
    @wraps(original_hash)
    def compute_hash(self, *args, **kwargs) -> str:
        base = original_hash(self, *args, **kwargs)
        return hashlib.sha256(f"{base}:{OP_VERSION}".encode()).hexdigest()[: len(base)]

    original_load = Worker.load_model

    # Mirrors Worker.load_model (v1/worker/gpu_worker.py; inherited by the CPU worker, while
    # CPUModelRunner.load_model skips super()): weights are loaded, compile and graph capture not yet.
    @wraps(original_load)
    def load_model(self, *args, **kwargs):
        original_load(self, *args, **kwargs)
        runner = self.model_runner
        if not isinstance(runner, GPUModelRunner):
            # The V2 runner never calls _prepare_inputs: steering would be silently skipped.
            raise RuntimeError(f"steer_plugin supports vLLM's V1 model runner only, got {type(runner).__module__}; "
                               "set VLLM_USE_V2_MODEL_RUNNER=0")
        cfg = SteerConfig.from_vllm(self.vllm_config)
        site = _model_site(runner, self.vllm_config, cfg.graph_path)
        state, wrappers = attach(site, cfg)
        _swap_layers(site.layers, wrappers)
        setattr(runner, _STATE_ATTR, state)

    original_prepare = GPUModelRunner._prepare_inputs

    # Mirrors GPUModelRunner._prepare_inputs (v1/worker/gpu_model_runner.py; inherited by
    # CPUModelRunner): runs once per step after the batch is updated and reordered, with
    # num_scheduled_tokens in input_batch.req_ids order.
    @wraps(original_prepare)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        state = getattr(self, _STATE_ATTR, None)
        if state is not None:
            state.on_step(_step_layout(self, num_scheduled_tokens))
        return original_prepare(self, scheduler_output, num_scheduled_tokens)

    original_dispatch = GPUModelRunner._determine_batch_execution_and_padding

    # Mirrors GPUModelRunner._determine_batch_execution_and_padding (v1/worker/gpu_model_runner.py),
    # called by execute_model right after _prepare_inputs; its force_eager (vLLM's own switch) makes
    # the step run without CUDA graphs, so the op's host path runs when its graph path cannot serve
    # the step (more distinct clamped features than the graph slice holds, or a steered TopK SAE).
    @wraps(original_dispatch)
    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        state = getattr(self, _STATE_ATTR, None)
        if state is not None and state.needs_eager_step:
            kwargs["force_eager"] = True
        return original_dispatch(self, *args, **kwargs)

    original_forward = GPUModelRunner._model_forward

    # Mirrors GPUModelRunner._model_forward (same file; inherited by CPUModelRunner): the forward of
    # a scheduled step (warm-up, profiling and capture use _dummy_run instead), graph replay
    # included. Feature metrics and recordings are read from the op's snapshot once it returns.
    @wraps(original_forward)
    def _model_forward(self, *args, **kwargs):
        output = original_forward(self, *args, **kwargs)
        state = getattr(self, _STATE_ATTR, None)
        if state is not None:
            state.after_forward()
        return output

    def with_failures(original):
        # Mirrors Worker.execute_model / Worker.sample_tokens (v1/worker/gpu_worker.py): whichever
        # returns the step's ModelRunnerOutput carries the requests whose steering failed.
        @wraps(original)
        def run(self, *args, **kwargs):
            output = original(self, *args, **kwargs)
            state = getattr(self.model_runner, _STATE_ATTR, None)
            if state is not None and output is not None:
                _attach_failed(output, state)
            return output
        return run

    # Target of `collective_rpc("steer_pop_features", args=(key,))` from the API process.
    def steer_pop_features(self, key: str) -> dict | None:
        state = getattr(self.model_runner, _STATE_ATTR, None)
        return None if state is None else state.pop_features(key)

    # Target of `collective_rpc("steer_installed")` from the API process at start: the SAEs this
    # worker steers (a worker without the plugin has no such method, and the call fails).
    def steer_installed(self) -> list[str]:
        state = getattr(self.model_runner, _STATE_ATTR, None)
        return [] if state is None else state.sae_ids

    # Target of `collective_rpc("steer_metrics")` from the API process, when /metrics is scraped.
    def steer_metrics(self) -> dict:
        state = getattr(self.model_runner, _STATE_ATTR, None)
        return {} if state is None else state.metrics_snapshot()

    VllmConfig.compute_hash = compute_hash
    Worker.load_model = load_model
    Worker.execute_model = with_failures(Worker.execute_model)
    Worker.sample_tokens = with_failures(Worker.sample_tokens)
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner._determine_batch_execution_and_padding = _determine_batch_execution_and_padding
    GPUModelRunner._model_forward = _model_forward
    Worker.steer_pop_features = steer_pop_features
    Worker.steer_metrics = steer_metrics
    Worker.steer_installed = steer_installed



def _attach_failed(output, state) -> None:
    """Put the failed requests on a ModelRunnerOutput (or on what an AsyncModelRunnerOutput yields)."""
    if hasattr(output, "get_output"):  # async scheduling: the output is resolved later, in this process
        resolve = output.get_output

        def get_output():
            resolved = resolve()
            _attach_failed(resolved, state)
            return resolved

        output.get_output = get_output
    elif hasattr(output, "req_id_to_index"):
        failed = state.take_failed()
        if failed:
            setattr(output, FAILED_ATTR, failed)


# ---------------------------------------------------------------------------------------------- engine

def _install_engine() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    original_update = Scheduler.update_from_output

    # Mirrors Scheduler.update_from_output (v1/core/sched/scheduler.py), which finishes the ids in
    # its private `encoder_cache_mismatch_reqs` with FINISHED_ERROR (the API answers those with an
    # error reply). Before it runs, a failed request's tokens of this step are dropped (they were
    # computed without its clamps) and the KV blocks it holds are evicted from the prefix cache,
    # since they sit under its clamp set's salt.
    @wraps(original_update)
    def update_from_output(self, scheduler_output, model_runner_output):
        failed = getattr(model_runner_output, FAILED_ATTR, None)
        if failed:
            logger.warning("action=fail_requests reqs=%s reason=steering_failed", ",".join(failed))
            for req_id in failed:
                index = model_runner_output.req_id_to_index.get(req_id)
                if index is not None and index < len(model_runner_output.sampled_token_ids):
                    model_runner_output.sampled_token_ids[index] = []
                if req_id in self.requests:
                    blocks = self.kv_cache_manager.get_block_ids(req_id)
                    self.kv_cache_manager.block_pool.evict_blocks({b for group in blocks for b in group})
            self.encoder_cache_mismatch_reqs.update(failed)
        return original_update(self, scheduler_output, model_runner_output)

    Scheduler.update_from_output = update_from_output
