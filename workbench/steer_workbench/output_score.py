"""Does amplifying a feature make the model say what the feature is about? An output score per feature.

Arad et al. (2025) found that SAE features split into input features (they fire on a concept) and
output features (raising them makes the model produce it), and that steering works with the
second kind. Per feature i, on neutral reply prefixes where any topic could come next, the last
position's stream at the SAE's layer is clamped as the server clamps it (`set`, unit max, error
term kept: x' = x + (s·max_i − f_i(x))·W_dec[i]) and the next-token distribution is read:

- `output_score` (Arad et al.): with T the 20 tokens the decoder row promotes through the logit
  lens, (1 − min rank of T / |V|) × max probability of T, averaged over prefixes.
- `steered_tokens` (the "TokenChange" label of Gur-Arieh et al. 2025): the tokens whose
  probability rises most, on average over the prefixes and beyond the drift every feature's clamp
  causes (the mean gain over all features), with that gain. Unlike the logit lens it includes what
  the later layers make of the push.
- `steered_mass`: the probability those tokens gain together: how consistently the clamp moves
  the next token whatever the prefix. The highest values tend to belong to features of formatting
  tokens with very large activations, whose clamp at 4x max takes over the distribution with word
  fragments: consistency, not steerability. The strength sweep (strengths.py), which reads real
  replies, is what says whether a feature steers.

Only the last position is steered, so the prefix runs once per batch of features (KV cache) and
each feature costs one token's forward.

    python -m steer_workbench.output_score --sae sae_weights/NAME
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from steer_plugin.core.config import default_model_dir
from steer_plugin.core.sae import SAE, load_max_activations
from steer_workbench.output_labels import rewrite_catalogue

PREFIXES = (
    ("Tell me about your weekend.", "I spent most of the weekend thinking about"),
    ("What should I write my essay on?", "A great topic for your essay would be"),
    ("Describe something you saw today.", "Today I saw"),
    ("What is your favourite thing?", "My favourite thing in the world is"),
)
"""(user turn, start of the reply): places in a chat reply where any topic could come next."""


@torch.inference_mode()
def score_features(sae: SAE, max_act: torch.Tensor, model, tokenizer, strength: float = 4.0, lens_top: int = 20,
                   label_top: int = 10, batch: int = 256, features: list[int] | None = None) -> list[dict]:
    """Per feature (all, or the given ones, in that order): output_score, steered_mass and
    steered_tokens (see the module docstring)."""
    layer = sae.cfg.layer
    W_U = model.get_output_embeddings().weight.float()  # [vocab, d_in]
    ids_all = torch.tensor(features) if features is not None else torch.arange(sae.cfg.d_sae)  # [F]
    gamma = model.model.norm.weight.float()
    lens = torch.cat([((sae.W_dec[ids_all[i:i + 1024]] * gamma) @ W_U.T).topk(lens_top, dim=-1).indices
                      for i in range(0, len(ids_all), 1024)])  # [F, 20]
    vocab = W_U.shape[0]
    n = len(ids_all)
    score = torch.zeros(n)
    gain = torch.zeros(n, vocab)  # mean over prefixes of p_steered − p_clean
    state: dict = {}

    def hook(_module, _inputs, output):
        if "features" not in state:
            return None
        hidden = output[0] if isinstance(output, tuple) else output  # [B, 1, d_in]
        x = hidden[:1, -1]  # every row carries the same prefix: [1, d_in]
        if sae.per_feature:
            f, norm = sae.encode_columns(x, state["features"])  # [1, B]
        else:  # TopK: a feature's activation depends on all the others
            f, norm = sae.encode(x)
            f = f[:, state["features"]]
        target = strength * max_act[state["features"]]  # [B]
        delta = (target - f[0])[:, None] * sae.W_dec[state["features"]] * norm.scale  # [B, d_in]
        hidden = hidden.clone()
        hidden[:, -1] += delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.model.layers[layer].register_forward_hook(hook)
    from transformers import DynamicCache

    try:
        bar = tqdm(total=len(PREFIXES) * n, desc="output score", unit="feature", unit_scale=True)
        for question, reply_start in PREFIXES:
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True) + reply_start
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])  # [1, T]
            state.pop("features", None)
            clean = model(input_ids=ids).logits[0, -1].float().softmax(-1)  # [vocab]
            for start in range(0, n, batch):
                rows = torch.arange(start, min(start + batch, n))  # positions in ids_all
                state.pop("features", None)
                cache = DynamicCache()
                model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
                cache.batch_repeat_interleave(len(rows))
                state["features"] = ids_all[rows]
                logits = model(input_ids=ids[:, -1:].expand(len(rows), 1), past_key_values=cache,
                               use_cache=True).logits[:, -1].float()  # [B, vocab]
                p = logits.softmax(-1)
                lens_logits = logits.gather(1, lens[rows])  # [B, 20]
                # The best-ranked of T is the one with the highest logit: its rank is the min rank.
                rank = (logits > lens_logits.max(-1, keepdim=True).values).sum(-1)  # [B]
                best_p = p.gather(1, lens[rows]).max(-1).values
                score[rows] += (1 - rank.float() / vocab) * best_p / len(PREFIXES)
                gain[rows] += (p - clean) / len(PREFIXES)
                bar.update(len(rows))
        bar.close()
    finally:
        handle.remove()
    # Any push at one position moves some tokens whatever the feature (" probably", " something"):
    # that shared drift, the mean gain over the features scored, is not what this feature says.
    gain -= gain.mean(0, keepdim=True)
    values, tokens = gain.topk(label_top, dim=-1)  # [F, label_top]
    out = []
    for i in range(n):
        out.append({"output_score": round(float(score[i]), 5),
                    "steered_mass": round(float(values[i].clamp_min(0).sum()), 5),
                    "steered_tokens": [{"token": tokenizer.decode([t]), "gain": round(v, 4)}
                                       for v, t in zip(values[i].tolist(), tokens[i].tolist()) if v > 0]})
    return out


def add_output_scores(sae_dir: Path, model_dir: str, strength: float = 4.0) -> list[dict]:
    """Writes the output score fields into the SAE's catalogue (in place) and returns the entries."""
    def add(entries, sae, model, tokenizer):
        scores = score_features(sae, load_max_activations(sae_dir), model, tokenizer, strength)
        for entry, scored in zip(entries, scores, strict=True):
            entry.update(scored)

    return rewrite_catalogue(sae_dir, model_dir, add)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", type=Path, required=True)
    p.add_argument("--model-dir", default=str(default_model_dir()))
    p.add_argument("--strength", type=float, default=4.0, help="clamp value in units of each feature's max")
    args = p.parse_args(argv)
    add_output_scores(args.sae, args.model_dir, args.strength)


if __name__ == "__main__":
    main()
