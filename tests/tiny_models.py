"""Tiny random-weight models of the architectures the plugin claims, built from transformers configs
(nothing downloaded) and saved with the default model's tokenizer, for engine tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from steer_plugin.core.config import default_model_dir

HIDDEN, LAYERS, HEADS, VOCAB = 128, 3, 2, 49152
"""Head size 64 (what the CPU attention backend takes); the tokenizer's vocabulary; three layers, so
the middle one is neither the embeddings nor followed by the final norm in transformers' outputs."""
_COMMON = dict(hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               num_key_value_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=2048, bos_token_id=1,
               eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)


def _config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**_COMMON)
    if arch == "qwen2":
        return tf.Qwen2Config(**_COMMON)
    if arch == "qwen3":
        return tf.Qwen3Config(**_COMMON, head_dim=HIDDEN // HEADS)
    if arch == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=None)
    if arch == "gemma2":
        return tf.Gemma2Config(**{**_COMMON, "tie_word_embeddings": True}, head_dim=HIDDEN // HEADS,
                               query_pre_attn_scalar=HIDDEN // HEADS, sliding_window=1024)
    if arch == "gemma3":  # vLLM's Gemma models always tie the unembedding to the embeddings
        return tf.Gemma3TextConfig(**{**_COMMON, "tie_word_embeddings": True}, head_dim=HIDDEN // HEADS,
                                   query_pre_attn_scalar=HIDDEN // HEADS, sliding_window=1024)
    if arch == "phi3":
        return tf.Phi3Config(**_COMMON)
    if arch == "olmo2":
        return tf.Olmo2Config(**_COMMON)
    if arch == "gpt2":  # decoder blocks return the stream as one tensor
        return tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=2048, vocab_size=VOCAB,
                             bos_token_id=1, eos_token_id=2)
    raise ValueError(arch)


ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "olmo2", "gpt2")


def build(arch: str, out: Path, seed: int = 0) -> Path:
    """Write a random `arch` model (float32 weights) with the default model's tokenizer into `out`."""
    from transformers import AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch), torch_dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init: replies that depend on the stream
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        src = default_model_dir() / name
        if src.exists():
            shutil.copy(src, out / name)
    return out


def stream_after(model_dir: Path, layer: int, ids: list[int], dtype=torch.float32) -> torch.Tensor:
    """transformers' residual stream after decoder layer `layer` for one prompt: [T, hidden] float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0].float()
