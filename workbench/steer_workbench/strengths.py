"""How hard to push a feature: a sweep of clamp strengths, and the recommended strength it gives.

    python -m steer_workbench.strengths --sae sae_weights/NAME [--features 10]

Swept: the `--features` features with the highest `steered_mass` (see output_score.py), the top
`--hits` search hits of the concepts and journey queries of protocols.py (what users look for) and
the top hit of each of their keywords ("god" for religion, "puppy" for dogs), the `--aligned`
features best aligned with each concept's direction (directions.aligned_features), and with
`--screen N` the N features per concept whose clamp turns short replies to it in a screen of every
feature (`screened_features`). Each is clamped (`set`, unit max) at every strength of `--strengths`
and on every token scope of `--scopes`, on TUNING_PROMPTS, which the efficacy and comparison runs
never use; with `--prompt-hits N` the first N search hits of each concept and the top hit of each
keyword also at PROMPT_STRENGTHS on the prompt scope. `--keep` keeps the cells the catalogue
holds and runs only the missing ones.
A reply shows the feature when it contains one of the feature's words: the words its clamp promotes
(`steered_tokens`) and the words it fires on (`top_tokens`), less function words, words the unsteered replies to the same prompts contain, and clamp drift (`drift_words`). A
cell's rate is the share of replies that do or, where more, the share by which replies mentioning
one of the concepts of protocols.py (or its everyday searches) exceed unsteered replies: a feature
whose clamp turns replies to a concept is recommended where it does so, whatever its own words.

The recommended setting is, among the strengths and scopes whose replies stay fluent (median
perplexity under the unsteered model at most 3× that of unsteered replies, and at least 80 % distinct
word trigrams), the most fluent of those that show the feature in nearly as many replies as the best
(within NEAR_BEST); none where nothing is fluent or nothing shows it in at least half the replies. A
feature the grid leaves without one, though some strength shows it, gets one more strength halfway
below the lowest such strength, and the grid on the token scopes `--scopes` left out (`refinements`):
the window between showing and breaking is often under a grid step, and clamping only generated
positions keeps replies more fluent. Every cell that could be recommended is then run on the
CONFIRM_PROMPTS too, and the recommendation is made on all 16 replies (`confirmed`): on 8 alone the
best of a feature's cells is often the luckiest. Written into the catalogue per feature:
`recommended_strength`, `recommended_tokens`, `recommended_sampling` (the request's
decoding fields the replies were measured with, steering_eval.DECODING) and `sweep` (per scope and strength: rate,
median perplexity, distinct trigrams and the number of prompts they are over; the perplexity is judged only where at least half the replies
show the feature, null elsewhere), and `steers`: the concepts of protocols.py (and its everyday
searches) that the replies at the recommended setting mention at least MIN_RATE more often than
unsteered replies, with their keywords and rate; a search for such a concept offers the feature first.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from steer_plugin.search.catalogue import STOPWORDS, FeatureCatalogue, read_entries, singular, write_entries
from steer_plugin.core.config import default_model_dir
from steer_workbench.directions import aligned_features
from steer_workbench.protocols import (CONCEPTS, JOURNEY, MAX_PPL_RATIO, MIN_TRIGRAMS, SCOPES, SWEEP_PROMPTS,
                                       TUNING_PROMPTS)
from steer_workbench.steering_eval import Bench, Job, count_mentions, feature_jobs, median, mention_rate, summarise

STRENGTHS = (1.25, 1.5, 1.75, 2.0, 2.5)
"""Clamp strengths swept on SCOPES (× max, `set`): replies of the 135M default model break down
past about 3×, and the features that steer at all first show their concept between 1.25× and 2× and
lose fluency about a quarter step later, so the grid steps by 1/4 over that window rather than by
whole multiples, which step over it (docs/reports/decoding-2026-12-05.md)."""
PROMPT_STRENGTHS = (2.0, 3.0, 5.0, 8.0)
"""Strengths swept on the `prompt` scope (`--prompt-hits`): a clamp on the question's positions only
changes what the model reads, as if the question had been about the feature, and the reply is the
unsteered model's own: fluent far past the strength that wrecks a clamp on every position. Features
that fire on a concept's words (which search finds, and whose clamp on every position seldom steers)
do steer this way, at a few times their max; most turn to nonsense past 8× (docs/reports/steers-2026-12-05.md)."""
MIN_RATE = 0.5
"""A cell shows its feature where at least this share of its replies do (the sweep's candidates)."""
NEAR_BEST = 2 / len(SWEEP_PROMPTS)
"""Cells within this rate of a feature's best count as equal, and the most fluent of them is recommended:
the highest rate alone picks cells at the edge of fluency, which break on other prompts
(docs/reports/recommendation-rule-2026-12-06/)."""
DRIFT_SHARE = 0.01
"""A word among the steered tokens of at least this share of features is clamp drift, not a feature's
own ("something", "probably", "exploring", "music": whatever a clamp pushes the 135M model towards)."""


SCREEN_PROMPTS = ("Write two sentences about anything you like.",)
"""The most open of the tuning prompts: what a reply turns to there is what the clamp brings. One
prompt, as a reply of every feature of an SAE is a long run."""
SCREEN_STRENGTH = 2.0
"""The screen's clamp (× max, `set`, all positions): the top of the window where the features that
steer turn replies to their concept (often past fluency: the sweep finds the fluent strength)."""
SCREEN_TOKENS = 32


SWEEP_FIELDS = ("sweep", "sweep_words", "recommended_strength", "recommended_tokens", "recommended_sampling", "steers")
"""What a sweep writes into a catalogue entry."""


def _words(text: str) -> set[str]:
    return {singular(w) for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 3}


def _steered_words(entry: dict, steered: int = 5) -> set[str]:
    return set().union(*(_words(t["token"]) for t in entry.get("steered_tokens", [])[:steered]))


def drift_words(entries: list[dict]) -> set[str]:
    """The words many features' clamps push towards (see DRIFT_SHARE)."""
    counts: dict[str, int] = {}
    for entry in entries:
        for word in _steered_words(entry):
            counts[word] = counts.get(word, 0) + 1
    return {w for w, n in counts.items() if n >= DRIFT_SHARE * len(entries)}


def feature_words(entry: dict, ignore: set[str] = frozenset(), fired: int = 3) -> list[str]:
    """The words a reply steered by this feature is expected to contain (lower case, singular): from
    what its clamp promotes and what it fires on, less function words and the words in `ignore`
    (those unsteered replies use anyway and clamp drift), which would show nothing about the feature."""
    words = _steered_words(entry).union(*(_words(t["token"]) for t in entry.get("top_tokens", [])[:fired]))
    return sorted(words - STOPWORDS - ignore)


def fluent(cell: dict, baseline_ppl: float) -> bool:
    """A cell's replies stay fluent: judged, median perplexity at most MAX_PPL_RATIO × unsteered, and
    at least MIN_TRIGRAMS distinct word trigrams."""
    return (cell["median_ppl"] is not None and cell["median_ppl"] <= MAX_PPL_RATIO * baseline_ppl
            and cell["distinct_trigrams"] >= MIN_TRIGRAMS)


def candidate(cell: dict, baseline_ppl: float) -> bool:
    """A cell that can be recommended: fluent, and showing the feature in at least MIN_RATE of its replies."""
    return fluent(cell, baseline_ppl) and cell["concept_rate"] >= MIN_RATE


def recommend(cells: dict, baseline_ppl: float):
    """The key (a strength, or a strength and a scope) of the most fluent candidate cell among those
    within NEAR_BEST of the highest rate; None where there is none."""
    candidates = [(key, c) for key, c in cells.items() if candidate(c, baseline_ppl)]
    if not candidates:
        return None
    best = max(c["concept_rate"] for _, c in candidates)
    # stored rates are rounded to 3 decimals (sweep_record): 0.938 - 0.812 is two replies of 16
    near = [kc for kc in candidates if kc[1]["concept_rate"] >= best - NEAR_BEST - 0.002]
    return min(near, key=lambda kc: (kc[1]["median_ppl"], -kc[1]["concept_rate"]))[0]


def confirmed(bench: Bench, cells: dict, jobs_of, baseline_ppl: float, rate=None) -> dict:
    """The candidate cells among `cells` (key -> summary) measured on TUNING_PROMPTS only, measured on
    all SWEEP_PROMPTS (key -> summary, as swept_cells): what `recommend` then chooses among is no longer
    the luck of eight replies. jobs_of(key, prompts) -> (jobs, words) of swept_cells; rate as there."""
    todo = [key for key, c in cells.items() if c["prompts"] < len(SWEEP_PROMPTS)
            and candidate(c, baseline_ppl)]
    return swept_cells(bench, {key: jobs_of(key, SWEEP_PROMPTS) for key in todo}, rate)


def refinements(cells: dict, grid: dict[str, tuple[float, ...]], baseline_ppl: float,
                scopes: tuple[str, ...] = SCOPES) -> list[tuple[float, str]]:
    """Where a feature earns no recommendation but shows in enough replies at a strength that is not
    fluent: per scope swept, the strength halfway between the lowest such strength and the scope's
    `grid` strength below it (1× max below the grid), and the whole grid on the `scopes` not swept. A feature
    that steers at all shows its concept and loses fluency within a quarter step, so the grid alone
    misses a window that half a step finds; clamping only the generated positions keeps replies more
    fluent at every strength. Cells already in `cells` are not repeated."""
    if recommend(cells, baseline_ppl) is not None:
        return []
    keys = []
    swept = sorted({t for _, t in cells})
    for scope in swept:
        shown = sorted(s for (s, t), c in cells.items() if t == scope and c["concept_rate"] >= MIN_RATE)
        if shown:
            below = [s for s in grid[scope] if s < shown[0]]
            keys.append(((below[-1] if below else 1.0) / 2 + shown[0] / 2, scope))
    keys += [(s, t) for t in scopes if t not in swept for s in grid[t]] if keys else []
    return [key for key in keys if key not in cells]


def steered_concepts(replies: list, unsteered: dict[str, float], concepts: dict[str, list[str]]) -> list[dict]:
    """The concepts (name -> keywords) whose keywords the replies mention in at least MIN_RATE more of
    them than unsteered replies to the same prompts do (`unsteered`: name -> that rate), most mentioned
    first: what a search for the concept should offer first (catalogue.py)."""
    rates = {name: mention_rate(replies, keywords) for name, keywords in concepts.items()}
    steered = [{"concept": name, "words": keywords, "rate": rates[name]} for name, keywords in concepts.items()
               if rates[name] - unsteered[name] >= MIN_RATE]
    return sorted(steered, key=lambda c: -c["rate"])


def swept_features(entries: list[dict], top: int, queries: list[str], hits: int = 1, words: list[str] = ()) -> list[int]:
    """The `top` features of highest steered_mass, the first `hits` search hits of each query and the
    first hit of each of `words` (what else a user may type for the same concept)."""
    ranked = sorted((e for e in entries if e.get("steered_tokens")), key=lambda e: -e.get("steered_mass", 0.0))
    chosen = [e["id"] for e in ranked[:top]]
    catalogue = FeatureCatalogue(entries)
    for query, n in [(q, hits) for q in queries] + [(w, 1) for w in words]:
        chosen += [e["id"] for e, _ in catalogue.search(query, n)[0]]
    return sorted(set(chosen))


def screened_features(bench: Bench, sae_id: str, d_sae: int, concepts: dict[str, list[str]], per_concept: int) -> list[int]:
    """Every feature of the SAE clamped at SCREEN_STRENGTH on SCREEN_PROMPTS (SCREEN_TOKENS-token
    replies), ranked by `screen_choice`. Search finds a feature by its words and the output score by
    one token's push; but labels of features that steer are often function words ("of / to / being"
    steers to religion), and only replies show what a clamp does to them."""
    unsteered = bench.run([Job(p, max_tokens=SCREEN_TOKENS) for p in SCREEN_PROMPTS], fluency=False)
    jobs = [j for f in range(d_sae) for j in feature_jobs(SCREEN_PROMPTS, sae_id, f, SCREEN_STRENGTH, max_tokens=SCREEN_TOKENS)]
    replies = bench.run(jobs, fluency=False)
    per = len(SCREEN_PROMPTS)
    return screen_choice([replies[f * per:(f + 1) * per] for f in range(d_sae)], unsteered, concepts, per_concept)


def screen_choice(replies: list[list], unsteered: list, concepts: dict[str, list[str]], per_concept: int) -> list[int]:
    """replies[f]: feature f's replies to the prompts `unsteered` answers. Per concept (name ->
    keywords), up to `per_concept` features whose replies mention it in more of them than the
    unsteered replies do: those mentioning it in more replies, then more often, first."""
    chosen = set()
    for name, keywords in concepts.items():
        base = mention_rate(unsteered, keywords)
        score = [(mention_rate(r, keywords), sum(count_mentions(j.text, keywords) for j in r)) for r in replies]
        ranked = sorted(range(len(replies)), key=score.__getitem__, reverse=True)  # stable: ties by id
        chosen.update(f for f in ranked[:per_concept] if score[f][0] > base)
    return sorted(chosen)


def sweep(bench: Bench, sae_id: str, entries: list[dict], features: list[int],
          strengths: tuple[float, ...] = STRENGTHS, scopes: tuple[str, ...] = SCOPES,
          concepts: dict[str, list[str]] | None = None, prompt_strengths: tuple[float, ...] = (),
          again: bool = False) -> dict:
    """Runs the sweep and writes `recommended_strength`, `recommended_tokens`, `sweep` and, for the
    `concepts` (name -> keywords) the replies at the recommended setting turn to, `steers` into the
    entries. The cells: `strengths` on each of `scopes`, `prompt_strengths` on the prompt scope, and
    the refinements; those an entry's `sweep` already holds are kept, not run again, and take part in
    the recommendation. A cell shows the feature by its own words or, where more, by the concept its replies turn
    to most (share mentioning it less that of unsteered replies), so a feature that steers a concept
    is recommended where it does so, whatever its own words. Perplexity is judged only in cells where
    enough replies show the feature to be recommended; the candidates are `confirmed` before the
    recommendation. again: recommend every feature again from its cells, new or kept (after a change of
    `recommend`), not only those with new cells."""
    concepts = concepts or {}
    baseline = bench.run([Job(p) for p in SWEEP_PROMPTS])
    baseline_ppl = median([j.perplexity for j in baseline])
    tuning = baseline[:len(TUNING_PROMPTS)]  # what the first stage's cells and words are judged against
    ignore = set().union(*(_words(j.text) for j in tuning)) | drift_words(entries)
    words = {f: feature_words(entries[f], ignore) for f in features}
    # A feature with no words of its own (function-word labels) shows only by the concept its replies
    # turn to: without concepts there is nothing to look for in its replies.
    measured = [f for f in features if words[f] or concepts]
    for f in set(features) - set(measured):
        entries[f].update(dict.fromkeys(SWEEP_FIELDS), sweep_words=[])
    unsteered = {n: {name: mention_rate(baseline[:n], keywords) for name, keywords in concepts.items()}
                 for n in (len(TUNING_PROMPTS), len(SWEEP_PROMPTS))}

    def shown(key: tuple, replies: list) -> float:
        return max([mention_rate(replies, words[key[0]])] + [mention_rate(replies, kw) - unsteered[len(replies)][c]
                                                             for c, kw in concepts.items()])

    def jobs_of(key: tuple, prompts: tuple[str, ...] = TUNING_PROMPTS) -> tuple[list[Job], list[str]]:
        return feature_jobs(prompts, sae_id, *key), words[key[0]]

    def run(summaries: dict) -> set[int]:
        """Adds the cells (key (feature, strength, scope) -> summary) to `cells`; the features that got one."""
        for (f, s, t), cell in summaries.items():
            cells[f][s, t] = cell
        return {f for f, _, _ in summaries}

    wanted = [(s, t) for t in scopes for s in strengths] + [(s, "prompt") for s in prompt_strengths]
    cells = {f: stored_cells(entries[f]) for f in measured}
    new = [(f, *key) for f in measured for key in wanted if key not in cells[f]]
    grid = {t: strengths for t in SCOPES} | {"prompt": prompt_strengths or PROMPT_STRENGTHS}
    touched = run(swept_cells(bench, {key: jobs_of(key) for key in new}, shown))
    # Kept cells were refined when they were run: refining them again would bisect deeper at every run.
    ran = {(f, t) for f, _, t in new}
    touched |= run(swept_cells(bench, {(f, s, t): jobs_of((f, s, t)) for f in measured
                                       for s, t in refinements(cells[f], grid, baseline_ppl)
                                       if (f, t) in ran or all(tt != t for _, tt in cells[f])}, shown))
    touched |= run(confirmed(bench, {(f, *key): c for f in measured for key, c in cells[f].items()}, jobs_of,
                             baseline_ppl, shown))
    # A feature without new cells keeps its recommendation and `steers` as they are, unless asked again.
    if again:
        touched |= set(measured)
    settings = {f: recommend(cells[f], baseline_ppl) or (None, None) for f in sorted(touched)}
    steering = [f for f, (strength, _) in settings.items() if strength is not None]
    replies = iter(bench.run([j for f in steering for j in jobs_of((f, *settings[f]), SWEEP_PROMPTS)[0]], fluency=False))
    at_setting = {f: [next(replies) for _ in SWEEP_PROMPTS] for f in steering}
    for feature in measured:
        entries[feature].update(sweep=sweep_record(cells[feature]), sweep_words=words[feature])
    for feature, (strength, tokens) in settings.items():
        entries[feature].update(recommended_strength=strength, recommended_tokens=tokens,
                                recommended_sampling=None if strength is None else bench.sampling,
                                steers=steered_concepts(at_setting[feature], unsteered[len(SWEEP_PROMPTS)], concepts)
                                if strength else [])
    return {"baseline_median_ppl": baseline_ppl, **sweep_counts(entries, features)}


def sweep_record(cells: dict) -> dict:
    """The `sweep` a catalogue or concept entry keeps of its cells keyed (strength or dose, scope): per
    scope, per strength (as "%g"), the rate, median perplexity and distinct trigrams, rounded."""
    return {t: {f"{s:g}": {k: v if v is None else round(v, 3) for k, v in cells[s, tt].items() if k not in ("example", "answers")}
                for s, tt in sorted(cells) if tt == t}
            for t in sorted({t for _, t in cells})}


def stored_cells(entry: dict) -> dict:
    """The cells of an entry's stored `sweep` (sweep_record), keyed (strength, scope) as `sweep` keys them
    (those stored before the confirmation stage: over the TUNING_PROMPTS)."""
    return {(float(s), t): {"prompts": len(TUNING_PROMPTS)} | cell
            for t, by_strength in (entry.get("sweep") or {}).items() for s, cell in by_strength.items()}


def sweep_counts(entries: list[dict], features: list[int]) -> dict:
    """How many of the swept `features` got a recommended strength, and how many steer a concept."""
    return {"features": len(features),
            "recommended": sum(entries[f]["recommended_strength"] is not None for f in features),
            "steering_a_concept": sum(bool(entries[f]["steers"]) for f in features)}


def without_sweeps(entries: list[dict]) -> list[dict]:
    """The catalogue as before any sweep (copies)."""
    return [{k: v for k, v in entry.items() if k not in SWEEP_FIELDS} for entry in entries]


def tuned_cells(bench: Bench, jobs_of, groups: list, grid) -> tuple[dict, float]:
    """Each group (a concept clamp, a steering vector) at each (strength or dose, scope) of `grid`, by
    the sweep's stages: group -> setting -> summary, on TUNING_PROMPTS and `confirmed` on SWEEP_PROMPTS
    (what `recommend` takes); and the unsteered median perplexity on SWEEP_PROMPTS the recommendation
    is judged against. jobs_of((group, *setting), prompts) -> (jobs, words) of swept_cells."""
    baseline_ppl = median([j.perplexity for j in bench.run([Job(p) for p in SWEEP_PROMPTS])])
    cells = swept_cells(bench, {(g, *st): jobs_of((g, *st), TUNING_PROMPTS) for g in groups for st in grid})
    cells |= confirmed(bench, cells, jobs_of, baseline_ppl)
    return {g: {st: cells[(g, *st)] for st in grid} for g in groups}, baseline_ppl


def swept_cells(bench: Bench, cells: dict, rate=None) -> dict:
    """key -> summary of each cell (key -> (jobs, the words its replies are checked for)), all answered
    in one engine batch; perplexity is judged only in cells where at least MIN_RATE of the replies show
    their words (no other cell can be recommended), the scorer's passes costing more than the replies.
    rate(key, replies): the cell's `concept_rate` instead of the share of replies with its words."""
    def summary_of(key, replies: list) -> dict:
        cell = summarise(replies, cells[key][1]) | {"prompts": len(replies)}
        return cell if rate is None else cell | {"concept_rate": rate(key, replies)}

    replies = iter(bench.run([j for jobs, _ in cells.values() for j in jobs], fluency=False))
    summary = {key: summary_of(key, [next(replies) for _ in jobs]) for key, (jobs, _) in cells.items()}
    shown = [key for key, s in summary.items() if s["concept_rate"] >= MIN_RATE]
    judged = iter(bench.run([j for key in shown for j in cells[key][0]]))
    return summary | {key: summary_of(key, [next(judged) for _ in cells[key][0]]) for key in shown}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", type=Path, required=True)
    p.add_argument("--model-dir", default=str(default_model_dir()))
    p.add_argument("--features", type=int, default=0, help="also the N features of highest steered_mass")
    p.add_argument("--strengths", default=",".join(f"{s:g}" for s in STRENGTHS))
    p.add_argument("--scopes", default=",".join(SCOPES))
    p.add_argument("--hits", type=int, default=1, help="top search hits swept per concept and journey query")
    p.add_argument("--aligned", type=int, default=0,
                   help="also the N features best aligned with each concept's direction (concept_directions.safetensors)")
    p.add_argument("--screen", type=int, default=0,
                   help="also screen every feature (one short reply to an open prompt at 2x max) and "
                        "sweep the N whose replies turn to each concept most")
    p.add_argument("--decoding", type=json.loads, default=None,
                   help='sampling fields besides greedy, as JSON (default: steering_eval.DECODING; "{}": plain greedy)')
    p.add_argument("--prompt-hits", type=int, default=0,
                   help="also sweep PROMPT_STRENGTHS on the prompt scope for the first N search hits of each "
                        "concept and the top hit of each keyword (features that fire on a concept's words)")
    p.add_argument("--keep", action="store_true",
                   help="keep the cells the catalogue's sweeps hold (run with the same prompts and decoding) "
                        "and run only the missing ones: widening a sweep without redoing it")
    p.add_argument("--recommend-again", action="store_true",
                   help="with --keep: recommend every swept feature again from its cells (after a change of the "
                        "rule), measuring `steers` at the new setting")
    args = p.parse_args(argv)
    entries = read_entries(args.sae)
    # Candidates are chosen as by a fresh sweep: search must rank them by match, not by an earlier sweep.
    fresh = without_sweeps(entries)
    if not args.keep:
        entries = fresh
    queries = list(CONCEPTS) + list(JOURNEY)
    keywords = sorted({w for words in [*CONCEPTS.values(), *JOURNEY.values()] for w in words})
    features = swept_features(fresh, args.features, queries, args.hits, keywords)
    aligned = aligned_features(args.sae, args.aligned)
    features = sorted(set(features).union(*aligned.values()))
    prompted = swept_features(fresh, 0, queries, args.prompt_hits, keywords) if args.prompt_hits else []
    strengths = tuple(float(s) for s in args.strengths.split(","))
    bench = Bench(args.model_dir, [{"path": str(args.sae.resolve()), "id": "sae"}],
                  cache=args.sae / ".steering_replies.json", own_process=True, decoding=args.decoding)
    try:
        if args.screen:
            features = sorted(set(features).union(
                screened_features(bench, "sae", len(entries), CONCEPTS | JOURNEY, args.screen)))
        report = sweep(bench, "sae", entries, features, strengths, tuple(args.scopes.split(",")), CONCEPTS | JOURNEY,
                       again=args.recommend_again)
        if prompted:
            report = sweep(bench, "sae", entries, prompted, strengths, (), CONCEPTS | JOURNEY, PROMPT_STRENGTHS,
                           again=args.recommend_again)
    finally:
        bench.close()
    write_entries(args.sae, entries)
    report |= sweep_counts(entries, sorted(set(features) | set(prompted))) | {"prompt_scope": len(prompted)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
