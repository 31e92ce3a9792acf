"""The concepts' directions in the residual stream and how an SAE's features align with them.

`concept_directions.safetensors`, next to an SAE, holds per concept the direction that makes the
model talk about it (the one-vs-rest difference of means concepts.py builds) and the layer's median
stream norm. The concept clamps approximate these directions; the strength sweep and the efficacy
run try the features whose decoder rows point most along them; the comparison serves them as
difference-of-means vectors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from steer_plugin.core.sae import SAE

DIRECTIONS_FILENAME = "concept_directions.safetensors"


def save_directions(path: Path, directions: dict[str, torch.Tensor], median_norm: float, layer: int) -> None:
    """Writes the directions by name, keeping those of other concepts already in the file."""
    merged = dict(zip(*load_directions(path)[:2])) if path.is_file() else {}
    merged.update(directions)
    save_file({"directions": torch.stack(list(merged.values())), "median_norm": torch.tensor(median_norm)}, str(path),
              metadata={"concepts": json.dumps(list(merged)), "layer": str(layer)})


def load_directions(path: Path) -> tuple[list[str], torch.Tensor, float]:
    """(concept names, directions [concepts, d], median stream norm) from a directions file."""
    with safe_open(str(path), "pt") as f:
        names = json.loads(f.metadata()["concepts"])
    tensors = load_file(str(path))
    return names, tensors["directions"], float(tensors["median_norm"])


def alignment(sae: SAE, directions: torch.Tensor) -> torch.Tensor:
    """[directions, d_sae]: the cosine between each direction ([directions, d_in]) and each feature's decoder row. A
    clamp moves the stream along its decoder row only; the part of the move off a concept's direction
    (sqrt(1 - cos^2) of it) changes the reply without bringing the concept, so a feature steers to a
    concept fluently only where this is high (docs/reports/layer-scan-2026-12-04.md)."""
    rows = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)  # [d_sae, d_in]
    return (directions / directions.norm(dim=-1, keepdim=True)) @ rows.T


def aligned_features(sae_dir: Path, n: int) -> dict[str, list[int]]:
    """Per concept of the SAE's directions file: the n features whose decoder rows point most along its
    direction, best first ({} where the SAE has no directions file). Search finds the features that
    fire on a concept's word; these are the ones whose clamp moves the stream most towards it."""
    path = sae_dir / DIRECTIONS_FILENAME
    if n <= 0 or not path.is_file():
        return {}
    names, directions, _ = load_directions(path)
    return dict(zip(names, alignment(SAE.load(sae_dir), directions).topk(n, dim=-1).indices.tolist()))
