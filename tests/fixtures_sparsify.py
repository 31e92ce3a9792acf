"""Run with eai-sparsify importable (set-up installs it into .fixture-libs/): writes a sparsify SAE
with sparsify's own `save_to_disk` into OUT/layers.3, and sparsify's own encode/decode of a fixed
input into OUT/expected.npz, for tests/test_sae_formats.py."""

import sys
from pathlib import Path

import numpy as np
import torch
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.utils import eager_decode

out = Path(sys.argv[1])
torch.manual_seed(0)
sae = SparseCoder(64, SparseCoderConfig(num_latents=256, k=8))
with torch.no_grad():
    sae.b_dec.normal_()
    sae.encoder.bias.normal_()
sae.save_to_disk(out / "layers.3")
x = torch.randn(5, 64) * 3
with torch.no_grad():
    encoded = sae.encode(x)
    # sparsify's own eager decoder: its default picks a Triton kernel, which has no CPU driver here
    recon = eager_decode(encoded.top_indices, encoded.top_acts, sae.W_dec.mT) + sae.b_dec
np.savez(out / "expected.npz", x=x.numpy(), top_acts=encoded.top_acts.numpy(),
         top_indices=encoded.top_indices.numpy(), recon=recon.numpy())
