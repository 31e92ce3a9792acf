"""Residual-stream capture at one layer with Hugging Face transformers, forward stopped there.

The output of decoder layer L in transformers is the full residual stream (hidden + residual),
the same quantity vLLM's steering op encodes as `hidden + residual` after layer L.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from steer_plugin.core.files import replaced_on_success


class _StopForward(Exception):
    pass


SINK_NORM = 10.0
"""A token whose stream norm exceeds this multiple of the median is an attention sink, left out of
training, statistics and evaluation like position 0 (the op keeps its error term, so steering is
unaffected). At layer 15 of SmolLM2-135M the second position of some rare documents is one, with a
norm far above this bound; kept, each takes a batch's squared error for itself, and error-weighted
resampling aims thousands of latents at them, features labelled "\\n" (docs/reports/batchtopk-12k-sae-2026-12-05.md)."""


def is_sink(acts: torch.Tensor) -> torch.Tensor:
    """acts: [N, d_model] -> [N] bool: the attention sinks among them (see SINK_NORM)."""
    norms = acts.float().norm(dim=-1)
    return norms > SINK_NORM * norms.median()


@dataclass
class Capture:
    """Activations of every non-first position of every document."""

    acts: torch.Tensor  # [N, d_model] float32
    doc: np.ndarray  # [N] int32: document index
    pos: np.ndarray  # [N] int32: position within the document's tokens
    tokens: list[list[int]]  # per document, the token ids fed to the model

    @staticmethod
    def concat(parts: list["Capture"]) -> "Capture":
        """One capture of several (document indices renumbered in order)."""
        offsets = np.cumsum([0] + [len(c.tokens) for c in parts[:-1]])
        return Capture(torch.cat([c.acts for c in parts]),
                       np.concatenate([c.doc + np.int32(o) for c, o in zip(parts, offsets)]),
                       np.concatenate([c.pos for c in parts]), [t for c in parts for t in c.tokens])

    def without_sinks(self) -> "Capture":
        """The positions that are not attention sinks (see SINK_NORM)."""
        keep = ~is_sink(self.acts)
        if bool(keep.all()):
            return self
        rows = keep.numpy()
        return Capture(self.acts[keep], self.doc[rows], self.pos[rows], self.tokens)


def load_hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def decoder_layers(model) -> torch.nn.ModuleList:
    """A transformers causal LM's decoder layers: the first ModuleList with one entry per hidden layer
    (`model.layers` in Llama-like models, `transformer.h` in GPT-2, ...)."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == model.config.num_hidden_layers:
            return module
    raise ValueError(f"{type(model).__name__}: no ModuleList of its {model.config.num_hidden_layers} layers")


def streams(model, token_lists: list[list[int]], layers: list[int], batch_size: int, pad_id: int = 0):
    """Yields (document indices, mask [batch, width], {layer: its output stream [batch, width, d_model]})
    per batch of documents of similar length (right-padded), the forward stopped after the deepest of
    `layers`."""
    caught: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def hook_for(layer: int):
        def hook(_module, _inputs, output):
            caught[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _StopForward
        return hook

    handles = [decoder_layers(model)[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    order = np.argsort([len(t) for t in token_lists], kind="stable")  # similar lengths share a batch
    try:
        for start in range(0, len(order), batch_size):
            batch = [int(i) for i in order[start:start + batch_size]]
            width = max(len(token_lists[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(token_lists[i])] = torch.tensor(token_lists[i])
                mask[row, : len(token_lists[i])] = 1
            caught.clear()
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
            yield batch, mask, dict(caught)
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def capture(model, tokenizer, docs: list[str], layer: int, ctx: int, batch_size: int,
            desc: str = "capture") -> Capture:
    token_lists = [tokenizer(d, add_special_tokens=False)["input_ids"][:ctx] for d in docs]
    token_lists = [t for t in token_lists if len(t) >= 2]
    acts, docs_idx, pos_idx = [], [], []
    with tqdm(total=sum(len(t) - 1 for t in token_lists), desc=desc, unit="tok", unit_scale=True) as bar:
        for batch, _, caught in streams(model, token_lists, [layer], batch_size, tokenizer.pad_token_id or 0):
            resid = caught[layer]  # [batch, width, d_model]
            for row, i in enumerate(batch):
                n = len(token_lists[i])
                # Position 0 is an attention sink with a far larger norm: left out of training.
                acts.append(resid[row, 1:n].float().clone())
                docs_idx.append(np.full(n - 1, i, dtype=np.int32))
                pos_idx.append(np.arange(1, n, dtype=np.int32))
                bar.update(n - 1)
    return Capture(torch.cat(acts), np.concatenate(docs_idx), np.concatenate(pos_idx), token_lists)


_CAPTURE_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.Int32DType]
"""What torch's restricted unpickler must let through for a saved capture besides tensors, lists and
strings: numpy's rebuilding of the int32 arrays `doc` and `pos`, and nothing else."""


def load_saved(path: Path) -> dict:
    """A file cached_capture wrote ({"key": what was captured, "capture": the Capture's fields}), read
    with torch's restricted unpickler (weights_only): a capture file builds no other objects."""
    with torch.serialization.safe_globals(_CAPTURE_GLOBALS):
        return torch.load(path, weights_only=True)


def cached_capture(path: Path, key: str, model, tokenizer, docs: list[str], layer: int, ctx: int, batch_size: int,
                   desc: str = "capture") -> Capture:
    """capture(), kept in `path` (float32 activations) and read back while `key` (what was captured)
    is unchanged: the resume point of a long pipeline run."""
    if path.exists():
        saved = load_saved(path)
        if saved["key"] == key:
            return Capture(**saved["capture"])
    cap = capture(model, tokenizer, docs, layer, ctx, batch_size, desc)
    with replaced_on_success(path) as tmp:
        torch.save({"key": key, "capture": asdict(cap)}, tmp)
    return cap
