import json
from dataclasses import replace

import pytest
import torch

from sae_factory import make_sae
from steer_plugin.core.sae import SAE, SAEFileError, load_config


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_save_load_roundtrip(tmp_path, arch):
    sae = make_sae(arch, d_in=16, d_sae=32, k=4)
    sae.save(tmp_path)
    loaded = SAE.load(tmp_path)
    assert loaded.cfg == sae.cfg
    x = torch.randn(8, 16)
    f, norm = sae.encode(x)
    g, _ = loaded.encode(x)
    torch.testing.assert_close(f, g)
    assert json.loads((tmp_path / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.15.hook_resid_post"


def test_activations_follow_saelens_definitions():
    x = torch.randn(6, 16)
    for arch in ("standard", "jumprelu", "topk"):
        sae = make_sae(arch, d_in=16, d_sae=32, k=4, apply_b_dec=False)
        pre = x @ sae.W_enc + sae.b_enc
        f, _ = sae.encode(x)
        if arch == "standard":
            torch.testing.assert_close(f, torch.relu(pre))
        elif arch == "jumprelu":
            torch.testing.assert_close(f, pre * (pre > sae.threshold))
        else:
            assert ((f > 0).sum(-1) <= 4).all()
            top = pre.topk(4, dim=-1)
            torch.testing.assert_close(f.gather(-1, top.indices), torch.relu(top.values))


def test_apply_b_dec_to_input_subtracts_b_dec():
    sae = make_sae("standard", d_in=16, d_sae=32, apply_b_dec=True)
    x = torch.randn(3, 16)
    f, _ = sae.encode(x)
    torch.testing.assert_close(f, torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc))


@pytest.mark.parametrize("mode", ["none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"])
def test_normalisation_is_undone_on_decode(mode):
    sae = make_sae("standard", d_in=16, d_sae=32, normalize=mode)
    x = torch.randn(5, 16) * 7 + 3
    x_in, norm = sae.normalize(x)
    torch.testing.assert_close(x_in * norm.scale + norm.shift, x, rtol=1e-5, atol=1e-5)


def test_jumprelu_threshold_stays_float32_on_disk(tmp_path):
    sae = make_sae("jumprelu", d_in=16, d_sae=32)
    sae.save(tmp_path, dtype=torch.bfloat16)
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert tensors["threshold"].dtype == torch.float32 and tensors["W_enc"].dtype == torch.bfloat16
    assert SAE.load(tmp_path).W_enc.dtype == torch.float32


def test_missing_files_and_bad_shapes_say_which(tmp_path):
    with pytest.raises(SAEFileError, match="cfg.json"):
        load_config(tmp_path)
    make_sae("standard", d_in=16, d_sae=32).save(tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(SAEFileError, match="sae_weights.safetensors"):
        SAE.load(tmp_path)
    sae = make_sae("standard", d_in=16, d_sae=32)
    with pytest.raises(SAEFileError, match="W_dec"):
        SAE(sae.cfg, {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec[:, :8], "b_dec": sae.b_dec})


def test_an_unknown_layout_names_what_it_found_and_refuses_pickles(tmp_path):
    torch.save({"W_enc": torch.zeros(2, 2)}, tmp_path / "sae.pt")
    (tmp_path / "config.yaml").write_text("d_sae: 2\n")
    with pytest.raises(SAEFileError) as info:
        load_config(tmp_path)
    message = str(info.value)
    assert "cfg.json is missing" in message and "config.yaml" in message and "sae.pt" in message
    assert "never loaded" in message and "save_model" in message


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
@pytest.mark.parametrize("mode", ["none", "constant_norm_rescale", "layer_norm"])
def test_encoding_only_some_features_equals_the_full_encode(arch, mode):
    """What the op computes for a step's clamped features only (ReLU and JumpReLU)."""
    sae = make_sae(arch, d_in=32, d_sae=256, normalize=mode)
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(3)) * 4
    columns = torch.tensor([5, 0, 255, 17])
    full, norm = sae.encode(x)
    part, part_norm = sae.encode_columns(x, columns)
    torch.testing.assert_close(part, full[:, columns], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part_norm.scale * torch.ones(7, 1), norm.scale * torch.ones(7, 1))


def test_topk_refuses_a_partial_encode():
    with pytest.raises(ValueError, match="TopK"):
        make_sae("topk", d_in=32, d_sae=64, k=4).encode_columns(torch.randn(2, 32), torch.tensor([1]))


@pytest.mark.parametrize("hook, layer", [("blocks.15.hook_resid_post", 15), ("blocks.16.hook_resid_pre", 15),
                                         ("blocks.0.hook_resid_pre", -1), ("blocks.0.hook_resid_post", 0)])
def test_hook_points_name_the_layer_output_the_sae_reads(hook, layer):
    assert replace(make_sae().cfg, hook_name=hook).layer == layer


@pytest.mark.parametrize("hook", ["blocks.3.hook_mlp_out", "blocks.3.attn.hook_z", "layers.3", "blocks.x.hook_resid_pre"])
def test_other_hook_points_are_refused_with_the_reason(hook):
    with pytest.raises(SAEFileError, match="hook_resid_post.*hook_resid_pre"):
        replace(make_sae().cfg, hook_name=hook).layer
