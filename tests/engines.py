"""Real vLLM engines and servers on the real default model, for tests."""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path

from steer_plugin.config import default_model_dir
from steer_plugin.server_process import Server, free_port  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parent.parent
MODEL = str(default_model_dir())


@contextlib.contextmanager
def offline_llm(saes: Path | list[dict] | None, enforce_eager: bool = True, plugin: bool = True, model: str = MODEL,
                dtype: str = "float32", max_model_len: int = 2048, **kwargs):
    """An in-process `vllm.LLM` (its engine core and worker are child processes). saes: one SAE
    folder, or the `steer.saes` entries ({"path", "id", "layer"})."""
    from vllm import LLM

    previous = os.environ.get("STEER_PLUGIN_DISABLE")
    os.environ["STEER_PLUGIN_DISABLE"] = "0" if plugin else "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if isinstance(saes, Path):
        saes = [{"path": str(saes)}]
    extra = {"additional_config": {"steer": {"saes": saes}}} if plugin and saes else {}
    llm = LLM(model=model, dtype=dtype, enforce_eager=enforce_eager, max_model_len=max_model_len,
              seed=0, **extra, **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if previous is None:
            os.environ.pop("STEER_PLUGIN_DISABLE", None)
        else:
            os.environ["STEER_PLUGIN_DISABLE"] = previous
