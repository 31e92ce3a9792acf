"""Real vLLM engines and servers on the real default model, for tests."""

from __future__ import annotations

import contextlib
import gc
import json
import os
from pathlib import Path

from steer_plugin.core.config import default_model_dir
from server_process import Server, free_port  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parent.parent
MODEL = str(default_model_dir())


@contextlib.contextmanager
def offline_llm(saes: Path | list[dict] | None, enforce_eager: bool = True, plugin: bool = True, model: str = MODEL,
                dtype: str = "float32", max_model_len: int = 2048, steer: dict | None = None, **kwargs):
    """An in-process `vllm.LLM` (its engine core and worker are child processes). saes: one SAE
    folder, or the `steer.saes` entries ({"path", "id", "layer"}); steer: more `steer` settings."""
    from vllm import LLM

    previous = os.environ.get("STEER_PLUGIN_DISABLE")
    os.environ["STEER_PLUGIN_DISABLE"] = "0" if plugin else "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if isinstance(saes, Path):
        saes = [{"path": str(saes)}]
    extra = {"additional_config": {"steer": {"saes": saes, **(steer or {})}}} if plugin and saes else {}
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


def generate_ids(llm, prompts: list[list[int]], clamps: list[dict] | None = None, record=None,
                 max_tokens: int = 8) -> list[list[int]]:
    """Greedy replies (token ids) to token-id prompts, all with the same clamps and recording
    (`spec.FeatureRecording`, signed by this process: admission runs here in an offline engine)."""
    from vllm import SamplingParams

    from steer_plugin.core.spec import FIELD, RECORD_FIELD

    extra = {}
    if clamps is not None:
        extra[FIELD] = json.dumps(clamps)
    if record is not None:
        extra[RECORD_FIELD] = record.model_dump_json()
    params = SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=extra or None)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def recorded(llm, prompts: list[list[int]], clamps: list[dict] | None, record) -> dict:
    """Run the prompts with a recording and fetch what a worker recorded."""
    generate_ids(llm, prompts, clamps, record, max_tokens=1)
    return next(r for r in llm.collective_rpc("steer_pop_features", args=(record.key,)) if r)
