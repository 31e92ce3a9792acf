"""Does clamping a concept feature make the model talk about the concept? Measured, not asserted.

    python -m steer_workbench.efficacy --sae sae_weights/NAME [--work DIR]

Run after the strength sweep (strengths.py), which writes each steerable feature's recommended
strength and token scope into the catalogue. Its parts, all through the real vLLM engine with the plugin
(decoding: steering_eval.DECODING), on prompts the sweep never saw:

- **Efficacy**: for each concept of `CONCEPTS` (a keyword list a reader recognises), the top `--candidates`
  search hits (`/v1/features?q=`, steerable features first) that have a recommended strength, and
  those of the `--aligned` features best aligned with the concept's direction (the strength sweep's
  `--aligned`), are clamped at it (on its recommended scope) on `NEUTRAL_PROMPTS`. A feature meets the bar when its concept goes from <= 10 %
  of unsteered replies to >= 60 % with median reply perplexity (under the unsteered model) at most
  3× that of unsteered replies (`BASELINE_MAX`, `STEERED_MIN`, `MAX_PPL_RATIO`).
- **The user's journey**: for everyday words a person would search for (`JOURNEY`), the top search
  hit at its recommended strength, on ordinary questions (`JOURNEY_QUESTIONS`).
- **Concept clamps** (where the SAE ships concepts.json, see concepts.py): the same bar for each
  concept's multi-feature clamp at its recommended dose, and the journey with the concept clamp a
  search returns first (`/v1/features?q=` carries it in `concepts`).
- **A second turn**: the features that meet the bar, clamped as recommended, on the same prompts
  asked as the second user turn of a conversation (`EARLIER_TURN` and the model's own reply to it
  before them): what a chat client sends, where a clamp on the `all` or `prompt` scope also acts on
  the earlier turns.
- **Side by side** (`--compare`): per concept, the top feature hit and the concept clamp against
  prompting (the question plus "Mention {concept} in your answer.") and a difference-of-means vector
  at the same layer, the very direction the concept clamp approximates (concept_directions.safetensors;
  dose and scope tuned on the sweep's prompts by the sweep's rule); concept rate, fluency and whether
  the reply still answers the question (steering_eval.py).

Writes efficacy.json/.md (and comparison.json/.md; the markdown by efficacy_report.py) next to the SAE. Run concepts.py first for the
concept clamps and the comparison. The concepts, prompts and bars are those of protocols.py.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from steer_plugin.search.catalogue import FeatureCatalogue
from steer_plugin.search.concepts import ConceptBook
from steer_plugin.core.config import default_model_dir
from steer_plugin.core.sae import SAE, load_config
from steer_workbench.concepts import concept_jobs
from steer_workbench.diff_means import write_vector_sae
from steer_workbench.directions import DIRECTIONS_FILENAME, aligned_features, alignment, load_directions
from steer_workbench.efficacy_report import comparison_markdown, efficacy_markdown
from steer_workbench.protocols import (BASELINE_MAX, CONCEPTS, DOSE_GRID, JOURNEY, JOURNEY_QUESTIONS, MAX_PPL_RATIO,
                                       NEUTRAL_PROMPTS, STEERED_MIN)
from steer_workbench.steering_eval import Bench, Job, feature_jobs, median, mention_rate, summarise
from steer_workbench.strengths import recommend, tuned_cells

EARLIER_TURN = "Can you help me plan my week?"
"""The user turn before each neutral prompt in `second_turn` (about nothing in CONCEPTS)."""
REPORT_HEADER = ("date", "max_tokens", "decoding", "protocol")
"""What comparison.json repeats of efficacy.json besides the comparison (its markdown needs them)."""


def control_prompts(prompts: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Each prompt's PMI control: the next prompt of the list."""
    return {p: prompts[(i + 1) % len(prompts)] for i, p in enumerate(prompts)}


def _clamped(entry: dict, prompts, sae_id: str = "sae", setting: tuple[float, str] | None = None) -> list[Job]:
    """The prompts, each with the feature clamped at a (strength, token scope): its recommended one
    unless one is given."""
    strength, tokens = setting or (entry["recommended_strength"], entry.get("recommended_tokens") or "all")
    return feature_jobs(prompts, sae_id, entry["id"], strength, tokens)


def _summaries(bench: Bench, groups: list[tuple[list[Job], list[str]]], control: dict[str, str]) -> list[dict]:
    """One summary per group of jobs (judged by the group's keywords), all answered in one engine
    batch: the engine is many times faster on one large batch than on many small ones."""
    judged = bench.run([job for jobs, _ in groups for job in jobs], control)
    cells, at = [], 0
    for jobs, keywords in groups:
        cells.append(summarise(judged[at:at + len(jobs)], keywords))
        at += len(jobs)
    return cells


