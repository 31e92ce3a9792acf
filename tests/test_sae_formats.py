"""SAE layouts of other libraries, written by those libraries, read by the plugin and compared
numerically with what those libraries compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sae_factory import write_gemma_scope, written_by
from steer_plugin.core.sae import SAE, SAEFileError, load_config


def test_gemma_scope_params_npz(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_7" / "width_16k" / "average_l0_10"
    p = write_gemma_scope(folder)
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
    write_gemma_scope(tmp_path / "my_sae")
    with pytest.raises(SAEFileError, match="--layer"):
        SAE.load(tmp_path / "my_sae").cfg.layer


@pytest.fixture(scope="module")
def sparsify_dir(tmp_path_factory) -> Path:
    return written_by("fixtures_sparsify.py", tmp_path_factory.mktemp("sparsify"))


@pytest.fixture(scope="module")
def saelens_dir(tmp_path_factory) -> Path:
    return written_by("fixtures_saelens.py", tmp_path_factory.mktemp("saelens"))


@pytest.mark.parametrize("name, architecture, layer", [
    ("standard", "standard", 1), ("jumprelu", "jumprelu", 1), ("topk", "topk", 1), ("standard_norm", "standard", 1),
    ("pre6", "standard", 1)])
def test_saelens_files_match_saelens(saelens_dir, name, architecture, layer):
    """Files SAELens wrote (and, for pre6, the older layout it still reads), against SAELens's own
    encode/decode of the files it loaded back."""
    sae = SAE.load(saelens_dir / name)
    assert (sae.cfg.architecture, sae.cfg.layer) == (architecture, layer)  # jumprelu: blocks.2.hook_resid_pre
    expected = np.load(saelens_dir / name / "expected.npz")
    f, norm = sae.encode(torch.from_numpy(expected["x"]))
    np.testing.assert_allclose(f.numpy(), expected["f"], rtol=1e-5, atol=4e-6)
    np.testing.assert_allclose(sae.decode(f, norm).numpy(), expected["recon"], rtol=1e-5, atol=4e-6)


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
