"""Difference-of-means steering vectors at the SAE's layer, served through the plugin as an SAE.

For a concept (keywords), the vector is the mean residual stream over the tokens of training
documents that mention the concept at least twice, minus the mean over the other documents (the
DiffMean baseline of AxBench). The vectors are written as a SAELens `jumprelu` SAE whose features
never fire (zero encoder, threshold 1) and whose decoder rows are the unit vectors; `max_activation`
is each vector's norm. A clamp `{"sae": "diffmean", "feature": i, "value": s, "unit": "max"}` then
adds exactly s × the mean difference to the stream at every position, on the plugin's own path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from steer_plugin.sae import CATALOGUE_FILENAME, SAE, STATS_FILENAME, SAEConfig
from steer_plugin.training.capture import Capture
from steer_plugin.training.steering_eval import count_mentions

@torch.inference_mode()
def diff_means(cap: Capture, tokenizer, concepts: dict[str, list[str]], min_hits: int = 2) -> torch.Tensor:
    """[concepts, d_in]: per concept, mean over positive documents' tokens − mean over the rest."""
    texts = [tokenizer.decode(t) for t in cap.tokens]
    doc = torch.from_numpy(cap.doc).long()  # [N]
    per_doc_sum = torch.zeros(len(texts), cap.acts.shape[1], dtype=torch.float64).index_add_(0, doc, cap.acts.double())
    per_doc_n = torch.bincount(doc, minlength=len(texts)).double()  # [docs]
    return diff_of_sums(per_doc_sum, per_doc_n, texts, concepts, min_hits)


def diff_of_sums(per_doc_sum: torch.Tensor, per_doc_n: torch.Tensor, texts: list[str],
                 concepts: dict[str, list[str]], min_hits: int = 2) -> torch.Tensor:
    """per_doc_sum [docs, d_in] float64: each document's summed activations over per_doc_n [docs] tokens
    -> [concepts, d_in] float32: per concept, the mean over positive documents' tokens − the rest's."""
    vectors = []
    for keywords in concepts.values():
        positive = torch.tensor([count_mentions(t, keywords) >= min_hits for t in texts])
        if not positive.any():
            raise ValueError(f"no training document mentions {keywords} {min_hits} times")
        pos = per_doc_sum[positive].sum(0) / per_doc_n[positive].sum()
        neg = per_doc_sum[~positive].sum(0) / per_doc_n[~positive].sum()
        vectors.append((pos - neg).float())
    return torch.stack(vectors)


def write_vector_sae(vectors: torch.Tensor, labels: list[str], hook_name: str, out: Path) -> None:
    """vectors: [n, d_in] -> an SAE folder that adds them (see the module docstring)."""
    n, d_in = vectors.shape
    norms = vectors.norm(dim=-1)
    cfg = SAEConfig(architecture="jumprelu", d_in=d_in, d_sae=n, hook_name=hook_name, model_name="diff-means")
    SAE(cfg, {"W_enc": torch.zeros(d_in, n), "b_enc": torch.zeros(n), "W_dec": vectors / norms[:, None],
              "b_dec": torch.zeros(d_in), "threshold": torch.ones(n)}).save(out)
    save_file({"max_activation": norms.contiguous(), "frequency": torch.zeros(n), "mean_activation": torch.zeros(n)},
              str(out / STATS_FILENAME))
    (out / CATALOGUE_FILENAME).write_text(json.dumps(
        [{"id": i, "label": label, "max_activation": float(norms[i]), "frequency": 0.0, "mean_activation": 0.0,
          "top_tokens": [], "top_contexts": []} for i, label in enumerate(labels)], ensure_ascii=False))
