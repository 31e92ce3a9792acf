"""Difference-of-means steering vectors, served through the plugin as an SAE.

For a concept (keywords), the vector at a layer is the mean residual stream over the tokens of chat
documents (the model's own conversations, `corpus/chats.jsonl`) that name the concept at least
twice, minus the mean over the other documents read (AxBench's DiffMean baseline); position 0, the
attention sink, is left out.

The vectors are written as a SAELens `jumprelu` SAE whose features never fire (zero encoder,
threshold 1) and whose decoder rows are the unit directions; every feature's `max_activation` is the
layer's median stream norm. A clamp `{"sae": "diffmean", "feature": i, "value": s, "unit": "max"}`
then adds the direction with norm s × that median norm at every position it acts on, on the
plugin's own path. Doses in units of the stream's norm (protocols.DOSES) compare across concepts and
layers; the mean differences themselves are far shorter than the stream and differ several-fold
between concepts (docs/reports/layer-scan-2026-12-04.md).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from steer_plugin.search.catalogue import write_entries
from steer_plugin.core.sae import SAE, STATS_FILENAME, SAEConfig
from steer_workbench.capture import load_hf_model, streams
from steer_workbench.corpus import chat_documents
from steer_workbench.steering_eval import count_mentions

MIN_HITS = 2
"""Mentions that make a document positive for a concept."""


def sample_documents(tokenizer, chats: Path, concepts: dict[str, list[str]], ctx: int, min_docs: int,
                     per_concept: int, seed: int = 0) -> tuple[list[list[int]], list[str], dict[str, list[str]]]:
    """(token ids, texts) of the documents to read (up to `per_concept` positive documents per concept
    and as many others), and the concepts with at least `min_docs` positive documents."""
    rng = random.Random(seed)
    token_lists = [tokenizer(d.text, add_special_tokens=False)["input_ids"][:ctx]
                   for d in chat_documents(tokenizer, chats)]
    texts = [tokenizer.decode(ids) for ids in token_lists]
    chosen: set[int] = set()
    kept = {}
    for concept, keywords in concepts.items():
        positive = [i for i, t in enumerate(texts) if count_mentions(t, keywords) >= MIN_HITS]
        if len(positive) >= min_docs:
            kept[concept] = keywords
            chosen.update(rng.sample(positive, min(per_concept, len(positive))))
    others = [i for i in range(len(texts)) if i not in chosen]
    chosen.update(rng.sample(others, min(len(chosen), len(others))))
    order = sorted(chosen)
    return [token_lists[i] for i in order], [texts[i] for i in order], kept


class LayerSums(NamedTuple):
    """What `stream_sums` read at one layer."""

    sums: torch.Tensor  # [docs, d] float64: each document's stream summed over the positions read
    counts: torch.Tensor  # [docs] float64: positions read per document
    median_norm: float  # median norm of the stream over every position read
    sample: torch.Tensor | None  # [positions / sample_every, d]: every sample_every-th position read


@torch.inference_mode()
def stream_sums(model, token_lists: list[list[int]], layers: list[int], batch_size: int = 8,
                starts: list[int] | None = None, sample_every: int = 0) -> dict[int, LayerSums]:
    """Per layer, the stream read from each document's position `starts[i]` on (default 1: position
    0, the attention sink, left out), in one forward per batch stopped after the deepest layer."""
    starts = starts or [1] * len(token_lists)
    d = model.config.hidden_size
    sums = {L: torch.zeros(len(token_lists), d, dtype=torch.float64) for L in layers}
    norms: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    sample: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    counts = torch.tensor([len(t) - s for t, s in zip(token_lists, starts)], dtype=torch.float64)  # [docs]
    batches = streams(model, token_lists, layers, batch_size)
    for batch, mask, caught in tqdm(batches, desc="layer streams", unit="batch",
                                    total=-(-len(token_lists) // batch_size)):
        keep = mask.bool()
        for row, i in enumerate(batch):
            keep[row, :starts[i]] = False
        for L in layers:
            sums[L][torch.tensor(batch)] = (caught[L] * keep[..., None]).double().sum(1)
            read = caught[L][keep]  # [positions, d]
            norms[L].append(read.norm(dim=-1))
            if sample_every:
                sample[L].append(read[::sample_every])
    return {L: LayerSums(sums[L], counts, float(torch.cat(norms[L]).median()),
                         torch.cat(sample[L]) if sample_every else None) for L in layers}


def diff_of_sums(per_doc_sum: torch.Tensor, per_doc_n: torch.Tensor, texts: list[str],
                 concepts: dict[str, list[str]]) -> torch.Tensor:
    """per_doc_sum [docs, d_in] float64: each document's summed activations over per_doc_n [docs] tokens
    -> [concepts, d_in] float32: per concept, the mean over positive documents' tokens − the rest's."""
    vectors = []
    for keywords in concepts.values():
        positive = torch.tensor([count_mentions(t, keywords) >= MIN_HITS for t in texts])
        if not positive.any():
            raise ValueError(f"no document mentions {keywords} {MIN_HITS} times")
        pos = per_doc_sum[positive].sum(0) / per_doc_n[positive].sum()
        neg = per_doc_sum[~positive].sum(0) / per_doc_n[~positive].sum()
        vectors.append((pos - neg).float())
    return torch.stack(vectors)


def write_vector_sae(vectors: torch.Tensor, labels: list[str], hook_name: str, unit: float, out: Path) -> None:
    """vectors: [n, d_in] -> an SAE folder that adds their directions, `unit` (every feature's max
    activation) the norm added by a clamp of value 1 in unit max (see the module docstring)."""
    n, d_in = vectors.shape
    cfg = SAEConfig(architecture="jumprelu", d_in=d_in, d_sae=n, hook_name=hook_name, model_name="diff-means")
    SAE(cfg, {"W_enc": torch.zeros(d_in, n), "b_enc": torch.zeros(n),
              "W_dec": vectors / vectors.norm(dim=-1, keepdim=True), "b_dec": torch.zeros(d_in),
              "threshold": torch.ones(n)}).save(out)
    save_file({"max_activation": torch.full((n,), unit), "frequency": torch.zeros(n), "mean_activation": torch.zeros(n)},
              str(out / STATS_FILENAME))
    write_entries(out, [{"id": i, "label": label, "max_activation": unit, "frequency": 0.0, "mean_activation": 0.0,
                         "top_tokens": [], "top_contexts": []} for i, label in enumerate(labels)])


def chat_vector_saes(model_dir: str, chats: Path, concepts: dict[str, list[str]], layers: list[int], out: Path,
                     ctx: int = 256, min_docs: int = 3, per_concept: int = 40) -> tuple[dict[str, list[str]], dict]:
    """The vectors of the concepts with at least `min_docs` positive chat documents, at each layer, as
    SAE folders `out/L{layer}`; returns those concepts and what was read (documents, tokens, norms)."""
    model, tokenizer = load_hf_model(model_dir)
    token_lists, texts, kept = sample_documents(tokenizer, chats, concepts, ctx, min_docs, per_concept)
    norms = {}
    for layer, (sums, counts, median_norm, _) in stream_sums(model, token_lists, layers).items():
        write_vector_sae(diff_of_sums(sums, counts, texts, kept), list(kept), f"blocks.{layer}.hook_resid_post",
                         median_norm, out / f"L{layer}")
        norms[layer] = median_norm
    return kept, {"documents": len(texts), "tokens": sum(len(t) for t in token_lists), "ctx": ctx,
                  "median_norm": norms}