def top_concept(book: ConceptBook, query: str) -> dict | None:
    """The first concept clamp a search for the query returns, where it has a recommended dose."""
    hits = book.search(query)
    return hits[0] if hits and hits[0].get("recommended_dose") is not None else None


def _concept_clamped(entry: dict, prompts) -> list[Job]:
    return concept_jobs(entry, prompts, "sae", entry["recommended_dose"], entry["recommended_tokens"])


def _concept_setting(entry: dict) -> dict:
    return {"concept_clamp": entry["concept"], "features": len(entry["features"]), "cosine": entry["cosine"],
            "dose": entry["recommended_dose"], "tokens": entry["recommended_tokens"]}


def _steers(row: dict, baseline_ppl: float) -> bool:
    """Most replies name the concept, fluently."""
    return row["concept_rate"] >= STEERED_MIN and row["median_ppl"] <= MAX_PPL_RATIO * baseline_ppl


def _at_bar(row: dict, baseline_ppl: float) -> bool:
    """The efficacy bar: the concept rare unsteered, and the clamp steers to it."""
    return row["baseline_mention_rate"] <= BASELINE_MAX and _steers(row, baseline_ppl)


def candidates_for(catalogue: FeatureCatalogue, concept: str, hits: int, aligned: list[int]) -> list[tuple[dict, str]]:
    """(entry, how it was found) for the features tried for a concept: its first `hits` steerable search
    hits, then those of the features best aligned with its direction that have a recommended strength."""
    found = [(e, "search") for e in catalogue.steerable_hits(concept, hits)]
    seen = {e["id"] for e, _ in found}
    return found + [(catalogue.entries[f], "alignment") for f in aligned
                    if f not in seen and catalogue.entries[f].get("recommended_strength")]


def efficacy(bench: Bench, catalogue: FeatureCatalogue, candidates: int, book: ConceptBook,
             aligned: dict[str, list[int]] | None = None) -> dict:
    """aligned: per concept, the features best aligned with its direction (directions.aligned_features),
    tried besides its search hits where they have a recommended strength."""
    control = control_prompts(NEUTRAL_PROMPTS)
    baseline = bench.run([Job(p) for p in NEUTRAL_PROMPTS], control)
    baseline_ppl = median([j.perplexity for j in baseline])
    chosen = [(concept, keywords, entry, how) for concept, keywords in CONCEPTS.items()
              for entry, how in candidates_for(catalogue, concept, candidates, (aligned or {}).get(concept, []))]
    clamps = {c: e for c in CONCEPTS if (e := top_concept(book, c)) is not None}
    cells = iter(_summaries(bench, [(_clamped(entry, NEUTRAL_PROMPTS), keywords) for _, keywords, entry, _ in chosen]
                            + [(_concept_clamped(e, NEUTRAL_PROMPTS), CONCEPTS[c]) for c, e in clamps.items()], control))
    base_rate = {concept: mention_rate(baseline, keywords) for concept, keywords in CONCEPTS.items()}
    rows = [{"concept": concept, "feature": entry["id"], "label": entry["label"], "found_by": how,
             "strength_x_max": entry["recommended_strength"], "tokens": entry.get("recommended_tokens") or "all",
             "baseline_mention_rate": base_rate[concept], **next(cells)} for concept, _, entry, how in chosen]
    concept_rows = [{"concept": c, **_concept_setting(e), "baseline_mention_rate": base_rate[c], **next(cells)}
                    for c, e in clamps.items()]
    meeting = [r for r in rows if _at_bar(r, baseline_ppl)]
    return {"baseline_median_ppl": baseline_ppl,
            "baseline_distinct_trigrams": sum(j.trigrams for j in baseline) / len(baseline),
            "baseline_answers": sum(j.pmi > 0 for j in baseline) / len(baseline),
            "features_meeting_bar": sorted({r["feature"] for r in meeting}),
            "concepts_meeting_bar": sorted({r["concept"] for r in meeting}), "results": rows,
            "concept_clamps": {"concepts": len(CONCEPTS), "with_clamp": len(concept_rows),
                               "meeting_bar": [r["concept"] for r in concept_rows if _at_bar(r, baseline_ppl)],
                               "results": concept_rows}}


