"""What the steering op costs per forward step on a CUDA GPU, beside the decoder layers it sits among.

vLLM on a GPU replays CUDA graphs for most steps, so the op's graph path (every token through the
fixed C-feature slice of `GraphColumns`) is what a step usually pays, steered or not; steps the
graph path cannot serve run eagerly through the host path. This times both, with CUDA events, on an
8B-shaped setup: the stream of Llama-3.1-8B (d_model 4096, bfloat16) and a random 65,536-latent
JumpReLU SAE (TopK for the host path's full encode), for decode-sized and prefill-sized steps.

The reference is the weight matrix products of the model's 32 decoder layers at the same token count
(QKV with 8 KV heads, O, gate/up, down; bfloat16, in one CUDA graph). Attention itself, sampling and
the scheduler are left out, so the reference is a lower bound of a real step and `op / layers` an
upper bound of the op's share. It is an op-level figure, not a serving ratio: that comes from
`bench_serving.py` against vanilla vLLM on the same machine.

    python benchmarks/bench_op_gpu.py --out benchmarks/results/op-gpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from steer_plugin.core.sae import SAE, SAEConfig
from steer_plugin.core.spec import Limits
from steer_plugin.worker.clamp_table import ClampTable
from steer_plugin.worker.ops import LayerSteer, register_sae
from steer_plugin.worker.step_layout import StepLayout

D_MODEL, D_SAE, LAYERS = 4096, 65536, 32
QKV, MLP = 4096 + 2 * 1024, 14336  # Llama-3.1-8B: 32 query heads, 8 KV heads of 128; MLP width
CLAMPS = 4  # per request
MAX_REQS = 256


def random_sae(architecture: str) -> SAE:
    g = torch.Generator(device="cuda").manual_seed(0)
    W_dec = torch.randn(D_SAE, D_MODEL, generator=g, device="cuda") / D_MODEL ** 0.5
    cfg = SAEConfig(architecture=architecture, d_in=D_MODEL, d_sae=D_SAE, hook_name="blocks.16.hook_resid_post",
                    k=64 if architecture == "topk" else None)
    weights = {"W_enc": W_dec.t().contiguous(), "b_enc": torch.zeros(D_SAE, device="cuda"), "W_dec": W_dec,
               "b_dec": torch.zeros(D_MODEL, device="cuda")}
    if architecture == "jumprelu":
        weights["threshold"] = torch.full((D_SAE,), 0.05, device="cuda")
    return SAE(cfg, weights)


def step_layout(tokens: int, steered: bool) -> StepLayout:
    """min(tokens, MAX_REQS) requests sharing the step's tokens; steered: each clamps CLAMPS features
    drawn from 64 (distinct sets, as a mixed batch would)."""
    reqs = min(tokens, MAX_REQS)
    scheduled = np.full(reqs, tokens // reqs)
    rng = np.random.default_rng(tokens)
    # the table keeps each request's parsed clamps while it runs: other steps, other request ids
    ids = [f"{'s' if steered else 'u'}{tokens}-{i}" for i in range(reqs)]
    extra = {rid: {"feature_clamps": [{"feature": int(f), "value": 8.0}
                                      for f in rng.choice(64, CLAMPS, replace=False) * (D_SAE // 64)]}
             for rid in ids} if steered else {}
    # decode-sized steps: one generated position per request; larger: prompt chunks from position 0
    computed = np.full(reqs, 100) if tokens <= MAX_REQS else np.zeros(reqs, dtype=np.int64)
    return StepLayout(ids, scheduled, computed, np.full(reqs, 100 if tokens <= MAX_REQS else 10**6),
                      lambda rid: extra.get(rid))


def elapsed_ms(fn, repeats: int = 50) -> float:
    """Mean wall time of fn on the GPU (CUDA events around `repeats` calls, after warm-up)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def captured(fn) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class Layers:
    """The weight products of LAYERS decoder layers (one layer's weights, reused: each pass still
    streams all of them from memory, as 436 MB do not stay in cache)."""

    def __init__(self):
        def w(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) / shape[0] ** 0.5
        self.qkv, self.o, self.gate_up, self.down = w(D_MODEL, QKV), w(D_MODEL, D_MODEL), w(D_MODEL, 2 * MLP), w(MLP, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, d_model] bfloat16."""
        for _ in range(LAYERS):
            x = x + (x @ self.qkv)[:, :D_MODEL] @ self.o
            gate, up = (x @ self.gate_up).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ self.down
        return x


def op_for(key: str, sae: SAE, graph_safe: bool, max_tokens: int) -> tuple[LayerSteer, ClampTable]:
    limits = Limits.one(d_sae=D_SAE, max_clamps=CLAMPS)
    table = ClampTable(limits, "sae", max_tokens=max_tokens, max_reqs=MAX_REQS, device=torch.device("cuda"))
    op = LayerSteer(sae, table, graph_safe=graph_safe, graph_columns=512)
    register_sae(key, op)
    return op, table


def plan(op: LayerSteer, table: ClampTable, tokens: int, steered: bool) -> None:
    layout = step_layout(tokens, steered)
    table.fill(layout)
    assert table.num_steered_tokens == (layout.num_tokens if steered else 0) and not table.failed
    op.prepare(layout.num_tokens)


def measure(token_counts: list[int]) -> list[dict]:
    max_tokens = max(token_counts)
    jumprelu, topk = random_sae("jumprelu"), random_sae("topk")
    graph_op, graph_table = op_for("bench-graph", jumprelu, True, max_tokens)
    host_op, host_table = op_for("bench-host", jumprelu, False, max_tokens)
    topk_op, topk_table = op_for("bench-topk", topk, False, max_tokens)
    layers = Layers()
    rows = []
    for tokens in token_counts:
        hidden = torch.randn(tokens, D_MODEL, device="cuda", dtype=torch.bfloat16)
        residual = torch.randn(tokens, D_MODEL, device="cuda", dtype=torch.bfloat16) * 4
        x = hidden.clone()
        ref = captured(lambda: layers.forward(x))
        row = {"tokens": tokens, "requests": min(tokens, MAX_REQS), "layers_ms": elapsed_ms(ref.replay, 10)}
        for steered in (False, True):
            plan(graph_op, graph_table, tokens, steered)
            assert not graph_op.host_step
            graph = captured(lambda: torch.ops.steer_plugin.steer(hidden, residual, "bench-graph"))
            row[f"graph_{'steered' if steered else 'unsteered'}_ms"] = elapsed_ms(graph.replay)
        for name, op, table, key in (("host_jumprelu", host_op, host_table, "bench-host"),
                                     ("host_topk", topk_op, topk_table, "bench-topk")):
            plan(op, table, tokens, True)
            row[f"{name}_ms"] = elapsed_ms(lambda: torch.ops.steer_plugin.steer(hidden, residual, key), 20)
        for key in ("graph_steered_ms", "host_jumprelu_ms", "host_topk_ms"):
            row[key.replace("_ms", "_share")] = row[key] / row["layers_ms"]
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    (out / "results.json").write_text(json.dumps({"device": device, "torch": torch.__version__, "d_model": D_MODEL,
                                                  "d_sae": D_SAE, "layers": LAYERS, "clamps_per_request": CLAMPS,
                                                  "graph_columns": 512, "rows": rows}, indent=1))
    lines = [f"# The steering op on {device} (torch {torch.__version__})", "",
             f"Llama-3.1-8B-shaped stream (d_model {D_MODEL}, bfloat16), random JumpReLU/TopK SAE of {D_SAE:,} "
             f"latents, {CLAMPS} clamps per request (graph slice: 512 features). Milliseconds per step "
             "(CUDA events); `share` = op / the weight products of 32 decoder layers (a lower bound of a "
             "model step, so the share is an upper bound). Made by `python benchmarks/bench_op_gpu.py`.", "",
             "| tokens | requests | 32 layers' products | graph path, unsteered | graph path, steered | share |"
             " host path JumpReLU (clamped columns) | share | host path TopK (full encode) | share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['requests']} | {r['layers_ms']:.3f} | {r['graph_unsteered_ms']:.3f} | "
                     f"{r['graph_steered_ms']:.3f} | {r['graph_steered_share']:.1%} | {r['host_jumprelu_ms']:.3f} | "
                     f"{r['host_jumprelu_share']:.1%} | {r['host_topk_ms']:.3f} | {r['host_topk_share']:.1%} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 1024, 4096])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/op-gpu"))
    args = parser.parse_args()
    write(measure(args.tokens), args.out)


if __name__ == "__main__":
    main()
