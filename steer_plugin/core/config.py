"""Trusted configuration of the plugin. The only module that reads environment variables.

Configuration reaches every vLLM process through `VllmConfig.additional_config["steer"]`
(`--additional-config '{"steer": {...}}'`), which vLLM also hashes into its compile-cache key.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SAE_NAME = "smollm2-135m-instruct-l15"


def _default_sae_dir() -> Path:
    # A checkout (or an editable install) has it in the source tree; a wheel carries the same
    # folder as package data, steer_plugin/sae_weights/ (see pyproject.toml).
    in_tree = REPO_ROOT / "sae_weights" / DEFAULT_SAE_NAME
    return in_tree if in_tree.is_dir() else Path(__file__).resolve().parents[1] / "sae_weights" / DEFAULT_SAE_NAME


DEFAULT_SAE_DIR = _default_sae_dir()
DISABLE_ENV = "STEER_PLUGIN_DISABLE"
"""Set to 1 to make the plugin a no-op (vanilla vLLM with the package installed)."""
ALLOW_ANY_VLLM_ENV = "STEER_PLUGIN_ALLOW_ANY_VLLM"
"""Set to 1 to start on a vLLM version outside the supported range (see `vllm_seam.SUPPORTED_VLLM`)."""


FAULT_ENV = "STEER_PLUGIN_INJECT_FAULT"
"""Testing aid: `prepare:N` and/or `apply:M` (comma-separated) make the worker fail while preparing
the clamps of a request that clamps feature N, or while applying a step's clamps when one clamps
feature M (to show that such a failure fails those requests only)."""


def injected_faults() -> dict[str, int]:
    """The faults FAULT_ENV asks for, as {stage: feature}."""
    faults = {}
    for item in filter(None, (part.strip() for part in os.environ.get(FAULT_ENV, "").split(","))):
        stage, _, feature = item.partition(":")
        if stage not in ("prepare", "apply") or not feature.isdigit():
            raise ValueError(f"{FAULT_ENV}: each item must be 'prepare:N' or 'apply:N', got {item!r}")
        faults[stage] = int(feature)
    return faults


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0", "false", "False")


def plugin_disabled() -> bool:
    return _flag(DISABLE_ENV)


def engine_in_process() -> bool:
    """vLLM runs its engine core (and a single worker) in the frontend's process."""
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1").strip() == "0"


def allow_any_vllm() -> bool:
    return _flag(ALLOW_ANY_VLLM_ENV)


_SAE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class SAESource:
    """One SAE the server loads, and where in the model it reads and writes the residual stream."""

    path: str
    """SAE folder or file; its layout is detected from the files (see `sae_formats`)."""
    id: str = ""
    """Name clamps, feature routes and metrics use for it; default: the folder name."""
    layer: int | None = None
    """Decoder layer whose output the SAE reads; None: taken from the SAE (its hook point or path)."""
    catalogue: str | None = None
    """Folder holding its feature catalogue and concept clamps (`steer-catalogue build` writes one);
    None: the SAE's own folder. Lets an SAE in a read-only, shared cache have a catalogue."""

    @property
    def catalogue_dir(self) -> Path:
        """Where the feature routes read this SAE's catalogue and concept clamps."""
        return Path(self.catalogue if self.catalogue is not None else self.path)

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", Path(self.path).name)
        if not _SAE_ID.match(self.id):
            raise ValueError(f"SAE id {self.id!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        if self.layer is not None and self.layer < -1:
            raise ValueError(f"SAE {self.id}: layer must be >= -1 (-1: the embeddings), got {self.layer}")

    def stream_layer(self, sae_cfg) -> int:
        """The decoder layer whose output the SAE reads (-1: the embeddings); sae_cfg: its `sae.SAEConfig`."""
        return self.layer if self.layer is not None else sae_cfg.layer


@dataclass(frozen=True)
class VectorSource:
    """One steering vector the server loads (`--vector NAME=PATH`): a GGUF control vector in llama.cpp's
    layout or a safetensors file of the same names (see `vectors`)."""

    name: str
    """What requests call it in `steering_vectors`."""
    path: str

    def __post_init__(self) -> None:
        if not _SAE_ID.match(self.name):
            raise ValueError(f"vector {self.name!r}: use letters, digits, '.', '_' or '-' (at most 64)")


VARIANT_SAMPLING = frozenset({"temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
                              "repetition_penalty", "max_tokens", "seed"})
"""Sampling fields a steered variant may default (fields of both completion routes, numbers)."""


@dataclass(frozen=True)
class Variant:
    """A steered variant: one more model id, whose requests are steered as configured, so a client that
    can only pick a model (no extra body fields) can ask for steering (`--variant NAME=FILE`)."""

    name: str
    """Its name; the model id is `<served model name>:<name>` unless `model` gives one."""
    model: str | None = None
    """The model id clients send for it (default `<served model name>:<name>`)."""
    feature_clamps: tuple[dict[str, Any], ...] = ()
    """Clamps in the request contract's form, applied to every request for this id. A request's own
    `feature_clamps` are added after them: a request clamp on a feature of an SAE the variant also
    clamps replaces the variant's; together they count against `max_clamps`."""
    steering_vectors: tuple[dict[str, Any], ...] = ()
    """Vectors in the request contract's form, added to every request for this id; a request's own
    `steering_vectors` come after them, and one naming a vector the variant uses replaces it."""
    sampling: dict[str, float] = field(default_factory=dict)
    """Sampling defaults (see VARIANT_SAMPLING) for requests that do not set the field themselves."""

    def __post_init__(self) -> None:
        if not _SAE_ID.match(self.name):
            raise ValueError(f"variant {self.name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        unknown = sorted(set(self.sampling) - VARIANT_SAMPLING)
        if unknown:
            raise ValueError(f"variant {self.name}: sampling.{unknown[0]} is not a field a variant may set "
                             f"(one of {', '.join(sorted(VARIANT_SAMPLING))})")
        for key, value in self.sampling.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"variant {self.name}: sampling.{key} must be a number, got {value!r}")
        object.__setattr__(self, "feature_clamps", tuple(self.feature_clamps))
        object.__setattr__(self, "steering_vectors", tuple(self.steering_vectors))

    def model_id(self, served: str) -> str:
        return self.model or f"{served}:{self.name}"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Variant":
        name = raw.get("name")
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"variant {name}: unknown key {unknown[0]!r} (a variant has feature_clamps, "
                             "steering_vectors, sampling, model)")
        return cls(**raw)


