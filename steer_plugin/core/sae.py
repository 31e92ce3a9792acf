"""Sparse autoencoders: SAELens' on-disk format (`cfg.json` + `sae_weights.safetensors`), and the
other layouts `sae_formats.py` reads into it.

Math (SAELens semantics, per token):
    x_in   = normalize(x)                                   (see `Normalization`)
    pre    = (x_in - b_dec if apply_b_dec_to_input else x_in) @ W_enc + b_enc
    f      = act(pre)          standard: relu · jumprelu: pre·[pre > threshold] · topk: relu of top k
    x_hat  = denormalize(f @ W_dec + b_dec)

The decoder is linear, so for any architecture decode(f') - decode(f) = ((f' - f) @ W_dec) * scale,
where `scale` is the per-token factor that maps SAE space back to the residual stream. The steering
op relies on exactly this identity.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from steer_plugin.core import sae_formats

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
STATS_FILENAME = "feature_stats.safetensors"
CATALOGUE_FILENAME = "feature_catalogue.json.gz"
"""The catalogue as training writes it: gzip-compressed JSON (a 16k-feature catalogue is 24 MB as plain
JSON, 6 MB compressed). A plain `feature_catalogue.json` (PLAIN_CATALOGUE_FILENAME) is read as well."""
PLAIN_CATALOGUE_FILENAME = "feature_catalogue.json"

Architecture = Literal["standard", "jumprelu", "topk"]
NormMode = Literal["none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"]
_LAYER_NORM_EPS = 1e-5  # SAELens' value for normalize_activations="layer_norm"


class SAEFileError(ValueError):
    """An SAE directory is missing a file or holds something the loader cannot serve."""


@dataclass(frozen=True)
class SAEConfig:
    """The subset of SAELens' cfg.json that serving needs."""

    architecture: Architecture
    """Activation function family; SAELens' `architecture` field."""
    d_in: int
    """Width of the residual stream the SAE reads (must equal the model's hidden size)."""
    d_sae: int
    """Number of features (latents)."""
    hook_name: str
    """TransformerLens hook the SAE was trained on, e.g. `blocks.15.hook_resid_post`."""
    model_name: str = ""
    """Model the SAE was trained on (informational)."""
    k: int | None = None
    """Active features per token for `topk`."""
    apply_b_dec_to_input: bool = False
    """Subtract b_dec from the input before encoding."""
    normalize_activations: NormMode = "none"
    """Input normalisation, as SAELens defines it."""
    norm_scaling_factor: float | None = None
    """Scalar input scale for `expected_average_only_in` (output is divided by it)."""

    def __post_init__(self) -> None:
        if self.architecture not in ("standard", "jumprelu", "topk"):
            raise SAEFileError(
                f"SAE architecture {self.architecture!r} is not supported (standard, jumprelu, topk)"
            )
        if self.architecture == "topk" and not (self.k and 0 < self.k <= self.d_sae):
            raise SAEFileError(f"topk SAE needs 0 < k <= d_sae, got k={self.k}")
        if self.normalize_activations not in ("none", "expected_average_only_in",
                                              "constant_norm_rescale", "layer_norm"):
            raise SAEFileError(f"normalize_activations {self.normalize_activations!r} not supported")
        if self.normalize_activations == "expected_average_only_in" and not self.norm_scaling_factor:
            raise SAEFileError("normalize_activations=expected_average_only_in needs norm_scaling_factor")

    @property
    def layer(self) -> int:
        """The decoder layer whose output is the stream the SAE reads: L for `blocks.L.hook_resid_post`,
        L - 1 for `blocks.L.hook_resid_pre` (the input of layer L is the output of layer L - 1), and -1
        for `blocks.0.hook_resid_pre` (the input of the first layer: the embeddings)."""
        if not self.hook_name:
            raise SAEFileError("the SAE names no hook point: give the layer whose output it reads "
                               "(server.py --layer, or steer.layer in the configuration)")
        parts = self.hook_name.split(".")
        if (len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit()
                or parts[2] not in ("hook_resid_post", "hook_resid_pre")):
            raise SAEFileError(
                f"hook_name {self.hook_name!r}: the plugin reads the residual stream at blocks.<L>.hook_resid_post "
                "(output of layer L) or blocks.<L>.hook_resid_pre (input of layer L); other hook points "
                "(attention or MLP outputs) are not part of the stream between layers"
            )
        return int(parts[1]) - (parts[2] == "hook_resid_pre")

    @classmethod
    def from_json(cls, raw: dict) -> "SAEConfig":
        if _before_saelens_6(raw):
            raw = _saelens_5_defaults(raw)
        meta = raw.get("metadata") or {}
        # SAELens >= 6 keeps hook/model names under "metadata"; older files have them top level.
        hook_name = meta.get("hook_name", raw.get("hook_name", ""))
        model_name = meta.get("model_name", raw.get("model_name", ""))
        if raw.get("rescale_acts_by_decoder_norm"):
            raise SAEFileError("rescale_acts_by_decoder_norm SAEs are not supported; fold the norm first")
        if raw.get("hook_head_index") is not None:
            raise SAEFileError("SAEs on one attention head (hook_head_index) read no residual stream")
        try:
            return cls(
                architecture=raw["architecture"], d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]),
                hook_name=hook_name, model_name=model_name,
                k=int(raw["k"]) if raw.get("k") is not None else None,
                apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", False)),
                normalize_activations=raw.get("normalize_activations") or "none",
                norm_scaling_factor=raw.get("norm_scaling_factor"),
            )
        except KeyError as e:
            raise SAEFileError(f"cfg.json lacks required field {e.args[0]!r}") from None

    def to_json(self) -> dict:
        out = {key: value for key, value in asdict(self).items()
               if key not in ("hook_name", "model_name") and value is not None}
        out["metadata"] = {"hook_name": self.hook_name, "model_name": self.model_name}
        out["dtype"] = "float32"
        return out