def second_turn(bench: Bench, report: dict) -> dict:
    """The features of an efficacy report that meet the bar, each at its recommended setting, on
    NEUTRAL_PROMPTS asked after EARLIER_TURN and the unsteered model's reply to it, judged by the
    same bar against unsteered second turns."""
    control = control_prompts(NEUTRAL_PROMPTS)
    history = (("user", EARLIER_TURN), ("assistant", bench.run([Job(EARLIER_TURN)], fluency=False)[0].text))
    baseline = bench.run([Job(p, history=history) for p in NEUTRAL_PROMPTS], control)
    baseline_ppl = median([j.perplexity for j in baseline])
    first = [r for r in report["results"] if _at_bar(r, report["baseline_median_ppl"])]
    cells = _summaries(bench, [([replace(j, history=history) for j in feature_jobs(NEUTRAL_PROMPTS, "sae", r["feature"],
                                                                                 r["strength_x_max"], r["tokens"])],
                                CONCEPTS[r["concept"]]) for r in first], control)
    rows = [{"concept": r["concept"], "feature": r["feature"], "strength_x_max": r["strength_x_max"], "tokens": r["tokens"],
             "first_turn_rate": r["concept_rate"], "baseline_mention_rate": mention_rate(baseline, CONCEPTS[r["concept"]]),
             **cell} for r, cell in zip(first, cells)]
    meeting = [r for r in rows if _at_bar(r, baseline_ppl)]
    return {"earlier_turn": EARLIER_TURN, "baseline_median_ppl": baseline_ppl, "features": len(rows),
            "features_meeting_bar": len(meeting), "concepts_meeting_bar": sorted({r["concept"] for r in meeting}),
            "results": rows}


def journey(bench: Bench, catalogue: FeatureCatalogue, book: ConceptBook) -> dict:
    """Per query: the top feature hit at its recommended strength and the top concept clamp at its
    recommended dose, and which of the two the search offers first (`first_offered`): the concept
    clamp where one has a dose (the reply of /v1/features?q= carries it above the features, and the
    playground lists it first), else the top feature hit. What a user who searches and clamps the
    first result gets."""
    control = control_prompts(JOURNEY_QUESTIONS)
    baseline = bench.run([Job(p) for p in JOURNEY_QUESTIONS], control)
    baseline_ppl = median([j.perplexity for j in baseline])
    tops = {}
    for query in JOURNEY:
        hits, _ = catalogue.search(query, 1)
        tops[query] = hits[0][0] if hits else None
    steerable = [q for q, top in tops.items() if top is not None and top.get("recommended_strength")]
    clamps = {q: e for q in JOURNEY if (e := top_concept(book, q)) is not None}
    cells = iter(_summaries(bench, [(_clamped(tops[q], JOURNEY_QUESTIONS), JOURNEY[q]) for q in steerable]
                            + [(_concept_clamped(e, JOURNEY_QUESTIONS), JOURNEY[q]) for q, e in clamps.items()],
                            control))
    feature_cells = {q: next(cells) for q in steerable}
    base_rate = {query: mention_rate(baseline, keywords) for query, keywords in JOURNEY.items()}
    rows = []
    for query in JOURNEY:
        top = tops[query]
        if query not in feature_cells:
            rows.append({"query": query, "feature": top and top["id"], "steerable": False})
        else:
            rows.append({"query": query, "feature": top["id"], "label": top["label"], "steerable": True,
                         "strength_x_max": top["recommended_strength"], "tokens": top.get("recommended_tokens") or "all",
                         "baseline_mention_rate": base_rate[query], **feature_cells[query]})
    concept_rows = [{"query": q, **_concept_setting(e), "baseline_mention_rate": base_rate[q], **next(cells)}
                    for q, e in clamps.items()]
    steered = [r["query"] for r in rows if r["steerable"] and _steers(r, baseline_ppl)]
    concept_steered = [r["query"] for r in concept_rows if _steers(r, baseline_ppl)]
    first = first_offers(list(JOURNEY), set(clamps), set(feature_cells))
    return {"baseline_median_ppl": baseline_ppl, "queries": len(rows), "steered": steered, "results": rows,
            "concept_steered": concept_steered, "concept_results": concept_rows, "first_offered": first,
            "first_steered": first_steered(first, steered, concept_steered)}


def first_offers(queries: list[str], with_clamp: set[str], with_feature: set[str]) -> dict[str, str | None]:
    """Per query, what the search offers first: its concept clamp where one has a dose (`with_clamp`),
    else its top feature hit where that has a recommended strength (`with_feature`), else nothing."""
    return {q: "concept clamp" if q in with_clamp else "feature" if q in with_feature else None for q in queries}


