"""SAE files as other libraries write them, read into the plugin's SAELens-style config and weights.

Detected from the files (never from a name the user gives):
    SAELens      DIR/cfg.json + DIR/sae_weights.safetensors            (`SAE.save_model`)
    sparsify     DIR/cfg.json (num_latents, k) + DIR/sae.safetensors    (`SparseCoder.save_to_disk`);
                 `encoder.weight` [d_sae, d_in], `encoder.bias`, `W_dec`, `b_dec`; a TopK SAE on
                 `x - b_dec`; the folder's name `layers.N` is the hookpoint (output of layer N)
    Gemma Scope  DIR/params.npz or the .npz file itself: `W_enc` [d_in, d_sae], `b_enc`, `W_dec`,
                 `b_dec`, `threshold`; a JumpReLU SAE on the raw stream; the layer is read from a
                 `layer_L/width_W/...` path (otherwise give it in the configuration)
Anything else SAELens can load: load it with SAELens and save it with `save_model` (SAELens layout).
No format here is pickled: `.npz` is read with `allow_pickle=False`.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_PARAMS = "params.npz"


def layout(path: Path) -> str:
    """"saelens", "sparsify" or "gemma_scope"; "" when the files match none of them."""
    if path.is_file():
        return "gemma_scope" if path.suffix == ".npz" else ""
    if (path / GEMMA_SCOPE_PARAMS).is_file():
        return "gemma_scope"
    if (path / SAELENS_CFG).is_file() and (path / SPARSIFY_WEIGHTS).is_file() and not (path / SAELENS_WEIGHTS).is_file():
        return "sparsify"
    if (path / SAELENS_CFG).is_file():
        return "saelens"
    return ""


def _sparsify_hook(path: Path) -> str:
    match = re.fullmatch(r"layers\.(\d+)", path.name)
    return f"blocks.{match.group(1)}.hook_resid_post" if match else ""


def sparsify_config(path: Path) -> dict[str, Any]:
    """A sparsify cfg.json as the SAELens fields `SAEConfig.from_json` reads."""
    raw = json.loads((path / SAELENS_CFG).read_text())
    unsupported = [name for name in ("transcode", "skip_connection") if raw.get(name)]
    if raw.get("activation", "topk") != "topk" or unsupported:
        raise ValueError(f"sparsify SAE {path}: activation {raw.get('activation')!r}"
                         f"{', ' + ', '.join(unsupported) if unsupported else ''} is not an SAE of the residual "
                         "stream the plugin can steer (it reads TopK SAEs without skip connection or transcoding)")
    with safe_open(str(path / SPARSIFY_WEIGHTS), "np") as f:
        d_sae, d_in = f.get_slice("encoder.weight").get_shape()
    return {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": raw["k"], "apply_b_dec_to_input": True,
            "metadata": {"hook_name": _sparsify_hook(path), "model_name": ""}}


def sparsify_weights(path: Path, device: str) -> dict[str, torch.Tensor]:
    w = load_file(str(path / SPARSIFY_WEIGHTS), device=device)
    return {"W_enc": w["encoder.weight"].t(), "b_enc": w["encoder.bias"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}


def _gemma_file(path: Path) -> Path:
    return path if path.is_file() else path / GEMMA_SCOPE_PARAMS


def gemma_scope_config(path: Path) -> dict[str, Any]:
    """Shapes from the .npz header only (the arrays are not read), layer from the folder names."""
    with zipfile.ZipFile(_gemma_file(path)) as archive, archive.open("W_enc.npy") as array:
        version = np.lib.format.read_magic(array)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        d_in, d_sae = read_header(array)[0]
    layer = next((m.group(1) for part in _gemma_file(path).parts if (m := re.fullmatch(r"layer_(\d+)", part))), None)
    return {"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": False,
            "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post" if layer else "", "model_name": ""}}


def gemma_scope_weights(path: Path, device: str) -> dict[str, torch.Tensor]:
    with np.load(_gemma_file(path), allow_pickle=False) as params:
        return {name: torch.from_numpy(np.asarray(params[name], dtype=np.float32)).to(device)
                for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