@dataclass(frozen=True)
class SteerConfig:
    """Which SAEs are served and how the steering op behaves."""

    saes: tuple[SAESource, ...] = (SAESource(str(DEFAULT_SAE_DIR)),)
    """The SAEs, in order: a clamp without `"sae"` acts on the first. SAEs reading the same point of
    the residual stream are applied in this order (each reads the stream the previous one wrote)."""
    max_clamps: int = 32
    """Most clamps one request may carry, over all SAEs; the width of each clamp table."""
    metrics_sample_every: int = 16
    """Feature-activity metrics encode every n-th forward step (0: feature metrics off). Each sampled
    step encodes its tokens (up to 256) through the whole SAE; on every step that costs several per
    cent of throughput (see benchmarks/results/README.md), on every 16th a fraction of one."""
    metrics_watch: tuple[int, ...] = ()
    """Features (of every SAE) whose activity counter is always exported."""
    metrics_top_n: int = 20
    """Also export each SAE's n most frequently active features (bounded label cardinality)."""
    graph_columns: int = 512
    """Under CUDA graphs: how many distinct clamped features of one SAE a step can carry on the graph
    path, which encodes and decodes every token through that many features (cost ~ graph_columns·d_in
    per token, whether or not anything is steered). A step clamping more runs without CUDA graphs."""
    sae_dtype: str = "auto"
    """What the SAEs' encoder and decoder matrices are stored in on the device: "float32", "bfloat16",
    "float16", or "auto": the model's dtype on a GPU when it is 16-bit (half the memory, taken from the
    KV cache otherwise), float32 elsewhere (16-bit matrix products are slow on CPUs). Biases and
    JumpReLU thresholds stay float32, and the op computes in float32 either way."""
    graph_path: bool | None = None
    """Run the op as CUDA graphs need it (fixed shapes, host work between steps) whatever the device.
    None: exactly when vLLM captures CUDA graphs. True on a CPU runs the code graphs replay, step for
    step (how the tests cover it without a GPU)."""
    variants: tuple[Variant, ...] = ()
    """Steered variants: model ids listed in /v1/models whose requests are steered (see `Variant`)."""
    vectors: tuple[VectorSource, ...] = ()
    """Steering vectors requests may add by name (`steering_vectors`), in this order."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Unrecognised keys, kept so the error message can name them."""

    def __post_init__(self) -> None:
        if self.extra:
            raise ValueError(f"unknown steer configuration keys: {sorted(self.extra)}")
        if not self.saes:
            raise ValueError("steer.saes: give at least one SAE")
        ids = [s.id for s in self.saes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"steer.saes: SAE ids must differ, got {ids} (name them: --sae ID=PATH)")
        if not 1 <= self.max_clamps <= 1024:
            raise ValueError(f"steer.max_clamps must be in [1, 1024], got {self.max_clamps}")
        if self.metrics_sample_every < 0:
            raise ValueError("steer.metrics_sample_every must be >= 0")
        if self.metrics_top_n < 0:
            raise ValueError("steer.metrics_top_n must be >= 0")
        if not 1 <= self.graph_columns <= 65536:
            raise ValueError(f"steer.graph_columns must be in [1, 65536], got {self.graph_columns}")
        if self.sae_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"steer.sae_dtype must be auto, float32, bfloat16 or float16, got {self.sae_dtype!r}")
        for key, names in (("variants", [v.name for v in self.variants]), ("vectors", [v.name for v in self.vectors])):
            if len(set(names)) != len(names):
                raise ValueError(f"steer.{key}: names must differ, got {names}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "SteerConfig":
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: raw.pop(k) for k in list(raw) if k not in known}
        if "metrics_watch" in raw:
            raw["metrics_watch"] = tuple(int(i) for i in raw["metrics_watch"])
        if "saes" in raw:
            raw["saes"] = tuple(SAESource(**s) for s in raw["saes"])
        if "variants" in raw:
            raw["variants"] = tuple(Variant.from_dict(v) for v in raw["variants"])
        if "vectors" in raw:
            raw["vectors"] = tuple(VectorSource(**v) for v in raw["vectors"])
        return cls(**raw, extra=extra)

    @classmethod
    def from_vllm(cls, vllm_config: Any) -> "SteerConfig":
        additional = getattr(vllm_config, "additional_config", None) or {}
        return cls.from_dict(additional.get("steer"))

    def to_dict(self) -> dict[str, Any]:
        nested = ("saes", "variants", "vectors")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", *nested)}
        for key in nested:
            out[key] = [asdict(item) for item in getattr(self, key)]
        return out


def default_model_dir() -> Path:
    """Where set-up builds the default model; outside git (STEER_MODEL_DIR overrides)."""
    env = os.environ.get("STEER_MODEL_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "steer_plugin" / "SmolLM2-135M-Instruct"