def first_steered(first: dict[str, str | None], steered: list[str], concept_steered: list[str]) -> list[str]:
    """The queries whose first offer (first_offers) steers replies: its row is among the steered ones."""
    of_kind = {"concept clamp": set(concept_steered), "feature": set(steered)}
    return [q for q, kind in first.items() if q in of_kind.get(kind, set())]


def compare(bench: Bench, catalogue: FeatureCatalogue, book: ConceptBook, vectors_id: str,
            vector_concepts: list[str]) -> dict:
    """Per concept: SAE top hit, SAE concept clamp, prompting, diff-of-means (feature i of the vector
    SAE = vector_concepts[i])."""
    control = control_prompts(NEUTRAL_PROMPTS)
    concepts = list(CONCEPTS.items())
    hits = {concept: catalogue.steerable_hits(concept, 1) for concept, _ in concepts}
    clamps = {c: e for c, _ in concepts if (e := top_concept(book, c)) is not None}
    vectors = {c: {"id": i} for i, c in enumerate(vector_concepts)}
    # The SAE's top hits, concept clamps and prompting on the neutral prompts; the vectors at every
    # dose on the tuning prompts, tuned by the sweep's rule; then each vector at its tuned dose.
    groups = [(_clamped(hits[c][0], NEUTRAL_PROMPTS), k) for c, k in concepts if hits[c]]
    groups += [(_concept_clamped(clamps[c], NEUTRAL_PROMPTS), k) for c, k in concepts if c in clamps]
    groups += [([Job(p, instruction=f"Mention {c} in your answer.") for p in NEUTRAL_PROMPTS], k) for c, k in concepts]
    cells = iter(_summaries(bench, groups, control))
    sae_cells = {c: next(cells) for c, _ in concepts if hits[c]}
    concept_cells = {c: next(cells) for c, _ in concepts if c in clamps}
    prompted = {c: next(cells) for c, _ in concepts}
    tuning, tune_base = tuned_cells(
        bench, lambda key, prompts: (_clamped(vectors[key[0]], prompts, vectors_id, key[1:]), CONCEPTS[key[0]]),
        list(vectors), DOSE_GRID)
    settings = {c: recommend(tuning[c], tune_base) for c in vectors}
    tuned = [c for c in vectors if settings[c] is not None]
    vector_cells = dict(zip(tuned, _summaries(
        bench, [(_clamped(vectors[c], NEUTRAL_PROMPTS, vectors_id, settings[c]), CONCEPTS[c]) for c in tuned],
        control)))
    rows = []
    for concept, _ in concepts:
        methods: dict[str, dict] = {}
        if concept in sae_cells:
            top = hits[concept][0]
            methods["SAE clamp"] = {**sae_cells[concept],
                                    "setting": f"feature {top['id']} at {top['recommended_strength']:g}× max, "
                                               f"{top.get('recommended_tokens') or 'all'} tokens"}
        if concept in concept_cells:
            e = clamps[concept]
            methods["SAE concept clamp"] = {**concept_cells[concept],
                                            "setting": f"{len(e['features'])} features (cosine {e['cosine']:.2f}) at "
                                                       f"{e['recommended_dose']:g}× the stream's median norm, "
                                                       f"{e['recommended_tokens']} tokens"}
        methods["prompting"] = {**prompted[concept], "setting": f'"Mention {concept} in your answer."'}
        if concept in vector_cells:
            strength, tokens = settings[concept]
            methods["diff-of-means"] = {**vector_cells[concept],
                                        "setting": f"{strength:g}× the stream's median norm, {tokens} tokens"}
        rows.append({"concept": concept, "methods": methods})
    table = {}
    for method in ("SAE clamp", "SAE concept clamp", "prompting", "diff-of-means"):
        got = [r["methods"][method] for r in rows if method in r["methods"]]
        table[method] = {"concepts": len(got), "mean_concept_rate": sum(c["concept_rate"] for c in got) / len(rows),
                         "concepts_at_60": sum(c["concept_rate"] >= STEERED_MIN for c in got),
                         "median_ppl": median([c["median_ppl"] for c in got]) if got else None,
                         "distinct_trigrams": sum(c["distinct_trigrams"] for c in got) / len(got) if got else None,
                         "answers": sum(c["answers"] for c in got) / len(got) if got else None}
    return {"table": table, "results": rows}


