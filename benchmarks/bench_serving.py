"""Throughput and latency of the steering server against vanilla vLLM, in one run, as ratios.

Servers (same model, flags and vLLM; all started first, then driven in turn, so an idle one costs
nothing while another is measured):
    vanilla         vLLM with the plugin disabled (STEER_PLUGIN_DISABLE=1)
    plugin          the plugin as `server.py` starts it (its default feature-metrics setting)
    plugin+metrics  the plugin with feature metrics on every step
    plugin-metrics  the plugin with feature metrics off (what the sampled metrics cost, by difference)
Workloads: none steered, all steered with one shared clamp set, every request with a clamp set of
its own ("distinct"), the same with both clamps conditional ("conditional": one where its feature is
active, one where another feature is above a threshold), every request adding a steering vector
("vector": a random GGUF control vector at the middle layer, the plugin servers started with
`--vector bench=FILE` when this workload runs), half steered, and `return_features` on every request
("features"). Each
(server, workload, concurrency) cell sends `--requests-per-stream` x concurrency streamed requests
(openai async client, fixed prompts, fixed output length with ignore_eos) and reports:
    tok/s          output tokens over the cell's wall time (ramp-up and tail included)
    steady tok/s   output tokens while all streams were busy (from the first moment every stream
                   has its first token to the moment the first stream runs out of work): the
                   server at its capacity, the figure the ratios use
    TTFT, TPOT     p50 / p95 per request (TTFT = first content chunk; TPOT = (last - first) / (n - 1))
Repetitions are interleaved (rep 1 runs every cell, then rep 2, ...), so drift cancels.
`--cross-check` also runs vLLM's own `bench serve` (random prompts, `--extra-body` for one clamp set
on every request) against vanilla and plugin, as an independent harness for the same ratios.

Realistic width without downloads: `--model-config DIR` serves a config.json with random weights
(`--load-format dummy`; the default model's tokenizer is copied beside it), `--random-sae ARCH:D_SAE`
writes a random SAE of that shape at the middle layer.

    python benchmarks/bench_serving.py --quick                          # smoke run (tests)
    python benchmarks/bench_serving.py --run default-model --cross-check   # default model, README figures
    python benchmarks/bench_serving.py --run width-jumprelu --model-config benchmarks/models/llama-1b-shaped \\
        --random-sae jumprelu:16384 --concurrency 8,32
    # a GPU (CUDA graphs on, vLLM's default):
    python benchmarks/bench_serving.py --run gpu-8b --model-config benchmarks/models/llama-3.1-8b-shaped \\
        --random-sae jumprelu:65536 --concurrency 1,8,32,128 --kv-cache-gib 0
Outputs in benchmarks/results/<run>/: results.json (`config`, `summary`, `rows`, `op_profile`),
results.md, ratios.png; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import openai
from tqdm import tqdm

from steer_plugin.core.config import DEFAULT_SAE_DIR, default_model_dir
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness that starts server.py
from server_process import Server, free_port  # noqa: E402

PROMPTS = [
    "Tell me about your weekend.", "What is your favourite book?", "Describe a good breakfast.",
    "How do I learn to play chess?", "Write a short poem about autumn.", "Explain how rain forms.",
    "What makes a good friend?", "Give me three tips for a job interview.",
]
FILLER = ("The committee reviewed the quarterly figures, the staffing plan and the schedule for the new "
          "building, and asked for a shorter summary of each before the next meeting. ")
"""Repeated in front of each prompt for --prompt-words (about 1.1 tokens a word), after a nonce of its
own per request, so long prompts are computed (prefill) rather than served from the prefix cache."""
WORKLOADS = ("none", "shared", "distinct", "conditional", "vector", "half", "features")
SERVED_NAME = "SmolLM2-135M-Instruct"


@dataclass
class Cell:
    server: str
    workload: str
    concurrency: int
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    tok_per_s: list[float] = field(default_factory=list)  # one per repetition
    steady_tok_per_s: list[float] = field(default_factory=list)  # one per repetition
    wall: float = 0.0  # seconds driven, over all repetitions


def clamps_for(workload: str, i: int, d_sae: int, unit: str) -> list[dict] | None:
    if workload in ("none", "features") or (workload == "half" and i % 2):
        return None
    value = 4.0 if unit == "max" else 8.0
    if workload in ("distinct", "conditional"):
        clamps = [{"feature": (97 * i + 13) % d_sae, "value": value, "unit": unit},
                  {"feature": (31 * i + 5) % d_sae, "value": 0.0}]
        if workload == "conditional":
            clamps[0]["when"] = "active"
            clamps[1]["when"] = {"feature": (53 * i + 7) % d_sae, "above": 0.1 if unit == "max" else 0.5}
        return clamps
    return [{"feature": 13, "value": value, "unit": unit}, {"feature": 5, "value": 0.0}]


def vectors_for(workload: str) -> list[dict] | None:
    return [{"vector": "bench", "scale": 4.0}] if workload == "vector" else None


async def one_request(client, prompt: str, clamps, vectors, features: bool, max_tokens: int):
    extra = {"ignore_eos": True, "return_token_ids": True, **({"feature_clamps": clamps} if clamps else {}),
             **({"steering_vectors": vectors} if vectors else {}), **({"return_features": 4} if features else {})}
    start = time.perf_counter()
    stamps = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=extra)
    async for chunk in stream:
        if chunk.choices:
            # one stamp per token (vLLM's return_token_ids): tokens that decode to no text yet, such as
            # the first bytes of a UTF-8 character from a random-weight model, still count
            ids = getattr(chunk.choices[0], "token_ids", None)
            stamps += [time.perf_counter()] * (len(ids) if ids is not None else int(bool(chunk.choices[0].delta.content)))
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    if not stamps:
        raise RuntimeError(f"a request streamed no tokens ({tokens} in its usage)")
    return start, stamps, tokens


def steady_rate(per_worker: list[list[tuple]]) -> float | None:
    """Output tokens per second while every stream was busy: from the moment the last stream got its
    first token to the moment the first stream finished its last request. None if that window is empty."""
    firsts = [results[0][1][0] for results in per_worker if results and results[0][1]]
    lasts = [results[-1][1][-1] for results in per_worker if results and results[-1][1]]
    if len(firsts) < len(per_worker) or not lasts:
        return None
    a, b = max(firsts), min(lasts)
    if b - a <= 0:
        return None
    chunks = sum(a <= t <= b for results in per_worker for _, stamps, _ in results for t in stamps)
    return chunks / (b - a)


async def drive(base_url: str, workload: str, concurrency: int, requests: int, max_tokens: int, d_sae: int,
                unit: str, prompts: list[str], cell: Cell) -> None:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=1800)
    queue = list(range(requests))

    async def worker():
        results = []
        while queue:
            i = queue.pop(0)
            prompt = prompts[i % len(prompts)]
            if prompt.startswith(FILLER):
                prompt = f"Ticket {uuid.uuid4().hex}. {prompt}"
            results.append(await one_request(client, prompt, clamps_for(workload, i, d_sae, unit),
                                             vectors_for(workload), workload == "features", max_tokens))
        return results

    start = time.perf_counter()
    per_worker = await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    results = [r for batch in per_worker for r in batch]
    cell.ttft += [stamps[0] - begin for begin, stamps, _ in results]
    cell.tpot += [(stamps[-1] - stamps[0]) / max(1, n - 1) for _, stamps, n in results]
    produced = sum(n for *_, n in results)
    cell.tok_per_s.append(produced / wall)
    cell.steady_tok_per_s.append(steady_rate(per_worker) or produced / wall)
    cell.wall += wall
    await client.close()


def op_seconds(base_url: str) -> tuple[float, int]:
    """(total seconds, calls) of the steering op on a plugin server, from its /metrics (steer_op_seconds)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total = calls = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text):
        for s in family.samples:
            total += s.value if s.name == "steer_op_seconds_sum" else 0.0
            calls += s.value if s.name == "steer_op_seconds_count" else 0.0
    return total, int(calls)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cross_check(base_url: str, tokenizer: str, concurrency: int, clamps: list[dict] | None, max_tokens: int,
                requests_per_stream: int) -> dict:
    """vLLM's own `bench serve` against one server: random 64-token prompts, `--extra-body` clamps."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = ["--base-url", base_url, "--model", SERVED_NAME, "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", "64", "--random-output-len", str(max_tokens), "--ignore-eos",
            "--num-prompts", str(requests_per_stream * concurrency), "--max-concurrency", str(concurrency),
            "--seed", "0", "--disable-tqdm"]
    if clamps:
        argv += ["--extra-body", json.dumps({"feature_clamps": clamps})]
    result = main(parser.parse_args(argv))
    return {"output_throughput": result["output_throughput"], "median_ttft_ms": result["median_ttft_ms"],
            "median_tpot_ms": result["median_tpot_ms"], "completed": result["completed"]}


def random_sae(spec: str, model_dir: Path, folder: Path) -> None:
    """A random SAE ARCH:D_SAE on the output of the model's middle layer, with a max-activation table, in `folder`."""
    import torch
    from safetensors.torch import save_file

    from steer_plugin.core.sae import SAE, STATS_FILENAME, SAEConfig

    arch, d_sae = spec.split(":")
    d_sae = int(d_sae)
    hf = json.loads((model_dir / "config.json").read_text())
    d_in, layer = hf["hidden_size"], hf["num_hidden_layers"] // 2
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    weights = {"W_enc": W_dec.t().contiguous(), "b_enc": torch.randn(d_sae, generator=g) * 0.01 - 0.05,
               "W_dec": W_dec, "b_dec": torch.zeros(d_in)}
    if arch == "jumprelu":
        weights["threshold"] = torch.full((d_sae,), 0.05)
    cfg = SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, hook_name=f"blocks.{layer}.hook_resid_post",
                    model_name=model_dir.name, k=64 if arch == "topk" else None)
    SAE(cfg, weights).save(folder)
    save_file({"max_activation": torch.ones(d_sae)}, str(folder / STATS_FILENAME))


