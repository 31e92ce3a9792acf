"""What grows in the worker under load: its resident memory and its Python heap (tracemalloc), phase
by phase, in an offline vLLM engine with the plugin (or without: `--vanilla`).

The soak (`soak.py`) sees the server's processes from outside; this looks inside the worker, through
vLLM's `collective_rpc` with a function (a development switch of vLLM, set here:
VLLM_ALLOW_INSECURE_SERIALIZATION=1). Each phase sends `--requests` requests in batches of 40, 60 %
of them with random clamp sets and 30 % recording features (as `return_features` does; the records
are fetched and dropped after each batch), then reports the worker's RSS and traced Python heap.
`--varied` gives prompts of 0-300 extra words and 4-32 new tokens, so that steps meet many shapes.

    python benchmarks/worker_memory.py --phases 5 --requests 320
    python benchmarks/worker_memory.py --phases 3 --requests 160 --varied [--vanilla]

The last line of stdout is one JSON document: per phase, seconds, worker RSS (MB), traced heap (MB).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

PROMPTS = ["Tell me about your weekend.", "What is your favourite book?", "Describe a city at night.",
           "How do I make tea?"]
WORDS = "the cat sat on a mat while rivers ran to the sea and music played in old towns of France".split()
BATCH = 40


def _start_tracing(worker) -> int:
    import tracemalloc

    tracemalloc.start(1)
    return os.getpid()


def _measure(worker) -> tuple[int, int]:
    """(RSS bytes, traced Python heap bytes) of the worker process, after a collection."""
    import gc
    import tracemalloc

    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss, tracemalloc.get_traced_memory()[0]


def _batch(llm, rng: random.Random, plugin: bool, varied: bool, d_sae: int, sae_id: str) -> None:
    from vllm import SamplingParams

    from steer_plugin.api.admission import new_recording_key
    from steer_plugin.core.spec import FIELD, RECORD_FIELD, FeatureRecording

    prompts, params, keys = [], [], []
    for _ in range(BATCH):
        extra_words = rng.randint(0, 300) if varied else rng.randint(0, 30)
        prompts.append(rng.choice(PROMPTS) + " " + " ".join(rng.choice(WORDS) for _ in range(extra_words)))
        extra: dict[str, str] = {}
        if plugin and rng.random() < 0.6:
            clamps = [{"feature": rng.randrange(d_sae), "value": round(rng.uniform(0, 5), 3),
                       "mode": rng.choice(["set", "add"]), "tokens": rng.choice(["all", "prompt", "generated"])}
                      for _ in range(rng.randint(1, 4))]
            extra[FIELD] = json.dumps(clamps)
        if plugin and rng.random() < 0.3:
            recording = FeatureRecording(key=new_recording_key(), sae=sae_id, top_k=rng.randint(1, 5),
                                         scope="generation")
            extra[RECORD_FIELD] = recording.model_dump_json()
            keys.append(recording.key)
        params.append(SamplingParams(max_tokens=rng.randint(4, 32) if varied else 12,
                                     temperature=rng.choice([0, 0.7]), extra_args=extra or None))
    llm.generate(prompts, params, use_tqdm=False)
    for key in keys:  # what return_features does once a reply is complete
        llm.collective_rpc("steer_pop_features", args=(key,))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", type=int, default=5)
    p.add_argument("--requests", type=int, default=320, help="requests per phase (whole batches of 40)")
    p.add_argument("--varied", action="store_true", help="prompts and replies of many lengths")
    p.add_argument("--vanilla", action="store_true", help="the plugin off (vLLM alone)")
    args = p.parse_args()
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["STEER_PLUGIN_DISABLE"] = "1" if args.vanilla else "0"
    from vllm import LLM

    from steer_plugin.core.config import DEFAULT_SAE_DIR, default_model_dir
    from steer_plugin.core.sae import load_config

    extra = {} if args.vanilla else {"additional_config": {"steer": {"saes": [{"path": str(DEFAULT_SAE_DIR)}]}}}
    llm = LLM(model=str(default_model_dir()), dtype="float32", max_model_len=2048, seed=0, **extra)
    llm.collective_rpc(_start_tracing)
    rng = random.Random(0)
    d_sae = load_config(DEFAULT_SAE_DIR).d_sae
    phases = []
    for phase in range(args.phases):
        start = time.perf_counter()
        for _ in range(max(1, args.requests // BATCH)):
            _batch(llm, rng, not args.vanilla, args.varied, d_sae, DEFAULT_SAE_DIR.name)
        (rss, heap), = llm.collective_rpc(_measure)
        phases.append({"phase": phase, "seconds": round(time.perf_counter() - start),
                       "worker_rss_mb": round(rss / 2**20, 1), "python_heap_mb": round(heap / 2**20, 2)})
        print(json.dumps(phases[-1]), flush=True)
    print(json.dumps({"config": vars(args), "phases": phases}))


if __name__ == "__main__":
    main()
