"""How hard to push a feature: a sweep of clamp strengths, and the recommended strength it gives.

    python -m steer_plugin.training.strengths --sae sae_weights/NAME [--features 10]

Swept: the `--features` features with the highest `steered_mass` (see output_score.py), and the top
search hits of the concepts in efficacy.py (what users look for). Each is clamped (`set`, unit max)
at every strength of `--strengths` on the tuning prompts below, which the efficacy and comparison
runs never use. A reply shows the feature when it contains one of the feature's words: the words
its clamp promotes (`steered_tokens`) and the words it fires on (`top_tokens`), less function
words and words the unsteered replies to the same prompts contain.

The recommended strength is, among the strengths whose replies stay fluent (median perplexity
under the unsteered model at most 3× that of unsteered replies, and at least 80 % distinct word
trigrams), the one at which most replies show the feature (the lowest of equals); none where no
strength is fluent or none shows it in at least half the replies. Written into the catalogue per
feature: `recommended_strength` and `sweep` (per strength: rate, median perplexity, distinct trigrams).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from steer_plugin.catalogue import STOPWORDS, FeatureCatalogue, singular
from steer_plugin.config import default_model_dir
from steer_plugin.sae import CATALOGUE_FILENAME
from steer_plugin.training.steering_eval import Bench, Job, median, summarise

TUNING_PROMPTS = (
    "What are you up to today?", "Write two sentences about anything you like.", "What is on your mind?",
    "Describe your perfect afternoon.",
)
"""Prompts the strengths are tuned on (kept apart from efficacy.NEUTRAL_PROMPTS and the journey's)."""
STRENGTHS = (1.0, 1.25, 1.5, 2.0, 3.0)
"""Clamp strengths swept (× max, `set`): replies of the 135M default model stay fluent up to about
1.5× and break down past 3× (measured 2026-12-02; a grid of 2/3/5× found a fluent effective strength
for 3 of 37 features)."""
MAX_PPL_RATIO = 3.0
MIN_TRIGRAMS = 0.8
MIN_RATE = 0.5


def _words(text: str) -> set[str]:
    return {singular(w) for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 3}


def feature_words(entry: dict, unsteered: set[str] = frozenset(), steered: int = 5, fired: int = 3) -> list[str]:
    """The words a reply steered by this feature is expected to contain (lower case, singular): from
    what its clamp promotes and what it fires on, less function words and less the words unsteered
    replies use anyway (`unsteered`), which would show nothing about the feature."""
    tokens = [t["token"] for t in entry.get("steered_tokens", [])[:steered]]
    tokens += [t["token"] for t in entry.get("top_tokens", [])[:fired]]
    return sorted(set().union(*map(_words, tokens)) - STOPWORDS - unsteered) if tokens else []


def control_prompts(prompts: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Each prompt's PMI control: the next prompt of the list."""
    return {p: prompts[(i + 1) % len(prompts)] for i, p in enumerate(prompts)}


def recommend(cells: dict[float, dict], baseline_ppl: float) -> float | None:
    fluent = [(s, c) for s, c in sorted(cells.items())
              if c["median_ppl"] <= MAX_PPL_RATIO * baseline_ppl and c["distinct_trigrams"] >= MIN_TRIGRAMS]
    if not fluent:
        return None
    strength, cell = max(fluent, key=lambda sc: (sc[1]["concept_rate"], -sc[0]))
    return strength if cell["concept_rate"] >= MIN_RATE else None


def swept_features(entries: list[dict], top: int, queries: list[str], hits: int = 1) -> list[int]:
    ranked = sorted((e for e in entries if e.get("steered_tokens")), key=lambda e: -e.get("steered_mass", 0.0))
    chosen = [e["id"] for e in ranked[:top]]
    catalogue = FeatureCatalogue(entries)
    for query in queries:
        chosen += [e["id"] for e, _ in catalogue.search(query, hits)[0]]
    return sorted(set(chosen))


def sweep(bench: Bench, sae_id: str, entries: list[dict], features: list[int],
          strengths: tuple[float, ...] = STRENGTHS) -> dict:
    """Runs the sweep and writes `recommended_strength` and `sweep` into the entries."""
    control = control_prompts(TUNING_PROMPTS)
    baseline = bench.run([Job(p) for p in TUNING_PROMPTS], control)
    baseline_ppl = median([j.perplexity for j in baseline])
    said_anyway = set().union(*(_words(j.text) for j in baseline))
    words = {f: feature_words(entries[f], said_anyway) for f in features}
    for f in features:
        if not words[f]:  # nothing to look for in a reply: not measurable
            entries[f].update(sweep=None, recommended_strength=None)
    measured = [f for f in features if words[f]]
    jobs = [Job(p, ((sae_id, f, s, "max"),)) for f in measured for s in strengths for p in TUNING_PROMPTS]
    judged = bench.run(jobs, control)
    n = len(TUNING_PROMPTS)
    for i, feature in enumerate(measured):
        cells = {}
        for j, strength in enumerate(strengths):
            start = (i * len(strengths) + j) * n
            cells[strength] = summarise(judged[start:start + n], words[feature])
        entries[feature]["sweep"] = {f"{s:g}": {k: round(v, 3) for k, v in c.items() if k != "example"}
                                     for s, c in cells.items()}
        entries[feature]["sweep_words"] = words[feature]
        entries[feature]["recommended_strength"] = recommend(cells, baseline_ppl)
    return {"baseline_median_ppl": baseline_ppl, "features": len(features),
            "recommended": sum(entries[f]["recommended_strength"] is not None for f in features)}


def main(argv: list[str] | None = None) -> dict:
    from steer_plugin.training.efficacy import CONCEPTS, JOURNEY

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", type=Path, required=True)
    p.add_argument("--model-dir", default=str(default_model_dir()))
    p.add_argument("--features", type=int, default=0, help="also the N features of highest steered_mass")
    p.add_argument("--strengths", default=",".join(f"{s:g}" for s in STRENGTHS))
    p.add_argument("--hits", type=int, default=1, help="top search hits swept per concept and journey query")
    args = p.parse_args(argv)
    path = args.sae / CATALOGUE_FILENAME
    entries = json.loads(path.read_text())
    features = swept_features(entries, args.features, list(CONCEPTS) + list(JOURNEY), args.hits)
    bench = Bench(args.model_dir, [{"path": str(args.sae.resolve()), "id": "sae"}],
                  cache=args.sae / ".steering_replies.json", own_process=True)
    try:
        report = sweep(bench, "sae", entries, features, tuple(float(s) for s in args.strengths.split(",")))
    finally:
        bench.close()
    path.write_text(json.dumps(entries, ensure_ascii=False, indent=0))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
