"""What steering a step costs in the SAE encode, at realistic width, on this machine's CPU.

For ReLU and JumpReLU SAEs a feature's activation depends only on its own encoder column, so the
eager op encodes only the U features a step clamps (`SAE.encode_columns`) instead of all d_sae
(`SAE.encode`). This times both for a random JumpReLU SAE of a Llama-1B-like width (d_in 2048,
16,384 latents) and a few step sizes, and prints one JSON line.

    OMP_NUM_THREADS=2 python benchmarks/bench_op_encode.py
"""

from __future__ import annotations

import json
import time

import torch

from steer_plugin.core.sae import SAE, SAEConfig


def random_jumprelu(d_in: int, d_sae: int) -> SAE:
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5
    cfg = SAEConfig(architecture="jumprelu", d_in=d_in, d_sae=d_sae, hook_name="blocks.8.hook_resid_post")
    return SAE(cfg, {"W_enc": W_dec.t().contiguous(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec,
                     "b_dec": torch.zeros(d_in), "threshold": torch.full((d_sae,), 0.1)})


def per_call_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> dict:
    sae = random_jumprelu(2048, 16384)
    columns = torch.tensor([11, 222, 3333, 14444])  # U = 4 clamped features
    rows = []
    for tokens in (1, 32, 512):
        x = torch.randn(tokens, 2048)
        full = per_call_ms(lambda: sae.encode(x)[0].index_select(1, columns))
        part = per_call_ms(lambda: sae.encode_columns(x, columns))
        rows.append({"steered_tokens": tokens, "full_encode_ms": round(full, 3), "clamped_columns_ms": round(part, 3),
                     "speedup": round(full / part, 1)})
        print(f"{tokens:4d} steered tokens: full encode {full:8.2f} ms, clamped columns only {part:7.3f} ms")
    result = {"d_in": 2048, "d_sae": 16384, "architecture": "jumprelu", "clamped_features": 4,
              "threads": torch.get_num_threads(), "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