def concept_alignment(catalogue: FeatureCatalogue, book: ConceptBook, cosines, vector_concepts: list[str]) -> list[dict]:
    """Per concept with a vector: how well the top search hit, the best-aligned feature and the concept
    clamp's features together point along the concept's direction (cosines [vectors, d_sae],
    directions.alignment)."""
    rows = []
    for i, concept in enumerate(vector_concepts):
        hits, _ = catalogue.search(concept, 1)
        best = int(cosines[i].argmax())
        clamp = book.search(concept)
        rows.append({"concept": concept, "top_hit": hits[0][0]["id"] if hits else None,
                     "top_hit_cos": round(float(cosines[i, hits[0][0]["id"]]), 3) if hits else None,
                     "best_feature": best, "best_label": catalogue.entries[best]["label"],
                     "best_cos": round(float(cosines[i, best]), 3),
                     "concept_clamp_cos": clamp[0]["cosine"] if clamp else None})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", type=Path, required=True)
    p.add_argument("--model-dir", default=str(default_model_dir()))
    p.add_argument("--candidates", type=int, default=1, help="steerable search hits tried per concept")
    p.add_argument("--aligned", type=int, default=0,
                   help="also the steerable ones of the N features best aligned with each concept's direction")
    p.add_argument("--compare", action="store_true",
                   help="also compare with prompting and with difference-of-means vectors along the concept "
                        "clamps' directions (needs concept_directions.safetensors from concepts.py)")
    args = p.parse_args(argv)
    sae_dir = args.sae.resolve()
    catalogue = FeatureCatalogue.load(sae_dir)
    book = ConceptBook.load(sae_dir)
    saes = [{"path": str(sae_dir), "id": "sae"}]
    if args.compare:
        vector_dir, vector_concepts = _vector_sae(sae_dir)
        saes.append({"path": str(vector_dir), "id": "diffmean"})
    started = time.time()
    bench = Bench(args.model_dir, saes, cache=sae_dir / ".steering_replies.json", own_process=True)
    try:
        report = {"date": time.strftime("%Y-%m-%d"), "max_tokens": bench.max_tokens, "decoding": bench.decoding,
                  "protocol": {"neutral_prompts": len(NEUTRAL_PROMPTS), "journey_questions": len(JOURNEY_QUESTIONS),
                               "concepts": len(CONCEPTS), "search_hits": args.candidates, "aligned": args.aligned},
                  "efficacy": efficacy(bench, catalogue, args.candidates, book,
                                       aligned_features(sae_dir, args.aligned)),
                  "journey": journey(bench, catalogue, book)}
        report["second_turn"] = second_turn(bench, report["efficacy"])
        (sae_dir / "efficacy.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        (sae_dir / "efficacy.md").write_text(efficacy_markdown(report))
        if args.compare:
            report["comparison"] = compare(bench, catalogue, book, "diffmean", vector_concepts)
            report["comparison"]["alignment"] = concept_alignment(
                catalogue, book, alignment(SAE.load(sae_dir), SAE.load(vector_dir).W_dec), vector_concepts)
            (sae_dir / "comparison.json").write_text(json.dumps(
                {k: report[k] for k in REPORT_HEADER} | report["comparison"], indent=1, ensure_ascii=False) + "\n")
            (sae_dir / "comparison.md").write_text(comparison_markdown(report))
    finally:
        bench.close()
    report["seconds"] = round(time.time() - started, 1)
    print(json.dumps({"features": report["efficacy"]["features_meeting_bar"],
                      "concepts": report["efficacy"]["concepts_meeting_bar"],
                      "concept_clamps": report["efficacy"]["concept_clamps"]["meeting_bar"],
                      "journey": report["journey"]["steered"], "journey_concepts": report["journey"]["concept_steered"],
                      "second_turn": report["second_turn"]["features_meeting_bar"],
                      "table": report.get("comparison", {}).get("table")}))
    return report


def _vector_sae(sae_dir: Path) -> tuple[Path, list[str]]:
    """The concepts' directions (concept_directions.safetensors, the ones the concept clamps
    approximate) as difference-of-means vectors at the SAE's layer, as an SAE folder, and the concepts
    of its features in order (those of CONCEPTS)."""
    path = sae_dir / DIRECTIONS_FILENAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run python -m steer_workbench.concepts --sae {sae_dir} first")
    names, directions, median_norm = load_directions(path)
    kept = [i for i, name in enumerate(names) if name in CONCEPTS]
    out = Path.home() / ".cache" / "steer_plugin" / f"diffmean-{sae_dir.name}"
    write_vector_sae(directions[kept], [names[i] for i in kept], load_config(sae_dir).hook_name, median_norm, out)
    return out, [names[i] for i in kept]


if __name__ == "__main__":
    main()
