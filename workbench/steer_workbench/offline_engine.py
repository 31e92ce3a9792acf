"""vLLM's offline engine as the training tools use it (chat corpus, strength sweep, efficacy runs).

On a machine without a GPU, vLLM runs the model in a worker process beside an engine-core process
that busy-waits on it, each holding a core, and gives the model one torch thread. With the engine
in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) and torch on every core, the model gets
the core the waiting process held, which on a small machine nearly doubles the tokens generated per
second (docs/reports/chat-sae-2026-12-02.md). That mode is for a tool's own process (the chat corpus, the
strength sweep, the efficacy run ask for it): the engine's set-up (thread binding, a distributed
group) stays in the process, so a process that goes on to start other engines, a test session for
one, keeps vLLM's separate processes. Steered replies are the same either way: greedy replies,
steered and unsteered, are identical in-process and with separate processes (same report).
"""

from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def _environment(values: dict[str, str]):
    """The variables set for the engine's start-up only: the caller's environment as it was after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def offline_llm(model_dir: str, plugin: bool = True, kv_cache_gib: int = 2, own_process: bool = False,
                dtype: str = "float32", **kwargs):
    """An offline `vllm.LLM` on the model, eager (as fast as compiled on CPU, no compile time), in
    `dtype` (float32 by default, what the CPU build runs well; "auto" on a GPU); `plugin=False` is
    vanilla vLLM; `own_process`: the caller's process serves no other engine (see above); kwargs
    (seed, max_model_len, ...) go to `LLM`."""
    import torch
    from vllm import LLM

    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))}
    if own_process and not torch.cuda.is_available():
        env |= {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}
    if not plugin:
        env["STEER_PLUGIN_DISABLE"] = "1"
    with _environment(env):
        return LLM(model=model_dir, dtype=dtype, enforce_eager=True, **{"seed": 0, **kwargs})
