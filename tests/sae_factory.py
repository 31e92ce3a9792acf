"""Small random SAEs in SAELens format, for tests (the loader must not care where a file came from)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steer_plugin.core.sae import SAE, SAEConfig, STATS_FILENAME


def make_sae(architecture: str = "topk", d_in: int = 576, d_sae: int = 1024, layer: int = 15,
             seed: int = 0, k: int = 32, normalize: str = "none", apply_b_dec: bool = True) -> SAE:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    weights = {"W_enc": W_dec.t().contiguous() * 0.5, "b_enc": torch.randn(d_sae, generator=g) * 0.1,
               "W_dec": W_dec, "b_dec": torch.randn(d_in, generator=g) * 0.1}
    if architecture == "jumprelu":
        weights["threshold"] = torch.rand(d_sae, generator=g) * 0.5
    cfg = SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, hook_name=f"blocks.{layer}.hook_resid_post",
                    model_name="test", k=k if architecture == "topk" else None, apply_b_dec_to_input=apply_b_dec,
                    normalize_activations=normalize,
                    norm_scaling_factor=0.5 if normalize == "expected_average_only_in" else None)
    return SAE(cfg, weights)


def write_sae(path: Path, with_stats: bool = True, **kwargs) -> Path:
    sae = make_sae(**kwargs)
    sae.save(path)
    if with_stats:
        d_sae = sae.cfg.d_sae
        save_file({"max_activation": torch.full((d_sae,), 4.0), "frequency": torch.full((d_sae,), 0.01),
                   "mean_activation": torch.ones(d_sae)}, str(path / STATS_FILENAME))
    return path


def write_gemma_scope(folder: Path, d_in=32, d_sae=128) -> dict[str, np.ndarray]:
    """A random JumpReLU in Gemma Scope's layout (`params.npz`) in `folder`; returns its arrays."""
    rng = np.random.default_rng(0)
    params = {"W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
              "b_enc": rng.normal(size=d_sae).astype(np.float32) * 0.1,
              "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
              "b_dec": rng.normal(size=d_in).astype(np.float32),
              "threshold": rng.uniform(0, 2, size=d_sae).astype(np.float32)}
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **params)  # Gemma Scope's own files are numpy archives
    return params


FIXTURE_LIBS = Path(os.environ.get("STEER_FIXTURE_LIBS", Path(__file__).resolve().parent.parent / ".fixture-libs"))
"""sae-lens, eai-sparsify and what they import, installed apart from the serving venv by setup.sh."""


def written_by(script: str, out: Path, *args) -> Path:
    """Run a fixture script of tests/ with the other SAE libraries importable; it writes into `out`."""
    if not (FIXTURE_LIBS / "sparsify").is_dir() or not (FIXTURE_LIBS / "sae_lens").is_dir():
        pytest.fail(f"sae-lens / eai-sparsify are not in {FIXTURE_LIBS}: run setup.sh --dev (or set STEER_FIXTURE_LIBS)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FIXTURE_LIBS), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(Path(__file__).parent / script), str(out), *map(str, args)], env=env,
                   check=True, capture_output=True, timeout=300)
    return out


def write_gguf(path, tensors: dict[str, np.ndarray], arch: str = "controlvector"):
    """A file as llama.cpp's control-vector generator writes one (arch, model hint, layer count)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(tensors))
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