def _before_saelens_6(raw: dict) -> bool:
    version = raw.get("sae_lens_version") or (raw.get("metadata") or {}).get("sae_lens_version")
    if not version:
        return True
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(version)) < Version("6.0.0rc0")
    except InvalidVersion:
        return True


def _saelens_5_defaults(raw: dict) -> dict:
    """A cfg.json of SAELens before 6 (or of no stated version) read the way SAELens 6 still reads it:
    older names (`hook_point`, `activation_fn_str`), the defaults of the time (b_dec subtracted from
    the input, a standard ReLU), TopK as an activation with `activation_fn_kwargs.k`, and the old
    boolean `normalize_activations`."""
    renames = {"hook_point": "hook_name", "activation_fn_str": "activation_fn", "hook_point_head_index": "hook_head_index"}
    cfg = {renames.get(key, key): value for key, value in raw.items()}
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("architecture", "standard")
    k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    if cfg.get("activation_fn") == "topk" and k is not None:
        cfg["architecture"], cfg["k"] = "topk", k
    elif cfg.get("activation_fn", "relu") != "relu" and cfg["architecture"] == "standard":
        raise SAEFileError(f"activation_fn {cfg['activation_fn']!r} is not supported (relu, topk)")
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    return cfg


class Normalization(NamedTuple):
    """Per-token affine map from SAE space back to the residual stream: x = x_sae * scale + shift."""

    scale: torch.Tensor  # [tokens, 1]
    shift: torch.Tensor  # [tokens, 1] or [] (zero)


