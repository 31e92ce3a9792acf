"""Run with sae-lens importable (set-up installs it into .fixture-libs/): writes SAEs with SAELens's own
`save_model` into OUT/<name> (standard, JumpReLU, TopK, a normalising one, at layers 1 and 2 of a
d_in-wide model), one cfg.json in the pre-6 layout that SAELens 6 still reads (OUT/pre6), and
SAELens's own encode/decode of a fixed input, loaded back with its own `load_from_disk`, into
OUT/<name>/expected.npz, for tests/test_sae_formats.py and the engine tests."""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

out, d_in = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 32
torch.manual_seed(0)


def meta(layer: int, hook: str = "hook_resid_post") -> SAEMetadata:
    return SAEMetadata(hook_name=f"blocks.{layer}.{hook}", model_name="tiny-test")


built = {
    "standard": StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=128, metadata=meta(1))),
    "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=128, metadata=meta(2, "hook_resid_pre"))),
    "topk": TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=128, k=8, apply_b_dec_to_input=False, metadata=meta(1))),
    "standard_norm": StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=64, normalize_activations="layer_norm",
                                                   metadata=meta(1))),
}
with torch.no_grad():
    for sae in built.values():
        for p in sae.parameters():  # SAELens initialises biases at zero; make every term count
            p.add_(torch.randn_like(p) * 0.2)
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.3)
for name, sae in built.items():
    sae.save_model(out / name)

# The pre-6 layout: top-level hook_point, activation_fn_str, no version, no architecture.
pre6 = out / "pre6"
pre6.mkdir(parents=True, exist_ok=True)
(pre6 / "sae_weights.safetensors").write_bytes((out / "standard" / "sae_weights.safetensors").read_bytes())
(pre6 / "cfg.json").write_text(json.dumps({
    "d_in": d_in, "d_sae": 128, "hook_point": "blocks.1.hook_resid_post", "hook_point_layer": 1,
    "activation_fn_str": "relu", "model_name": "tiny-test", "dtype": "float32", "device": "cpu",
    "normalize_activations": False}))

x = torch.randn(6, d_in) * 3
for folder in [*built, "pre6"]:
    sae = SAE.load_from_disk(str(out / folder))  # as SAELens reads the files back
    with torch.no_grad():
        f = sae.encode(x)
        np.savez(out / folder / "expected.npz", x=x.numpy(), f=f.numpy(), recon=sae.decode(f).numpy())
