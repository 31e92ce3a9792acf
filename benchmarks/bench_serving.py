"""Latency and throughput of the steering server against vanilla vLLM, in one run, as ratios.

Servers (same model, flags and vLLM; all started first, then driven in turn, so an idle one costs
nothing while another is measured):
    vanilla        vLLM with the plugin disabled (STEER_PLUGIN_DISABLE=1)
    plugin         the plugin loaded, feature metrics off
    plugin+metrics the plugin with feature metrics on every step
Workloads on the plugin servers: none steered, all steered with one shared clamp set, all steered
with a distinct clamp set each, half steered. Each (server, workload) cell is driven over HTTP
with the openai async client at each concurrency, fixed prompts, fixed output length (ignore_eos),
streaming (TTFT = first content chunk; TPOT = (last - first) / (tokens - 1)).
Repetitions are interleaved: rep 1 runs every cell, then rep 2 every cell, ... so drift cancels.
A transformers `generate` baseline with a forward hook applying the same SAE and clamps (what
SAELens / nnsight users do) runs last, batched, same prompts and lengths.

    python benchmarks/bench_serving.py --quick              # seconds-scale smoke run (CI)
    python benchmarks/bench_serving.py --out benchmarks/results   # the full run README quotes
Outputs: results.json, results.md, ratios.png in --out; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import openai

from steer_plugin.config import DEFAULT_SAE_DIR, default_model_dir
from steer_plugin.server_process import Server

PROMPTS = [
    "Tell me about your weekend.", "What is your favourite book?", "Describe a good breakfast.",
    "How do I learn to play chess?", "Write a short poem about autumn.", "Explain how rain forms.",
    "What makes a good friend?", "Give me three tips for a job interview.",
]
WORKLOADS = ("none", "shared", "distinct", "half")


@dataclass
class Cell:
    server: str
    workload: str
    concurrency: int
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    tok_per_s: list[float] = field(default_factory=list)  # one per repetition


def clamps_for(workload: str, i: int, d_sae: int) -> list[dict] | None:
    if workload == "none" or (workload == "half" and i % 2):
        return None
    if workload == "distinct":
        return [{"feature": (97 * i + 13) % d_sae, "value": 4.0, "unit": "max"},
                {"feature": (31 * i + 5) % d_sae, "value": 0.0}]
    return [{"feature": 13, "value": 4.0, "unit": "max"}, {"feature": 5, "value": 0.0}]


async def one_request(client, model: str, prompt: str, clamps, max_tokens: int):
    extra = {"ignore_eos": True, **({"feature_clamps": clamps} if clamps else {})}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first - start, (last - first) / max(1, tokens - 1), tokens


async def drive(base_url: str, model: str, workload: str, concurrency: int, requests: int, max_tokens: int,
                d_sae: int, cell: Cell) -> None:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=600)
    queue = list(range(requests))

    async def worker():
        results = []
        while queue:
            i = queue.pop(0)
            results.append(await one_request(client, model, PROMPTS[i % len(PROMPTS)],
                                             clamps_for(workload, i, d_sae), max_tokens))
        return results

    start = time.perf_counter()
    results = [r for batch in await asyncio.gather(*(worker() for _ in range(concurrency))) for r in batch]
    wall = time.perf_counter() - start
    cell.ttft += [r[0] for r in results]
    cell.tpot += [r[1] for r in results]
    cell.tok_per_s.append(sum(r[2] for r in results) / wall)
    await client.close()


def op_profile(base_url: str) -> dict | None:
    """Host wall time of the steering op on a plugin server, from its own /metrics (steer_op_seconds)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name: s.value for fam in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text)
               for s in fam.samples if s.name.startswith("steer_op_seconds_")}
    calls = samples.get("steer_op_seconds_count", 0)
    return {"op_calls": int(calls), "op_seconds_mean": samples["steer_op_seconds_sum"] / calls} if calls else None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def hf_baseline(sae_dir: str, max_tokens: int, batch: int, requests: int) -> dict:
    """transformers generate + forward hook (SAE encode -> clamp -> decode, error term kept)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steer_plugin.sae import SAE, load_max_activations

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir()), dtype=torch.float32).eval()
    sae = SAE.load(sae_dir)
    max_act = load_max_activations(sae_dir)
    features = torch.tensor([13, 5])
    values = torch.tensor([4.0 * float(max_act[13]) if max_act is not None else 4.0, 0.0])

    def hook(_m, _i, output):
        hidden = output[0] if isinstance(output, tuple) else output  # [B, T, d]
        flat = hidden.reshape(-1, hidden.shape[-1])
        f, norm = sae.encode(flat)
        df = torch.zeros_like(f)
        df[:, features] = values - f[:, features]
        steered = (flat + (df @ sae.W_dec) * norm.scale).reshape(hidden.shape)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    model.model.layers[sae.cfg.layer].register_forward_hook(hook)
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                     add_generation_prompt=True) for i in range(requests)]
    produced = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, requests, batch):
            enc = tok(texts[s:s + batch], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            produced += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    wall = time.perf_counter() - start
    return {"batch": batch, "requests": requests, "tok_per_s": produced / wall}


def write_outputs(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Run {report['date']} on {report['machine']}, vLLM {report['vllm']}, mode {report['mode']}, "
             f"{report['reps']} interleaved repetitions, {report['max_tokens']} output tokens.", "",
             "| server | workload | conc | tok/s | ×vanilla | TTFT p50 ms | p95 | ×vanilla p50 | TPOT p50 ms | p95 | ×vanilla p50 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['server']} | {row['workload']} | {row['concurrency']} | {row['tok_per_s']:.1f} | "
                     f"{row['tok_per_s_ratio']:.3f} | {row['ttft_p50'] * 1e3:.0f} | {row['ttft_p95'] * 1e3:.0f} | "
                     f"{row['ttft_p50_ratio']:.3f} | {row['tpot_p50'] * 1e3:.1f} | {row['tpot_p95'] * 1e3:.1f} | "
                     f"{row['tpot_p50_ratio']:.3f} |")
    for hf in report.get("hf_baseline", []):
        lines += ["", f"transformers generate + SAE hook (batch {hf['batch']}): {hf['tok_per_s']:.1f} tok/s = "
                      f"{hf['ratio_to_plugin_shared']:.3f}× the plugin server's steered throughput at "
                      f"concurrency {hf['batch']}."]
    for name, prof in report.get("op_profile", {}).items():
        if prof:
            lines += ["", f"{name}: the steering op took {prof['op_seconds_mean'] * 1e3:.2f} ms per forward step "
                          f"on average over {prof['op_calls']} steps (host wall time, steer_op_seconds)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["server"] != "vanilla"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [f"{r['server']}\n{r['workload']} c{r['concurrency']}" for r in rows]
    ax.bar(range(len(rows)), [r["tok_per_s_ratio"] for r in rows], color="tab:blue", label="output tok/s")
    ax.plot(range(len(rows)), [r["ttft_p50_ratio"] for r in rows], "o", color="tab:red", label="TTFT p50")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("ratio to vanilla vLLM")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=120)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny run to prove the script works (no timing claims)")
    p.add_argument("--sae", default=str(DEFAULT_SAE_DIR))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--mode", choices=("compiled", "eager"), default="compiled")
    p.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size (2 needs VLLM_CPU_OMP_THREADS_BIND)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--no-metrics-server", action="store_true", help="skip the plugin+metrics server (shorter runs)")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.max_tokens, args.concurrency, args.mode = 1, 8, "1,4", "eager"
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    from steer_plugin.sae import load_config

    d_sae = load_config(args.sae).d_sae

    common = ["--sae", args.sae, "--kv-cache-gib", "1"] + (["--enforce-eager"] if args.mode == "eager" else [])
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if args.pp > 1 else {}
    passthrough = ["--", "--pipeline-parallel-size", str(args.pp)] if args.pp > 1 else []
    specs = {"vanilla": ["--no-plugin"], "plugin": ["--metrics-sample-every", "0"],
             "plugin+metrics": ["--metrics-sample-every", "1"]}
    plan = [("vanilla", "none")] + [("plugin", w) for w in WORKLOADS] + [("plugin+metrics", "none"),
                                                                         ("plugin+metrics", "distinct")]
    if args.quick:
        plan = [("vanilla", "none"), ("plugin", "none"), ("plugin", "distinct"), ("plugin+metrics", "half")]
    if args.no_metrics_server:
        plan = [(s, w) for s, w in plan if s != "plugin+metrics"]
    servers: dict[str, Server] = {}
    try:
        for name in dict.fromkeys(s for s, _ in plan):  # one at a time: start-up is CPU-heavy
            servers[name] = Server(common + specs[name] + passthrough, args.out / f"server-{name}.log",
                                   env=env).wait_ready()
        cells = {(s, w, c): Cell(s, w, c) for s, w in plan for c in concurrencies}
        for _rep in range(args.reps):
            for c in concurrencies:
                for s, w in plan:
                    requests = max(2 * c, 4)
                    asyncio.run(drive(servers[s].base_url, "SmolLM2-135M-Instruct", w, c, requests,
                                      args.max_tokens, d_sae, cells[(s, w, c)]))
        profiles = {name: op_profile(srv.base_url) for name, srv in servers.items() if name != "vanilla"}
    finally:
        for srv in servers.values():
            srv.stop()

    rows = []
    for (s, w, c), cell in cells.items():
        base = cells[("vanilla", "none", c)]
        row = {"server": s, "workload": w, "concurrency": c,
               "tok_per_s": statistics.mean(cell.tok_per_s),
               "ttft_p50": pct(cell.ttft, 0.5), "ttft_p95": pct(cell.ttft, 0.95),
               "tpot_p50": pct(cell.tpot, 0.5), "tpot_p95": pct(cell.tpot, 0.95)}
        row["tok_per_s_ratio"] = row["tok_per_s"] / statistics.mean(base.tok_per_s)
        row["ttft_p50_ratio"] = row["ttft_p50"] / pct(base.ttft, 0.5)
        row["tpot_p50_ratio"] = row["tpot_p50"] / pct(base.tpot, 0.5)
        rows.append(row)
    import vllm

    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {platform.processor() or ''}"
              f" {__import__('os').cpu_count()} cores".strip(), "vllm": vllm.__version__, "mode": args.mode,
              "pp": args.pp, "reps": args.reps, "max_tokens": args.max_tokens, "quick": args.quick, "rows": rows,
              "op_profile": profiles}
    if not args.no_hf:
        report["hf_baseline"] = []
        for batch in [c for c in concurrencies if c > 1]:  # transformers batches; same sizes as the servers
            hf = hf_baseline(args.sae, args.max_tokens, batch, requests=2 * batch)
            ref = next(r for r in rows if r["server"] == "plugin" and r["workload"] in ("shared", "distinct")
                       and r["concurrency"] == batch)
            hf["ratio_to_plugin_shared"] = hf["tok_per_s"] / ref["tok_per_s"]
            report["hf_baseline"].append(hf)
    write_outputs(args.out, report)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
