"""Run with eai-sparsify importable (set-up installs it into .fixture-libs/) as
`fixtures_sparsify.py OUT [D_IN [LAYER]]`: writes a sparsify SAE with sparsify's own `save_to_disk`
into OUT/layers.LAYER (default 64 wide, layer 3), and sparsify's own encode/decode of a fixed input
into OUT/expected.npz, for tests/test_sae_formats.py and the engine tests."""

import sys
from pathlib import Path

import numpy as np
import torch
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.utils import eager_decode

out = Path(sys.argv[1])
d_in = int(sys.argv[2]) if len(sys.argv) > 2 else 64
layer = int(sys.argv[3]) if len(sys.argv) > 3 else 3
torch.manual_seed(0)
sae = SparseCoder(d_in, SparseCoderConfig(num_latents=256, k=8))
with torch.no_grad():
    sae.b_dec.normal_()
    sae.encoder.bias.normal_()
sae.save_to_disk(out / f"layers.{layer}")
x = torch.randn(5, d_in) * 3
with torch.no_grad():
    encoded = sae.encode(x)
    # sparsify's own eager decoder: its default picks a Triton kernel, which has no CPU driver here
    recon = eager_decode(encoded.top_indices, encoded.top_acts, sae.W_dec.mT) + sae.b_dec
np.savez(out / "expected.npz", x=x.numpy(), top_acts=encoded.top_acts.numpy(),
         top_indices=encoded.top_indices.numpy(), recon=recon.numpy())
