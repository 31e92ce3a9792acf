"""Per-feature statistics (max, frequency, mean) and the feature catalogue: the input side (top
tokens, contexts, an automatic label), computed in one pass of the SAE over the captured corpus,
and the output side (the tokens each decoder row promotes), computed from the model's weights."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

from steer_plugin.core.sae import SAE
from steer_workbench.capture import Capture


@torch.inference_mode()
def feature_statistics(sae: SAE, cap: Capture, top: int = 40, chunk: int = 8192):
    """Returns (stats dict of [d_sae] tensors, top activations [top, d_sae], their row indices)."""
    d_sae = sae.cfg.d_sae
    max_act = torch.zeros(d_sae)
    count = torch.zeros(d_sae, dtype=torch.float64)
    total = torch.zeros(d_sae, dtype=torch.float64)
    top_vals = torch.full((top, d_sae), -1.0)
    top_rows = torch.zeros((top, d_sae), dtype=torch.long)
    for start in tqdm(range(0, cap.acts.shape[0], chunk), desc="feature stats", unit="chunk"):
        f, _ = sae.encode(cap.acts[start:start + chunk])  # [chunk, d_sae]
        max_act = torch.maximum(max_act, f.max(0).values)
        count += (f > 0).sum(0).double()
        total += f.sum(0).double()
        vals, rows = f.topk(min(top, f.shape[0]), dim=0)  # [top, d_sae]
        merged_vals = torch.cat([top_vals, vals])
        merged_rows = torch.cat([top_rows, rows + start])
        best = merged_vals.topk(top, dim=0).indices
        top_vals, top_rows = merged_vals.gather(0, best), merged_rows.gather(0, best)
    n = cap.acts.shape[0]
    stats = {"max_activation": max_act, "frequency": (count / n).float(),
             "mean_activation": (total / count.clamp_min(1)).float()}
    return stats, top_vals, top_rows


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def build_catalogue(tokenizer, tokens: list[list[int]], stats: dict, top_value, top_doc, top_pos,
                    contexts: int = 4, window: int = 10) -> list[dict]:
    """One entry per feature from its strongest activations: top_value [top, d_sae] (descending per
    feature; <= 0: none), top_doc / top_pos [top, d_sae] where each was (a document of `tokens` and a
    position in it). `top_tokens` counts the tokens of those activations; the automatic `label` is
    their three most frequent; `top_contexts` shows the first `contexts` with the token marked."""
    top_value, top_doc, top_pos = (np.asarray(a) for a in (top_value, top_doc, top_pos))
    entries = []
    for feature in tqdm(range(top_value.shape[1]), desc="catalogue", unit="feature"):
        counted = Counter()
        examples = []
        for value, doc, pos in zip(top_value[:, feature], top_doc[:, feature], top_pos[:, feature]):
            if value <= 0:
                break
            ids = tokens[doc]
            text = _token_text(tokenizer, ids[pos])
            counted[text.strip() or repr(text)] += 1
            if len(examples) < contexts:
                left = tokenizer.decode(ids[max(0, pos - window):pos])
                right = tokenizer.decode(ids[pos + 1:pos + 1 + window // 2])
                examples.append({"text": f"{left}«{text}»{right}", "activation": round(float(value), 3)})
        top_tokens = [{"token": t, "count": c} for t, c in counted.most_common(8)]
        label = " / ".join(t["token"] for t in top_tokens[:3]) if top_tokens else "(dead)"
        entries.append({
            "id": feature, "label": label, "labels": [{"text": label, "source": "tokens"}],
            "max_activation": round(float(stats["max_activation"][feature]), 4),
            "frequency": float(stats["frequency"][feature]),
            "mean_activation": round(float(stats["mean_activation"][feature]), 4),
            "top_tokens": top_tokens, "top_contexts": examples,
        })
    return entries


def final_norm(model) -> torch.nn.Module:
    """The norm a causal LM applies to the stream before its unembedding (`model.norm` in Llama-like
    models, `transformer.ln_f` in GPT-2, `model.decoder.final_layer_norm` in OPT, ...): the last
    normalisation module outside the decoder layers."""
    layers = model.config.num_hidden_layers
    norm = None
    inside = set()
    for name, module in model.named_modules():  # parents before children
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            inside.add(name + ".")
        elif "norm" in type(module).__name__.lower() and not any(name.startswith(p) for p in inside):
            norm = module
    if norm is None:
        raise ValueError(f"{type(model).__name__}: no final normalisation module found")
    return norm


@torch.inference_mode()
def promoted_tokens(sae: SAE, model, tokenizer, top: int = 10, chunk: int = 512) -> list[list[dict]]:
    """Output side of every feature: the tokens its decoder row promotes most. A change of the
    stream by a·W_dec[i] at the SAE's layer reaches the logits, directly, through the final norm and
    the unembedding W_U; the row is put through the model's own final norm (minus what the norm makes
    of a zero stream: a LayerNorm's bias, the same for every feature) and W_U. For an RMSNorm or a
    LayerNorm that ranks tokens exactly as the direct path does, since the stream's own scale is a
    positive per-token factor (the direct path only: later layers also react, which the strength
    sweep measures)."""
    W_U = model.get_output_embeddings().weight.float()  # [vocab, d_in]
    norm = final_norm(model).float()
    zero = norm(torch.zeros(1, sae.cfg.d_in))  # [1, d_in]
    out = []
    for start in tqdm(range(0, sae.cfg.d_sae, chunk), desc="output tokens", unit="chunk"):
        logits = (norm(sae.W_dec[start:start + chunk].float()) - zero) @ W_U.T  # [chunk, vocab]
        values, ids = logits.topk(top, dim=-1)
        for row_values, row_ids in zip(values.tolist(), ids.tolist()):
            out.append([{"token": _token_text(tokenizer, t), "logit": round(v, 3)}
                        for v, t in zip(row_values, row_ids)])
    return out


def add_output_side(entries: list[dict], sae: SAE, model, tokenizer, top: int = 10) -> list[dict]:
    """Catalogue entries (one per feature, in order) with their `output_tokens`."""
    for entry, tokens in zip(entries, promoted_tokens(sae, model, tokenizer, top), strict=True):
        entry["output_tokens"] = tokens
    return entries
