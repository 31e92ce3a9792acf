"""Concept clamps: several features of an SAE clamped together so that what they add points along a
concept, with a strength measured on real replies. Written to `concepts.json` next to the SAE and
served by `/v1/concepts` (steer_plugin/search/concepts.py).

    python -m steer_workbench.concepts --sae sae_weights/NAME              # the default concepts
    python -m steer_workbench.concepts --sae sae_weights/NAME --concept "tea:tea,teapot"  # add your own
    python -m steer_workbench.concepts --sae sae_weights/NAME --retune     # doses and scopes only

Why several: at SmolLM2-135M's scale an SAE latent is a token-level feature, and the direction that
makes the model talk about a concept is spread over many of them; a one-feature clamp carries only
a part of it and loops before the concept shows (docs/reports/layer-scan-2026-12-04.md).

For each concept (a name and the keywords that show it in a reply):
1. **Text about it**: the model's own replies to `WRITING_PROMPTS` about the concept, from the
   real engine (steering_eval.DECODING; prompts no evaluation uses).
2. **Its direction**: the mean residual stream at the SAE's layer over those replies' tokens minus
   the mean over the replies about the other concepts that name none of its keywords (a one-vs-rest
   difference of means on the traffic's own kind of text, AxBench's DiffMean). `split_half`: the
   cosine between the directions from alternate halves of the replies (how much of it is signal).
3. **Its features**: orthogonal matching pursuit over the decoder rows: `--features` times, the row
   best aligned with what the chosen rows do not yet explain joins them, and the weights are refit by
   least squares. Each feature is clamped with `mode: add` (unit absolute): the clamps together add
   exactly the weighted sum of their rows (the SAE's error term is kept), a direction a set of
   labelled features spells out. `cosine`: how much of the direction that sum carries.
4. **Its strength**: the sum scaled to α × the layer's median stream norm, α and the token scope
   among `DOSE_GRID` (`DOSES` on every position or the generated ones, `PROMPT_DOSES` on the
   prompt's) tuned on the strength sweep's prompts by the sweep's rule
   (strengths.recommend: the most replies naming the concept among fluent settings); concepts with
   no fluent setting at which half the replies name it get `recommended_dose: null`.

Also writes `concept_directions.safetensors` (directions.py: the directions and the median norm),
from which the comparison in efficacy.py builds its difference-of-means vectors for the same
concepts. Concepts of your own (`--concept`) are contrasted with the default ones and added to both
files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from steer_plugin.core.catalogue_schema import validate_concepts
from steer_plugin.search.concepts import CONCEPTS_FILENAME, clamps_at
from steer_plugin.core.config import default_model_dir
from steer_plugin.core.files import replaced_on_success
from steer_plugin.search.catalogue import read_entries
from steer_plugin.core.sae import SAE
from steer_workbench.capture import load_hf_model
from steer_workbench.diff_means import LayerSums, stream_sums
from steer_workbench.directions import DIRECTIONS_FILENAME, save_directions
from steer_workbench.protocols import CONCEPTS, DOSE_GRID, DOSES, JOURNEY, PROMPT_DOSES, SWEEP_PROMPTS
from steer_workbench.steering_eval import Bench, Job, count_mentions
from steer_workbench.strengths import recommend, sweep_record, tuned_cells

WRITING_PROMPTS = (
    "Write a short paragraph about {}.", "Tell me some interesting facts about {}.", "Describe {} to a child.",
    "What do people love about {}?", "Write a diary entry about a day spent with {}.",
    "Give me three tips about {}.", "Write a short poem about {}.", "What is the history of {}?",
    "Write a short story in which {} play a big part.", "Explain to a beginner what to know about {}.",
    "Write a product description for a book about {}.", "What are common misconceptions about {}?",
    "Write a letter to a friend about {}.", "Describe a picture of {}.", "Write a news report about {}.",
    "What would a world without {} be like?", "Write a dialogue between two people talking about {}.",
    "List some words related to {} and explain them.", "Write a travel blog entry that features {}.",
    "Why are {} important to many people?", "Write a speech celebrating {}.", "Describe the sounds and smells of {}.",
    "Write a riddle about {} and its answer.", "Tell me a memory someone might have of {}.",
)
"""Prompts whose replies are the text about a concept ({} is its name)."""
WRITING_TOKENS = 128
"""Tokens per reply about a concept. A difference of means over a few short replies is mostly noise
(its halves' directions disagree: `split_half`), so each concept gets all of WRITING_PROMPTS at this
length; longer replies drift off their subject and give worse directions
(docs/reports/concept-clamps-2026-12-04.md)."""
FEATURES = 32
"""Features per concept clamp: the request contract's default limit. Matching pursuit carries more
of a concept's direction with more features, and more concepts get a fluent dose at 32 than at 16
(docs/reports/concept-clamps-2026-12-04.md)."""


def reply_streams(model, tokenizer, conversations: list[tuple[str, str]], layer: int) -> LayerSums:
    """(user turn, reply) pairs -> the stream at the layer's output over each reply's tokens (summed
    per pair; every 8th token kept as a sample)."""
    rows, starts = [], []
    for prompt, reply in conversations:
        prefix = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                         add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        rows.append(prefix + tokenizer(reply, add_special_tokens=False)["input_ids"])
        starts.append(len(prefix))
    return stream_sums(model, rows, [layer], starts=starts, sample_every=8)[layer]


def one_vs_rest(sums: torch.Tensor, counts: torch.Tensor, about: list[str], replies: list[str],
                concepts: dict[str, list[str]]) -> torch.Tensor:
    """sums [replies, d] (float64), counts [replies]; about[r]: the concept reply r was asked about ->
    [concepts, d] float32: per concept, the mean over its replies' tokens minus the mean over the other
    concepts' replies that name none of its keywords (so "the ocean" is not contrasted with "the sea")."""
    vectors = []
    for name, keywords in concepts.items():
        own = torch.tensor([a == name for a in about])
        rest = torch.tensor([a != name and count_mentions(r, keywords) == 0 for a, r in zip(about, replies)])
        vectors.append((sums[own].sum(0) / counts[own].sum() - sums[rest].sum(0) / counts[rest].sum()).float())
    return torch.stack(vectors)


def pursue(W_dec: torch.Tensor, direction: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor, float]:
    """Orthogonal matching pursuit. W_dec: [d_sae, d] decoder rows, direction: [d] -> (k feature ids,
    weights [k] with sum_i w_i W_dec[i] the least-squares fit of the direction on those rows, cosine
    of that fit with the direction)."""
    unit_rows = W_dec / W_dec.norm(dim=-1, keepdim=True)  # [d_sae, d]
    chosen: list[int] = []
    residual = direction
    weights = torch.zeros(0)
    for _ in range(k):
        scores = (unit_rows @ residual).abs()
        scores[chosen] = -1.0
        chosen.append(int(scores.argmax()))
        rows = W_dec[chosen]  # [m, d]
        weights = torch.linalg.lstsq(rows.T, direction[:, None]).solution[:, 0]  # [m]
        residual = direction - weights @ rows
    fit = weights @ W_dec[chosen]
    return chosen, weights, float(torch.nn.functional.cosine_similarity(fit, direction, dim=0))


def concept_jobs(entry: dict, prompts, sae_id: str, dose: float, tokens: str) -> list[Job]:
    """The prompts, each with the concept clamp at a dose on a token scope (`add`, absolute)."""
    clamps = tuple((sae_id, c["feature"], c["value"], "absolute", "add") for c in clamps_at(entry, dose, tokens))
    return [Job(p, clamps, tokens=tokens) for p in prompts]


def build(sae: SAE, labels: list[str], model_dir: str, bench: Bench, concepts: dict[str, list[str]], k: int,
          only: set[str] | None = None, layer: int | None = None) -> tuple[list[dict], dict[str, torch.Tensor], float]:
    """The concept clamps of `only` (default: all the concepts; the others are the contrast), untuned
    (no recommended dose yet), their directions by name, and the median stream norm at the SAE's
    layer (`layer`, where the SAE's files do not say it)."""
    pairs = [(template.format(name), name) for name in concepts for template in WRITING_PROMPTS]
    replies = [j.text for j in bench.run([Job(p, max_tokens=WRITING_TOKENS) for p, _ in pairs], fluency=False)]
    model, tokenizer = load_hf_model(model_dir)
    sums, counts, _, sample = reply_streams(model, tokenizer, [(p, r) for (p, _), r in zip(pairs, replies)],
                                            sae.cfg.layer if layer is None else layer)
    about = [name for _, name in pairs]
    directions = one_vs_rest(sums, counts, about, replies, concepts)  # [concepts, d]
    halves = [one_vs_rest(sums[part], counts[part], [about[i] for i in part], [replies[i] for i in part], concepts)
              for part in (torch.arange(0, len(pairs), 2), torch.arange(1, len(pairs), 2))]
    split_half = torch.nn.functional.cosine_similarity(*halves, dim=-1)  # [concepts]
    median_norm = float(sample.norm(dim=-1).median())  # over the sample: the unit the shipped clamps use
    # The SAE adds a clamp's decoder row times its normalisation's scale (1 unless it normalises):
    # the weights are divided by that scale so the clamps add the fit in stream units.
    scale = float(sae.normalize(sample)[1].scale.expand(len(sample), 1).median())
    entries, kept = [], {}
    for (name, keywords), direction, agreement in zip(concepts.items(), directions, split_half):
        if only is not None and name not in only:
            continue
        chosen, weights, cosine = pursue(sae.W_dec, direction, k)
        unit = median_norm / float((weights @ sae.W_dec[chosen]).norm()) / scale
        entries.append({"concept": name, "keywords": keywords, "cosine": round(cosine, 3),
                        "split_half": round(float(agreement), 3),
                        "direction_norm": round(float(direction.norm()), 3),
                        "features": [{"feature": f, "label": labels[f], "unit_value": round(float(w) * unit, 5)}
                                     for f, w in zip(chosen, weights)]})
        kept[name] = direction
    return entries, kept, median_norm


def tune(bench: Bench, entries: list[dict], sae_id: str, grid=DOSE_GRID) -> dict:
    """Sweeps each entry over the (dose, token scope) `grid` on the tuning prompts and writes `recommended_dose`,
    `recommended_tokens`, `recommended_sampling`, `feature_clamps` (at that setting) and `sweep` into it."""
    by_name = {e["concept"]: e for e in entries}
    cells, baseline_ppl = tuned_cells(
        bench, lambda key, prompts: (concept_jobs(by_name[key[0]], prompts, sae_id, *key[1:]), by_name[key[0]]["keywords"]),
        list(by_name), grid)
    for e in entries:
        e["sweep"] = sweep_record(cells[e["concept"]])
        dose, tokens = recommend(cells[e["concept"]], baseline_ppl) or (None, None)
        e.update(recommended_dose=dose, recommended_tokens=tokens,
                 recommended_sampling=None if dose is None else bench.sampling,
                 feature_clamps=None if dose is None else clamps_at(e, dose, tokens))
    return {"baseline_median_ppl": baseline_ppl, "concepts": len(entries),
            "recommended": sum(e["recommended_dose"] is not None for e in entries)}


def default_concepts() -> dict[str, list[str]]:
    """The efficacy run's concepts and the journey's queries (one entry per name)."""
    return CONCEPTS | {q: k for q, k in JOURNEY.items() if q not in CONCEPTS}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", type=Path, required=True)
    p.add_argument("--model-dir", default=str(default_model_dir()))
    p.add_argument("--features", type=int, default=FEATURES, help="features per concept clamp")
    p.add_argument("--concept", action="append", default=[], metavar="NAME:KEYWORD,KEYWORD",
                   help="a concept of your own (repeatable): its name and the words that show it in a reply; "
                        "built and added to the SAE's concepts.json (without any: the default concepts, "
                        "those of the efficacy run and the journey, all rebuilt)")
    p.add_argument("--retune", action="store_true",
                   help="keep the concept clamps concepts.json holds (features and weights) and only tune their dose "
                        "and token scope again over DOSE_GRID")
    args = p.parse_args(argv)
    if args.retune and args.concept:
        p.error("--retune tunes what concepts.json holds; build new concepts without it")
    own = {}
    for spec in args.concept:
        name, _, words = spec.partition(":")
        own[name.strip()] = [w.strip().lower() for w in (words or name).split(",") if w.strip()]
    sae_dir = args.sae.resolve()
    path = sae_dir / CONCEPTS_FILENAME
    started = time.time()
    bench = Bench(args.model_dir, [{"path": str(sae_dir), "id": "sae"}], cache=sae_dir / ".steering_replies.json",
                  own_process=True)
    if args.retune:
        built = json.loads(path.read_text())
        try:
            report = tune(bench, built["concepts"], "sae")
        finally:
            bench.close()
        _write(path, built["concepts"], built["features_per_concept"], report, started)
        return report
    sae = SAE.load(sae_dir)
    labels = [e["label"] for e in read_entries(sae_dir)]
    # Your own concepts are contrasted with the default ones too, and join the file's entries.
    try:
        entries, directions, median_norm = build(sae, labels, args.model_dir, bench, default_concepts() | own,
                                                 args.features, set(own) or None)
        report = tune(bench, entries, "sae")
    finally:
        bench.close()
    if own:
        add_concepts(path, entries, directions, median_norm, sae.cfg.layer, args.features, report, started)
    else:
        save_directions(sae_dir / DIRECTIONS_FILENAME, directions, median_norm, sae.cfg.layer)
        _write(path, entries, args.features, report, started)
    return report


def add_concepts(path: Path, entries: list[dict], directions: dict[str, torch.Tensor], median_norm: float,
                 layer: int, features: int, report: dict, started: float) -> None:
    """Concept clamps built for concepts of one's own, written into the concepts.json at `path` (those
    of the same names replaced, the others kept) and their directions beside it."""
    kept = [e for e in json.loads(path.read_text())["concepts"]
            if e["concept"] not in {n["concept"] for n in entries}] if path.is_file() else []
    save_directions(path.parent / DIRECTIONS_FILENAME, directions, median_norm, layer)
    _write(path, kept + entries, features, report, started)


def _write(path: Path, entries: list[dict], features: int, report: dict, started: float) -> None:
    data = validate_concepts(  # the schema the server reads it with
        {"date": time.strftime("%Y-%m-%d"), "features_per_concept": features, "doses": list(DOSES),
         "prompt_doses": list(PROMPT_DOSES),
         "tuning_prompts": list(SWEEP_PROMPTS), "writing_prompts": list(WRITING_PROMPTS),
         "baseline_median_ppl": report["baseline_median_ppl"], "concepts_built": len(entries),
         "recommended": sum(e["recommended_dose"] is not None for e in entries),
         "seconds": round(time.time() - started), "concepts": entries})
    with replaced_on_success(path) as written:  # the server reads it: never a truncated one
        written.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
