"""Steering vectors: named additive directions, one per decoder layer, loaded at start (`--vector`).

Layer convention (llama.cpp's control vectors, which repeng's `export_gguf` also writes): the
tensor `direction.<k>` is added to the output of decoder layer k (0-based; `blocks.k.hook_resid_post`,
transformers' `hidden_states[k + 1]`) at every position the request's `tokens` scope covers.
Files:
- GGUF (`.gguf`), llama.cpp's layout: 1-D float32 tensors `direction.<k>`, k >= 1 (llama.cpp refuses
  k = 0, so the first layer's output is never steered by such a file), all of the model's hidden
  size; a k given twice is summed, as llama.cpp sums it. Metadata is not read (llama.cpp reads none).
- safetensors (`.safetensors`): the same names and meaning, 1-D tensors of any float dtype, k >= 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_NAME = re.compile(r"^direction\.(\d+)$")


class VectorFileError(ValueError):
    """A vector file that cannot be served; the message names the file and what is wrong."""


@dataclass(frozen=True)
class SteeringVector:
    """One loaded vector: its directions by decoder layer."""

    name: str
    directions: dict[int, np.ndarray]
    """Layer -> direction [d_model] float32, added to that layer's output."""

    @property
    def d_model(self) -> int:
        return len(next(iter(self.directions.values())))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.directions))


def load_vector(name: str, path: str | Path) -> SteeringVector:
    """Read a GGUF or safetensors vector file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise VectorFileError(f"steer_plugin: vector {name}: no file at {path}")
    if path.suffix == ".gguf":
        tensors, first_layer = _gguf_tensors(path), 1
    elif path.suffix == ".safetensors":
        tensors, first_layer = _safetensors_tensors(path), 0
    else:
        raise VectorFileError(f"steer_plugin: vector {name}: {path.name} is neither .gguf nor .safetensors")
    directions: dict[int, np.ndarray] = {}
    for tensor_name, data in tensors:
        match = _NAME.match(tensor_name)
        if match is None:
            raise VectorFileError(f"steer_plugin: vector {name}: tensor {tensor_name!r} in {path} is not "
                                  "direction.<layer>")
        layer = int(match.group(1))
        if layer < first_layer:
            raise VectorFileError(f"steer_plugin: vector {name}: {tensor_name} in {path}: a {path.suffix} file's "
                                  f"layers start at {first_layer}")
        if data.ndim != 1:
            raise VectorFileError(f"steer_plugin: vector {name}: {tensor_name} in {path} has shape "
                                  f"{list(data.shape)}, not [hidden size]")
        data = data.astype(np.float32)
        if not np.isfinite(data).all():
            raise VectorFileError(f"steer_plugin: vector {name}: {tensor_name} in {path} is not finite")
        directions[layer] = directions[layer] + data if layer in directions else data
    if not directions:
        raise VectorFileError(f"steer_plugin: vector {name}: no direction.<layer> tensors in {path}")
    if len({len(d) for d in directions.values()}) != 1:
        raise VectorFileError(f"steer_plugin: vector {name}: its directions in {path} differ in size")
    return SteeringVector(name, directions)


def _gguf_tensors(path: Path) -> list[tuple[str, np.ndarray]]:
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises whatever its parser meets
        raise VectorFileError(f"steer_plugin: {path} is not a readable GGUF file ({e})") from None
    out = []
    for tensor in reader.tensors:
        if tensor.tensor_type != GGMLQuantizationType.F32:
            raise VectorFileError(f"steer_plugin: {tensor.name} in {path} is {tensor.tensor_type.name}; control "
                                  "vectors are F32 (llama.cpp's rule)")
        out.append((tensor.name, np.asarray(tensor.data)))
    return out


def _safetensors_tensors(path: Path) -> list[tuple[str, np.ndarray]]:
    import torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise VectorFileError(f"steer_plugin: {path} is not a readable safetensors file ({e})") from None
    out = []
    for tensor_name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise VectorFileError(f"steer_plugin: {tensor_name} in {path} is {tensor.dtype}, not a float tensor")
        out.append((tensor_name, tensor.to(torch.float32).numpy()))
    return out