class SAE:
    """An SAE's weights on one device.

    Shapes: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], threshold [d_sae].
    The two matrices are stored in `dtype` (float32, or a GPU model's 16-bit dtype, which halves what
    the SAE takes from the KV cache); biases and thresholds always in float32, and every product comes
    out in float32 (`_affine`), so activations, thresholds and clamps are float32 math throughout.
    """

    def __init__(self, cfg: SAEConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        expect = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,),
                  "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
        if cfg.architecture == "jumprelu":
            if "threshold" not in weights and "log_threshold" in weights:
                weights = {**weights, "threshold": weights["log_threshold"].exp()}
            expect["threshold"] = (cfg.d_sae,)
        scaling = weights.get("scaling_factor")
        if scaling is not None and not torch.all(scaling == 1):
            raise SAEFileError("SAE weights carry a finetuning scaling_factor other than 1; fold it into W_dec "
                               "(SAELens: SAE.fold_activation_norm_scaling_factor / save_model) first")
        for name, shape in expect.items():
            if name not in weights:
                raise SAEFileError(f"SAE weights lack tensor {name!r}")
            if tuple(weights[name].shape) != shape:
                raise SAEFileError(f"SAE tensor {name} has shape {tuple(weights[name].shape)}, cfg says {shape}")
        if dtype not in STORAGE_DTYPES.values():
            raise ValueError(f"SAE storage dtype {dtype} is not one of {sorted(STORAGE_DTYPES)}")
        # JumpReLU thresholds must stay float32 (SAELens#728: bf16 moves them), and so do the biases.
        self.W_enc = weights["W_enc"].to(dtype).contiguous()
        self.b_enc = weights["b_enc"].float().contiguous()
        self.W_dec = weights["W_dec"].to(dtype).contiguous()
        self.b_dec = weights["b_dec"].float().contiguous()
        self.threshold = weights["threshold"].float().contiguous() if "threshold" in expect else None

    # ---- on-disk format -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "SAE":
        """An SAE in any layout `sae_formats` reads (SAELens, sparsify, Gemma Scope), its matrices
        stored in `dtype`."""
        path = Path(path)
        cfg = load_config(path)
        kind = sae_formats.layout(path)
        if kind == "sparsify":
            return cls(cfg, sae_formats.sparsify_weights(path, str(device)), dtype)
        if kind == "gemma_scope":
            return cls(cfg, sae_formats.gemma_scope_weights(path, str(device)), dtype)
        weights_file = path / WEIGHTS_FILENAME
        if not weights_file.is_file():
            raise _layout_error(path, WEIGHTS_FILENAME)
        return cls(cfg, load_file(str(weights_file), device=str(device)), dtype)

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        """Write cfg.json + sae_weights.safetensors; `threshold` is always kept in float32."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CFG_FILENAME).write_text(json.dumps(self.cfg.to_json(), indent=2) + "\n")
        tensors = {name: getattr(self, name).to(dtype).contiguous().cpu()
                   for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold.float().contiguous().cpu()
        save_file(tensors, str(path / WEIGHTS_FILENAME))

    @property
    def nbytes(self) -> int:
        """Bytes its weights take on their device."""
        return tensor_bytes(self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold)

    @property
    def dtype(self) -> torch.dtype:
        """The matrices' storage dtype."""
        return self.W_enc.dtype

    def to(self, device: str | torch.device) -> "SAE":
        names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if self.threshold is not None else [])
        return SAE(self.cfg, {n: getattr(self, n).to(device) for n in names}, self.dtype)

    # ---- math -------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, Normalization]:
        """x: [tokens, d_in] residual stream -> (x_in [tokens, d_in] SAE input, its inverse map)."""
        mode = self.cfg.normalize_activations
        one = x.new_ones(())
        zero = x.new_zeros(())
        if mode == "none":
            return x, Normalization(one, zero)
        if mode == "expected_average_only_in":
            s = self.cfg.norm_scaling_factor
            return x * s, Normalization(one / s, zero)
        if mode == "constant_norm_rescale":
            norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12) / math.sqrt(self.cfg.d_in)  # [tokens, 1]
            return x / norm, Normalization(norm, zero)
        mu = x.mean(dim=-1, keepdim=True)  # layer_norm
        centred = x - mu
        std = centred.std(dim=-1, keepdim=True) + _LAYER_NORM_EPS
        return centred / std, Normalization(std, mu)

    def encode_pre(self, x_in: torch.Tensor) -> torch.Tensor:
        """x_in: [tokens, d_in] normalised input -> pre-activations [tokens, d_sae]."""
        if self.cfg.apply_b_dec_to_input:
            x_in = x_in - self.b_dec
        return _affine(self.b_enc, x_in, self.W_enc)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """pre: [tokens, d_sae] -> feature activations f [tokens, d_sae] (fixed shapes, no host sync)."""
        if self.cfg.architecture == "standard":
            return torch.relu(pre)
        if self.cfg.architecture == "jumprelu":
            return pre * (pre > self.threshold)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)  # [tokens, k]
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

    @property
    def per_feature(self) -> bool:
        """Whether a feature's activation depends on its own pre-activation only (not TopK)."""
        return self.cfg.architecture != "topk"

    def slice(self, columns: torch.Tensor, out: "FeatureSlice | None" = None) -> "FeatureSlice":
        """The encoder columns and decoder rows of `columns` [U] (feature ids), gathered into `out`'s
        buffers when given (the CUDA-graph path keeps one slice of fixed capacity)."""
        if not self.per_feature:
            raise ValueError("TopK activations depend on every feature: encode all of them")
        if out is None:
            return FeatureSlice(self.W_enc.index_select(1, columns), self.b_enc.index_select(0, columns),
                                None if self.threshold is None else self.threshold.index_select(0, columns),
                                self.W_dec.index_select(0, columns))
        torch.index_select(self.W_enc, 1, columns, out=out.W_enc)
        torch.index_select(self.b_enc, 0, columns, out=out.b_enc)
        torch.index_select(self.W_dec, 0, columns, out=out.W_dec)
        if self.threshold is not None:
            torch.index_select(self.threshold, 0, columns, out=out.threshold)
        return out

    def encode_slice(self, x: torch.Tensor, part: "FeatureSlice") -> tuple[torch.Tensor, Normalization]:
        """x: [tokens, d_in] -> (activations of the slice's features [tokens, U], normalisation). Equal
        to `encode(x)[0][:, columns]` for per-feature architectures, at U/d_sae of the cost."""
        x_in, norm = self.normalize(x)
        if self.cfg.apply_b_dec_to_input:
            x_in = x_in - self.b_dec
        pre = _affine(part.b_enc, x_in, part.W_enc)  # [tokens, U]
        if part.threshold is None:
            return torch.relu(pre), norm
        return pre * (pre > part.threshold), norm

    def encode_columns(self, x: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, Normalization]:
        """x: [tokens, d_in], columns: [U] feature ids -> (their activations [tokens, U], normalisation)."""
        return self.encode_slice(x, self.slice(columns))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Normalization]:
        """x: [tokens, d_in] residual stream -> (f [tokens, d_sae], normalisation to undo on decode)."""
        x_in, norm = self.normalize(x)
        return self.activate(self.encode_pre(x_in)), norm

    def decode(self, f: torch.Tensor, norm: Normalization) -> torch.Tensor:
        """f: [tokens, d_sae] -> reconstruction [tokens, d_in] in residual-stream units."""
        return _affine(self.b_dec, f, self.W_dec) * norm.scale + norm.shift


STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes an SAE's matrices may be stored in, by name."""


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [n, a] float32 @ w [a, b] in w's storage dtype -> [n, b] float32. A 16-bit w runs on the
    device's 16-bit kernels (which accumulate in float32); x is rounded to w's dtype for it."""
    return x @ w if w.dtype == x.dtype else (x.to(w.dtype) @ w).float()


def _affine(bias: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bias + x @ w in float32 (one fused addmm when w is float32, as the float32 path always was)."""
    return torch.addmm(bias, x, w) if w.dtype == x.dtype else matmul(x, w) + bias


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes the given tensors take on their devices (None entries count nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class FeatureSlice(NamedTuple):
    """Some features of a per-feature SAE (ReLU, JumpReLU), U of them: W_enc [d_in, U], b_enc [U],
    threshold [U] (None for ReLU), W_dec [U, d_in]."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    threshold: torch.Tensor | None
    W_dec: torch.Tensor

    @classmethod
    def empty(cls, sae: "SAE", size: int) -> "FeatureSlice":
        """A slice of `size` features' room, zero-filled (a buffer for `SAE.slice(..., out=)`), in the
        SAE's dtypes."""
        d_in, device = sae.cfg.d_in, sae.W_enc.device
        return cls(torch.zeros(d_in, size, device=device, dtype=sae.dtype), torch.zeros(size, device=device),
                   None if sae.threshold is None else torch.zeros(size, device=device),
                   torch.zeros(size, d_in, device=device, dtype=sae.dtype))


def _layout_error(path: Path, missing: str) -> SAEFileError:
    """An SAE folder this loader cannot read: say what is there and what is missing."""
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else ([path.name] if path.exists() else [])
    pickles = [name for name in found if name.endswith((".pt", ".pth", ".pkl", ".ckpt"))]
    hint = (f" Pickled weights ({', '.join(pickles)}) are never loaded: they can run code. Load the SAE with its "
            "own library and save it as safetensors (for SAELens: SAE.load_from_pretrained(...).save_model(DIR))."
            if pickles else "")
    return SAEFileError(f"SAE folder {path}: {missing} is missing; found {found or 'nothing'}. Readable layouts: "
                        f"SAELens ({CFG_FILENAME} + {WEIGHTS_FILENAME}), sparsify ({CFG_FILENAME} + "
                        f"{sae_formats.SPARSIFY_WEIGHTS}), Gemma Scope ({sae_formats.GEMMA_SCOPE_PARAMS}).{hint}")


def load_config(path: str | Path) -> SAEConfig:
    """Read only the configuration and shapes, not the weights (cheap: the API process validates
    requests with it)."""
    path = Path(path)
    kind = sae_formats.layout(path)
    try:
        if kind == "sparsify":
            return SAEConfig.from_json(sae_formats.sparsify_config(path))
        if kind == "gemma_scope":
            return SAEConfig.from_json(sae_formats.gemma_scope_config(path))
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
        raise SAEFileError(f"{kind} SAE at {path}: {e}") from None
    cfg_file = path / CFG_FILENAME
    if not cfg_file.is_file():
        raise _layout_error(path, CFG_FILENAME)
    return SAEConfig.from_json(json.loads(cfg_file.read_text()))


def load_max_activations(path: str | Path) -> torch.Tensor | None:
    """Per-feature max activation [d_sae] from feature_stats.safetensors, or None if not shipped."""
    stats_file = Path(path) / STATS_FILENAME
    if not stats_file.is_file():
        return None
    return load_file(str(stats_file))["max_activation"].float()
