"""Soak test: thousands of random requests against one server, checking that nothing leaks.

Requests go out at a fixed concurrency over both steering routes, streamed or not, with random clamp
sets (features, values, modes, units, token scopes), `return_features` on some and a few invalid
bodies that must get a 400. Every `--canary-every`-th request is an unsteered greedy canary whose
text must equal its baseline, taken before the load; the resident memory of every server process
is sampled throughout. Writes `results.json` and `results.md` to `--out`.

    python benchmarks/soak.py --start --requests 2000 --concurrency 32 --out benchmarks/results/soak
    python benchmarks/soak.py --url http://127.0.0.1:8000 --requests 200
    python benchmarks/soak.py --start --no-plugin --out benchmarks/results/soak-vanilla   # vLLM alone, same prompts
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import httpx
import psutil
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness that starts server.py
from server_process import Server  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
CANARIES = ["The capital of France is", "List three colours:", "Water boils at", "A good breakfast is"]
PROMPTS = ["Tell me about your weekend.", "What is your favourite book?", "Describe a city at night.",
           "How do I make tea?", "Write a haiku about autumn.", "Why is the sky blue?"]
INVALID = [{"feature_clamps": [{"feature": -1, "value": 1}]}, {"feature_clamp": []},
           {"feature_clamps": [{"feature": 1, "value": 1, "mode": "boost"}]}, {"return_features": 0}]


def random_clamps(rng: random.Random, d_sae: int) -> list[dict]:
    clamps = []
    for feature in rng.sample(range(d_sae), rng.randint(1, 4)):
        mode = rng.choice(["set", "add", "scale"])
        clamp = {"feature": feature, "value": round(rng.uniform(0, 5 if mode != "scale" else 3), 3), "mode": mode,
                 "tokens": rng.choice(["all", "prompt", "generated"])}
        if mode != "scale" and rng.random() < 0.5:
            clamp["unit"] = "max"
        clamps.append(clamp)
    return clamps


def body_for(rng: random.Random, kind: str, d_sae: int, max_tokens: int) -> tuple[str, dict]:
    chat = rng.random() < 0.5
    prompt = rng.choice(PROMPTS)
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": rng.choice([0, 0.7])}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    if kind == "invalid":
        body.update(rng.choice(INVALID))
    elif kind == "steered":
        body["feature_clamps"] = random_clamps(rng, d_sae)
    if kind != "invalid" and rng.random() < 0.3:
        body["return_features"] = rng.randint(1, 5)
    body["stream"] = rng.random() < 0.5
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


async def send(client: httpx.AsyncClient, path: str, body: dict) -> tuple[int, str]:
    """Status and the reply text (joined from the stream when streaming)."""
    if not body.get("stream"):
        r = await client.post(path, json=body)
        if r.status_code != 200:
            return r.status_code, r.text
        choice = r.json()["choices"][0]
        return 200, choice["text"] if "text" in choice else choice["message"]["content"] or ""
    text = []
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return r.status_code, (await r.aread()).decode()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return 500, line
            for choice in event.get("choices", []):
                text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return 200, "".join(text)


def canary_body(prompt: str) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0}


def rss_of(pid: int) -> dict[int, int]:
    """Resident bytes of a process and all its descendants."""
    root = psutil.Process(pid)
    out = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            out[proc.pid] = proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


async def soak(args, base_url: str, server_pid: int | None) -> dict:
    rng = random.Random(args.seed)
    d_sae = 0 if args.no_plugin else httpx.get(f"{base_url}/v1/features?limit=1").json()["total"]
    timeout = httpx.Timeout(300.0)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout,
                                 limits=httpx.Limits(max_connections=args.concurrency * 2)) as client:
        baseline = {p: (await send(client, "/v1/completions", canary_body(p)))[1] for p in CANARIES}
        plan = []
        for i in range(args.requests):
            if i % args.canary_every == 0:
                plan.append(("canary", "/v1/completions", canary_body(CANARIES[(i // args.canary_every) % 4])))
            else:
                kind = rng.choices(["steered", "plain", "invalid"], weights=[0.6, 0.35, 0.05])[0]
                kind = "plain" if args.no_plugin else kind  # the same draws, so both runs send the same prompts
                path, body = body_for(rng, kind, d_sae, args.max_tokens)
                if args.no_plugin:
                    body.pop("return_features", None)
                plan.append((kind, path, body))
        queue: asyncio.Queue = asyncio.Queue()
        for item in plan:
            queue.put_nowait(item)
        counts = {"ok": 0, "expected_400": 0, "errors": 0, "canary_mismatch": 0}
        failures: list[str] = []
        rss_samples: list[dict[int, int]] = []
        progress = tqdm(total=len(plan), desc="soak", unit="req")

        async def worker():
            while not queue.empty():
                kind, path, body = queue.get_nowait()
                try:
                    status, text = await send(client, path, body)
                except Exception as e:  # a broken reply is an error of the run, not of the script
                    status, text = -1, repr(e)
                if kind == "invalid":
                    ok = status == 400
                    counts["expected_400" if ok else "errors"] += 1
                elif status != 200:
                    ok = False
                    counts["errors"] += 1
                elif kind == "canary" and text != baseline[body["prompt"]]:
                    ok = False
                    counts["canary_mismatch"] += 1
                else:
                    ok = True
                    counts["ok"] += 1
                if not ok and len(failures) < 20:
                    failures.append(f"{kind} {path} status={status}: {text[:300]}")
                progress.update()

        async def sample_rss():
            while True:
                if server_pid is not None:
                    rss_samples.append(rss_of(server_pid))
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample_rss())
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
        sampler.cancel()
        progress.close()
    return {"counts": counts, "failures": failures, "elapsed_s": elapsed, "rss": rss_summary(rss_samples),
            "canaries": len([p for p in plan if p[0] == "canary"])}


def rss_summary(samples: list[dict[int, int]]) -> dict:
    """Per process: RSS after warm-up (the sample at 10 % of the run) and at the end, and the growth."""
    if len(samples) < 3:
        return {}
    early, last = samples[max(1, len(samples) // 10)], samples[-1]
    out = {}
    for pid in sorted(set(early) & set(last)):
        out[str(pid)] = {"early_mb": early[pid] / 2**20, "end_mb": last[pid] / 2**20,
                         "growth": (last[pid] - early[pid]) / early[pid]}
    total_early, total_end = sum(early[p] for p in early), sum(last[p] for p in last)
    out["total"] = {"early_mb": total_early / 2**20, "end_mb": total_end / 2**20,
                    "growth": (total_end - total_early) / total_early,
                    "by_tenth_mb": [sum(samples[min(len(samples) - 1, i * len(samples) // 10)].values()) / 2**20
                                    for i in range(1, 11)]}
    return out


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    c = results["counts"]
    lines = [f"# Soak run ({time.strftime('%Y-%m-%d')})", "",
             f"`{' '.join(['python benchmarks/soak.py'] + results['command'])}`", "",
             f"- requests: {results['config']['requests']} at concurrency {results['config']['concurrency']} "
             f"in {results['elapsed_s']:.0f} s", f"- answered 200 as expected: {c['ok']}",
             f"- invalid bodies answered 400: {c['expected_400']}", f"- errors: {c['errors']}",
             f"- canaries (unsteered, greedy): {results['canaries']}, differing from baseline: {c['canary_mismatch']}",
             "", "| process | RSS after warm-up (MB) | RSS at end (MB) | growth |", "|---|---|---|---|"]
    for pid, r in results["rss"].items():
        lines.append(f"| {pid} | {r['early_mb']:.0f} | {r['end_mb']:.0f} | {100 * r['growth']:+.2f} % |")
    if "total" in results["rss"]:
        tenths = ", ".join(f"{mb:.0f}" for mb in results["rss"]["total"]["by_tenth_mb"])
        lines += ["", f"Total RSS at each tenth of the run (MB): {tenths}."]
    if results["failures"]:
        lines += ["", "First failures:", ""] + [f"- `{f}`" for f in results["failures"]]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an already running server (default: start one with --start)")
    p.add_argument("--start", action="store_true", help="start `server.py` with its defaults for the run")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--canary-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plugin", action="store_true",
                   help="vanilla vLLM (server.py --no-plugin), every request plain: the baseline of the memory figures")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/soak"))
    args = p.parse_args(argv)
    command = argv if argv is not None else sys.argv[1:]
    if not (args.url or args.start):
        p.error("give --url or --start")
    server = Server(["--no-plugin"] if args.no_plugin else [], args.out / "server.log").wait_ready() if args.start else None
    try:
        results = asyncio.run(soak(args, server.base_url if server else args.url,
                                   server.proc.pid if server else None))
    finally:
        if server is not None:
            server.stop()
    results["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results["command"] = list(command)
    write(results, args.out)
    print(json.dumps({"counts": results["counts"], "rss_total": results["rss"].get("total")}))
    return results


if __name__ == "__main__":
    main()
