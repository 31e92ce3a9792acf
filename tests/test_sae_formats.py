"""SAE layouts of other libraries, written by those libraries, read by the plugin and compared
numerically with what those libraries compute."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from steer_plugin.sae import SAE, SAEFileError, load_config

REPO = Path(__file__).resolve().parent.parent
FIXTURE_LIBS = Path(os.environ.get("STEER_FIXTURE_LIBS", REPO / ".fixture-libs"))
"""eai-sparsify and what it imports, installed apart from the serving venv by setup.sh."""


def _gemma_scope(folder: Path, d_in=32, d_sae=128) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    params = {"W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
              "b_enc": rng.normal(size=d_sae).astype(np.float32) * 0.1,
              "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
              "b_dec": rng.normal(size=d_in).astype(np.float32),
              "threshold": rng.uniform(0, 2, size=d_sae).astype(np.float32)}
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **params)  # Gemma Scope's own files are numpy archives
    return params


def test_gemma_scope_params_npz(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_7" / "width_16k" / "average_l0_10"
    p = _gemma_scope(folder)
    for where in (folder, folder / "params.npz"):
        sae = SAE.load(where)
        assert (sae.cfg.architecture, sae.cfg.layer, sae.cfg.d_in, sae.cfg.d_sae) == ("jumprelu", 7, 32, 128)
        assert load_config(where) == sae.cfg
    x = np.random.default_rng(1).normal(size=(6, 32)).astype(np.float32) * 2
    pre = x @ p["W_enc"] + p["b_enc"]  # Gemma Scope's JumpReLU, written out
    f_ref = pre * (pre > p["threshold"])
    f, norm = sae.encode(torch.from_numpy(x))
    np.testing.assert_allclose(f.numpy(), f_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sae.decode(f, norm).numpy(), f_ref @ p["W_dec"] + p["b_dec"], rtol=1e-5, atol=1e-3)


def test_gemma_scope_without_a_layer_in_its_path_asks_for_the_layer(tmp_path):
    _gemma_scope(tmp_path / "my_sae")
    with pytest.raises(SAEFileError, match="--layer"):
        SAE.load(tmp_path / "my_sae").cfg.layer


@pytest.fixture(scope="module")
def sparsify_dir(tmp_path_factory) -> Path:
    if not (FIXTURE_LIBS / "sparsify").is_dir():
        pytest.fail(f"eai-sparsify is not in {FIXTURE_LIBS}: run setup.sh (or set STEER_FIXTURE_LIBS)")
    out = tmp_path_factory.mktemp("sparsify")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FIXTURE_LIBS), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(Path(__file__).parent / "fixtures_sparsify.py"), str(out)], env=env,
                   check=True, capture_output=True, timeout=300)
    return out


def test_sparsify_layout_matches_sparsify(sparsify_dir):
    sae = SAE.load(sparsify_dir / "layers.3")
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.layer, sae.cfg.d_sae) == ("topk", 8, 3, 256)
    expected = np.load(sparsify_dir / "expected.npz")
    f, norm = sae.encode(torch.from_numpy(expected["x"]))
    dense = np.zeros((5, 256), dtype=np.float32)
    np.put_along_axis(dense, expected["top_indices"], expected["top_acts"], axis=1)
    np.testing.assert_allclose(f.numpy(), dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae.decode(f, norm).numpy(), expected["recon"], rtol=1e-5, atol=1e-4)


def test_sparsify_transcoders_are_refused(sparsify_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "layers.3"
    shutil.copytree(sparsify_dir / "layers.3", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "transcode": True}))
    with pytest.raises(SAEFileError, match="transcode"):
        load_config(folder)