def random_vector(model_dir: Path, path: Path) -> Path:
    """A random unit GGUF control vector at the output of the model's middle layer, in `path`."""
    import numpy as np

    from steer_workbench.vectors import write_vector

    hf = json.loads((model_dir / "config.json").read_text())
    direction = np.random.default_rng(0).normal(size=hf["hidden_size"]).astype(np.float32)
    write_vector(path, {hf["num_hidden_layers"] // 2: direction / np.linalg.norm(direction)}, "bench")
    return path


def model_from_config(config_dir: Path, out: Path) -> Path:
    """A model folder vLLM can serve with --load-format dummy: the config plus the default tokenizer."""
    folder = out / config_dir.name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_dir / "config.json", folder / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (default_model_dir() / name).exists():
            shutil.copy(default_model_dir() / name, folder / name)
    return folder


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} cores".strip()


SUMMARY_NAMES = {"idle_ratio_min": "idle", "shared_ratio_min": "one clamp set on every request",
                 "distinct_ratio_min": "every request with its own clamp set",
                 "conditional_ratio_min": "every request with its own conditional clamps",
                 "vector_ratio_min": "every request with a steering vector", "half_ratio_min": "half steered",
                 "features_ratio_min": "return_features", "metrics_every_step_ratio_min": "metrics every step",
                 "metrics_off_ratio_min": "idle with feature metrics off"}
"""The summary's figures, as results.md names them."""


def write_outputs(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    cfg, summary = report["config"], report["summary"]
    lines = [f"Run {report['date']} on {cfg['device']}, vLLM {report['vllm']}, {cfg['compile_mode']}, model "
             f"{cfg['model']} ({cfg['load_format']} weights, hidden {cfg['hidden_size']}, {cfg['num_layers']} layers, "
             f"{cfg['dtype']}), SAE {cfg['architecture']} with {cfg['d_sae']} latents; {cfg['reps']} interleaved "
             f"repetitions of {cfg['requests_per_stream']} requests per stream, {cfg['max_tokens']} output tokens, "
             f"prompts of about {cfg['prompt_tokens']} tokens.", "",
             "Summary: " + ", ".join(f"{name} {summary[key]:.3f}×" for key, name in SUMMARY_NAMES.items()
                                     if summary.get(key) is not None)
             + f" vanilla steady output tok/s (lowest over concurrencies {', '.join(map(str, cfg['concurrencies']))}).",
             "", "| server | workload | conc | steady tok/s | per repetition | ×vanilla | tok/s (wall) | TTFT p50 ms | "
             "p95 | ×vanilla p50 | TPOT p50 ms | p95 | ×vanilla p50 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        reps = row["steady_tok_per_s_reps"]
        lines.append(f"| {row['server']} | {row['workload']} | {row['concurrency']} | {row['steady_tok_per_s']:.1f} | "
                     f"{min(reps):.1f}–{max(reps):.1f} | "
                     f"{row['steady_ratio']:.3f} | {row['tok_per_s']:.1f} | {row['ttft_p50'] * 1e3:.0f} | "
                     f"{row['ttft_p95'] * 1e3:.0f} | {row['ttft_p50_ratio']:.3f} | {row['tpot_p50'] * 1e3:.1f} | "
                     f"{row['tpot_p95'] * 1e3:.1f} | {row['tpot_p50_ratio']:.3f} |")
    for name, prof in report["op_profile"].items():
        if prof:
            lines += ["", f"{name}: the steering op took {prof['op_ms_per_call']:.2f} ms per forward step "
                          f"({prof['op_calls']} steps), {100 * prof['op_share']:.1f} % of the time the server was "
                          "driven (host wall time, steer_op_seconds)."]
    if report.get("cross_check"):
        lines += ["", "vLLM `bench serve` (random 64-token prompts, one clamp set on every request via --extra-body):",
                  "", "| conc | server | workload | output tok/s | ×vanilla | TTFT p50 ms | TPOT p50 ms |",
                  "|---|---|---|---|---|---|---|"]
        for row in report["cross_check"]:
            lines.append(f"| {row['concurrency']} | {row['server']} | {row['workload']} | {row['output_throughput']:.1f} "
                         f"| {row['ratio']:.3f} | {row['median_ttft_ms']:.0f} | {row['median_tpot_ms']:.1f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["server"] != "vanilla"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [f"{r['server']}\n{r['workload']} c{r['concurrency']}" for r in rows]
    ax.bar(range(len(rows)), [r["steady_ratio"] for r in rows], color="tab:blue", label="steady output tok/s")
    ax.plot(range(len(rows)), [r["ttft_p50_ratio"] for r in rows], "o", color="tab:red", label="TTFT p50")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("ratio to vanilla vLLM")
    ax.set_title(f"{report['config']['model']} · SAE {report['config']['architecture']} {report['config']['d_sae']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=120)


def build_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny run to prove the script works (no timing claims)")
    p.add_argument("--run", default="latest", help="results go to benchmarks/results/<run>/")
    p.add_argument("--out", type=Path, default=None, help="results folder (overrides --run)")
    p.add_argument("--sae", default=str(DEFAULT_SAE_DIR))
    p.add_argument("--random-sae", default=None, metavar="ARCH:D_SAE", help="serve a random SAE of this shape")
    p.add_argument("--model-config", type=Path, default=None,
                   help="a folder with config.json, served with random weights (--load-format dummy)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--requests-per-stream", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=0, help="filler words before each prompt (long prompts)")
    p.add_argument("--concurrency", default="8,32")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--servers", default="vanilla,plugin,plugin+metrics")
    p.add_argument("--mode", choices=("compiled", "eager"), default="compiled")
    p.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size (2 needs VLLM_CPU_OMP_THREADS_BIND)")
    p.add_argument("--dp", type=int, default=1, help="data_parallel_size (vLLM's internal load balancer, one node)")
    p.add_argument("--nodes", type=int, choices=(1, 2), default=1,
                   help="2: each server's engine over two node processes (--nnodes 2, the second --headless; "
                        "with --pp 2, one core each)")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="per server, on CPU (0: vLLM's own choice)")
    p.add_argument("--cross-check", action="store_true", help="also run vLLM's bench serve on vanilla and plugin")
    p.add_argument("--dry-run", action="store_true", help="print the servers' command lines and the plan, start nothing")
    args = p.parse_args(argv)
    if args.nodes == 2 and args.pp != 2:
        p.error("--nodes 2 splits each engine's pipeline over the two nodes: give --pp 2")
    if args.quick:
        args.reps, args.max_tokens, args.concurrency, args.mode, args.requests_per_stream = 1, 8, "1,4", "eager", 2
        args.workloads = "none,distinct,features"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = build_args(argv)
    out = args.out or Path("benchmarks/results") / args.run
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    workloads = args.workloads.split(",")
    server_names = args.servers.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="steer_bench_"))
    model_dir = model_from_config(args.model_config, scratch) if args.model_config else default_model_dir()
    sae = scratch / f"random-{args.random_sae.replace(':', '-')}" if args.random_sae else Path(args.sae)
    common = ["--sae", str(sae), "--kv-cache-gib", str(args.kv_cache_gib)]
    if args.model_config:
        common = ["--model", str(model_dir), "--served-model-name", SERVED_NAME, "--max-model-len", "4096", *common]
    common += ["--enforce-eager"] if args.mode == "eager" else []
    if "vector" in workloads:
        common += ["--vector", f"bench={random_vector(model_dir, scratch / 'bench.gguf')}"]
    vllm_opts = ["--pipeline-parallel-size", str(args.pp)] if args.pp > 1 else []
    vllm_opts += ["--data-parallel-size", str(args.dp)] if args.dp > 1 else []
    vllm_opts += ["--load-format", "dummy"] if args.model_config else []
    node_opts = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--distributed-executor-backend", "mp"]
    # Per node process: the cores its workers bind to (one node: "0|1" splits them over its PP ranks).
    binds = ["0|1"] if args.nodes == 1 else ["0", "1"]
    specs = {"vanilla": ["--no-plugin"], "plugin": [], "plugin+metrics": ["--metrics-sample-every", "1"],
             "plugin-metrics": ["--metrics-sample-every", "0"]}

    def node_args(name: str, rank: int, master_port: int) -> list[str]:
        """server.py's arguments for one server's node process `rank` (the head is rank 0)."""
        if args.nodes == 1:
            return [*common, *specs[name], *(["--", *vllm_opts] if vllm_opts else [])]
        nodes = [*node_opts, "--master-port", str(master_port), "--node-rank", str(rank)]
        return [*common, *specs[name], "--", *vllm_opts, *nodes, *(["--headless"] if rank else [])]

    plan = [("vanilla", "none")] if "vanilla" in server_names else []
    plan += [("plugin", w) for w in workloads if "plugin" in server_names]
    plan += [(name, w) for name in ("plugin+metrics", "plugin-metrics") for w in ("none", "distinct")
             if name in server_names and w in workloads]
    if args.dry_run:
        commands = {name: [node_args(name, rank, 0) for rank in range(args.nodes)] for name, _ in plan}
        for name, nodes in commands.items():
            for argv in nodes:
                print(name, " ".join(["server.py", *argv]))
        print("plan:", plan, "concurrencies:", concurrencies)
        shutil.rmtree(scratch, ignore_errors=True)
        return {"plan": plan, "servers": commands}
    if args.random_sae:
        random_sae(args.random_sae, model_dir, sae)
    from steer_plugin.core.sae import load_config, load_max_activations

    sae_cfg = load_config(sae)
    unit = "max" if load_max_activations(sae) is not None else "absolute"
    hf = json.loads((model_dir / "config.json").read_text())
    prompts = [FILLER * (args.prompt_words // len(FILLER.split())) + p for p in PROMPTS]

    servers: dict[str, Server] = {}
    headless: list[Server] = []  # second node processes (no HTTP)
    try:
        for name in dict.fromkeys(s for s, _ in plan):  # one at a time: start-up is CPU-heavy
            port = free_port()
            for rank in range(args.nodes - 1, 0, -1):
                headless.append(Server(node_args(name, rank, port), out / f"server-{name}-node{rank}.log",
                                       env={"VLLM_CPU_OMP_THREADS_BIND": binds[rank]}))
            servers[name] = Server(node_args(name, 0, port), out / f"server-{name}.log",
                                   env={"VLLM_CPU_OMP_THREADS_BIND": binds[0]} if args.pp > 1 else {}
                                   ).wait_ready(timeout=1800)
        before = {name: op_seconds(srv.base_url) for name, srv in servers.items() if name != "vanilla"}
        cells = {(s, w, c): Cell(s, w, c) for s, w in plan for c in concurrencies}
        order = [(s, w, c) for _rep in range(args.reps) for c in concurrencies for s, w in plan]
        for s, w, c in tqdm(order, desc="cells", unit="cell"):
            asyncio.run(drive(servers[s].base_url, w, c, args.requests_per_stream * c, args.max_tokens,
                              sae_cfg.d_sae, unit, prompts, cells[(s, w, c)]))
        profiles = {}
        for name, (total0, calls0) in before.items():
            total, calls = op_seconds(servers[name].base_url)
            driven = sum(cell.wall for (s, *_), cell in cells.items() if s == name)
            profiles[name] = ({"op_calls": calls - calls0, "op_ms_per_call": 1e3 * (total - total0) / (calls - calls0),
                               "op_share": (total - total0) / driven} if calls > calls0 else None)
        checks = []
        if args.cross_check:
            shared = clamps_for("shared", 0, sae_cfg.d_sae, unit)
            for c in concurrencies:
                for s, w in (("vanilla", "none"), ("plugin", "none"), ("plugin", "shared")):
                    if s in servers:
                        checks.append({"concurrency": c, "server": s, "workload": w,
                                       **cross_check(servers[s].base_url, str(model_dir), c,
                                                     shared if w == "shared" else None, args.max_tokens,
                                                     args.requests_per_stream)})
            for row in checks:
                base = next(r for r in checks if r["server"] == "vanilla" and r["concurrency"] == row["concurrency"])
                row["ratio"] = row["output_throughput"] / base["output_throughput"]
    finally:
        for srv in [*servers.values(), *headless]:
            srv.stop()

    rows = []
    for (s, w, c), cell in cells.items():
        base = cells.get(("vanilla", "none", c), cell)
        row = {"server": s, "workload": w, "concurrency": c, "tok_per_s": statistics.mean(cell.tok_per_s),
               "steady_tok_per_s": statistics.mean(cell.steady_tok_per_s),
               "steady_tok_per_s_reps": cell.steady_tok_per_s,
               "ttft_p50": pct(cell.ttft, 0.5), "ttft_p95": pct(cell.ttft, 0.95),
               "tpot_p50": pct(cell.tpot, 0.5), "tpot_p95": pct(cell.tpot, 0.95)}
        row["steady_ratio"] = row["steady_tok_per_s"] / statistics.mean(base.steady_tok_per_s)
        row["tok_per_s_ratio"] = row["tok_per_s"] / statistics.mean(base.tok_per_s)
        row["ttft_p50_ratio"] = row["ttft_p50"] / pct(base.ttft, 0.5)
        row["tpot_p50_ratio"] = row["tpot_p50"] / pct(base.tpot, 0.5)
        rows.append(row)

    def lowest(server: str, workload: str) -> float | None:
        ratios = [r["steady_ratio"] for r in rows if r["server"] == server and r["workload"] == workload]
        return min(ratios) if ratios else None

    import vllm

    report = {
        "date": time.strftime("%Y-%m-%d"), "vllm": vllm.__version__, "quick": args.quick,
        "command": " ".join(["benchmarks/bench_serving.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": {"model": (args.model_config or model_dir).name, "load_format": "dummy" if args.model_config else "auto",
                   "hidden_size": hf["hidden_size"], "num_layers": hf["num_hidden_layers"], "d_sae": sae_cfg.d_sae,
                   "architecture": sae_cfg.architecture, "sae_layer": sae_cfg.layer, "device": device_name(),
                   "compile_mode": args.mode, "dtype": "float32" if device_name().endswith("cores") else "model's own",
                   "pp": args.pp, "dp": args.dp, "nodes": args.nodes, "reps": args.reps, "requests_per_stream": args.requests_per_stream,
                   "max_tokens": args.max_tokens, "prompt_tokens": round(1.1 * (args.prompt_words + 8)),
                   "concurrencies": concurrencies},
        "summary": {"idle_ratio_min": lowest("plugin", "none"), "distinct_ratio_min": lowest("plugin", "distinct"),
                    "shared_ratio_min": lowest("plugin", "shared"), "half_ratio_min": lowest("plugin", "half"),
                    "conditional_ratio_min": lowest("plugin", "conditional"),
                    "vector_ratio_min": lowest("plugin", "vector"),
                    "features_ratio_min": lowest("plugin", "features"),
                    "metrics_every_step_ratio_min": lowest("plugin+metrics", "none"),
                    "metrics_off_ratio_min": lowest("plugin-metrics", "none")},
        "rows": rows, "op_profile": profiles, "cross_check": checks}
    write_outputs(out, report)
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
