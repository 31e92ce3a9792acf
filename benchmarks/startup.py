"""Start-up time: `server.py` launch to its first reply, vanilla vLLM against the plugin, alternating.

Each start runs the server as README starts it (default model and SAE, compiled mode; `--no-plugin`
for vanilla), waits for /health, sends one completion and stops the server. The time is from the
launch to that reply. Each server's log is read for what vLLM did with its compile cache: loaded
it, or compiled again (and why). `--warmup` starts of each server are run first and not counted, so
every counted start finds the compile cache as a restart would.

    python benchmarks/startup.py --reps 3 --out benchmarks/results/startup
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness that starts server.py
from server_process import Server  # noqa: E402

SERVERS = {"vanilla": ["--no-plugin"], "plugin": []}
CACHE_EVENTS = {
    "recompiled": re.compile(r"Compiling model again due to a load failure[^\n]*"),
    "loaded": re.compile(r"Directly load[^\n]*compiled[^\n]*|loaded AOT compiled[^\n]*", re.IGNORECASE),
    "saved": re.compile(r"saved AOT compiled function[^\n]*"),
}


MILESTONES = {
    "engine": "Initializing a V1 LLM engine",
    "weights": "Loading weights took",
    "sae": "action=installed",
    "engine_ready": "init engine (profile, create kv cache, warmup model) took",
    "serving": "Starting vLLM server",
    "catalogues": "action=catalogues_loaded",
}
"""Log lines that mark the phases of a start; each is timed from the launch (to the second: vLLM's
log stamps, local time, carry no fraction)."""
_STAMP = re.compile(r"(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)")


def milestones(text: str, launched: float) -> dict[str, float]:
    """Seconds from the launch (a time.time()) to each milestone's first log line (those that occur)."""
    at = datetime.fromtimestamp(launched)
    found = {}
    for line in text.splitlines():
        stamp = _STAMP.search(line)
        if stamp is None:
            continue
        month, day, h, mi, sec = map(int, stamp.groups())
        when = at.replace(month=month, day=day, hour=h, minute=mi, second=sec, microsecond=0)
        for name, marker in MILESTONES.items():
            if name not in found and marker in line:
                found[name] = round((when - at).total_seconds(), 1)
    return found


def one_start(name: str, log: Path) -> dict:
    launched, started = time.time(), time.perf_counter()
    server = Server(SERVERS[name], log).wait_ready(timeout=1800)
    try:
        r = httpx.post(f"{server.base_url}/v1/completions", timeout=300,
                       json={"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 1})
        r.raise_for_status()
        seconds = time.perf_counter() - started
    finally:
        server.stop()
    text = log.read_text(errors="replace")
    events = {kind: len(pattern.findall(text)) for kind, pattern in CACHE_EVENTS.items()}
    reason = CACHE_EVENTS["recompiled"].search(text)
    return {"server": name, "seconds": seconds, "cache": events, "milestones": milestones(text, launched),
            "recompile_reason": reason.group(0)[:300] if reason else None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/startup"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for rep in range(args.warmup):
        for name in SERVERS:
            one_start(name, args.out / f"warmup-{name}-{rep}.log")
    starts = [one_start(name, args.out / f"{name}-{rep}.log") for rep in range(args.reps) for name in SERVERS]
    summary = {name: {"seconds": [s["seconds"] for s in starts if s["server"] == name]} for name in SERVERS}
    for entry in summary.values():
        entry["median"] = statistics.median(entry["seconds"])
    ratio = summary["plugin"]["median"] / summary["vanilla"]["median"]
    import vllm

    results = {"date": time.strftime("%Y-%m-%d"), "vllm": vllm.__version__,
               "command": " ".join(["benchmarks/startup.py", *(sys.argv[1:] if argv is None else argv)]),
               "summary": summary, "plugin_over_vanilla": ratio, "starts": starts}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"Start-up, launch to first reply ({results['date']}, vLLM {results['vllm']}, default model and SAE, "
             f"compiled; {args.reps} starts each after {args.warmup} uncounted): plugin / vanilla = {ratio:.3f} "
             "(medians).", "", "| server | starts (s) | median (s) | compile cache |", "|---|---|---|---|"]
    for name in SERVERS:
        cache = [s["cache"] for s in starts if s["server"] == name]
        lines.append(f"| {name} | {', '.join(f'{x:.1f}' for x in summary[name]['seconds'])} | "
                     f"{summary[name]['median']:.1f} | recompiled in {sum(c['recompiled'] > 0 for c in cache)} of "
                     f"{len(cache)} starts |")
    lines += ["", "Where the time goes: median seconds from the launch to each milestone's log line (vLLM's log "
              "stamps: whole seconds).",
              "", "| server | " + " | ".join(MILESTONES) + " |", "|---|" + "---|" * len(MILESTONES)]
    for name in SERVERS:
        cells = [[s["milestones"].get(m) for s in starts if s["server"] == name] for m in MILESTONES]
        lines.append(f"| {name} | " + " | ".join(f"{statistics.median([x for x in c if x is not None]):.0f}"
                                                if any(x is not None for x in c) else "" for c in cells) + " |")
    reasons = {s["recompile_reason"] for s in starts if s["recompile_reason"]}
    lines += ["", *[f"vLLM: `{r}`" for r in sorted(reasons)]]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"summary": summary, "plugin_over_vanilla": ratio}))
    return results


if __name__ == "__main__":
    main()
