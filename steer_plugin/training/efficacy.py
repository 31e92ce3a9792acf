"""Does clamping a concept feature make the model talk about the concept? Measured, not asserted.

    python -m steer_plugin.training.efficacy --sae sae_weights/NAME

For each concept (a keyword list a reader recognises; a keyword also matches its plural), the
`--candidates` catalogue features whose top-activating tokens are most often a keyword are each
clamped (`set`, unit `max`) at several strengths on neutral prompts, through the real vLLM engine
with the plugin. Reported per feature and strength: the fraction of replies that mention the
concept, against the unsteered baseline, and a fluency signal: the perplexity of the reply under
the *unsteered* model. A feature meets the bar when its concept goes from <= 10 % of unsteered
replies to >= 60 % at some strength <= 20x max. Writes efficacy.json and efficacy.md next to the SAE.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from pathlib import Path

from steer_plugin.catalogue import singular
from steer_plugin.config import default_model_dir
from steer_plugin.sae import CATALOGUE_FILENAME

NEUTRAL_PROMPTS = [
    "Tell me about your weekend.", "What is your favourite book?", "How was your day?",
    "What should I do this evening?", "Tell me a short story.", "What do you like to do for fun?",
    "Describe your ideal holiday.", "What is something interesting you learned recently?",
    "Give me some advice for tomorrow.", "What are you thinking about right now?",
    "Describe a place you would like to visit.", "What makes you happy?", "Write a few sentences about anything.",
    "What is the best gift you could receive?", "Tell me about a memorable day.", "What would you cook for a friend?",
    "How would you spend a million dollars?", "What is your favourite season and why?",
    "Tell me something about yourself.", "What did you dream about last night?",
]
CONCEPTS = {  # singular forms: a plural "s"/"es" is matched too
    "dogs": ["dog", "puppy", "puppies", "canine"],
    "cats": ["cat", "kitten", "feline", "kitty"],
    "horses": ["horse", "equine"],
    "birds": ["bird"],
    "fish": ["fish", "fishing"],
    "the sea": ["sea", "ocean", "marine", "wave", "beach", "coast"],
    "rivers": ["river", "stream"],
    "mountains": ["mountain", "mountainous"],
    "football": ["football", "soccer"],
    "music": ["music", "musical", "song", "melody", "singer"],
    "food": ["food", "cooking", "cuisine", "meal"],
    "wine": ["wine"],
    "space": ["planet", "galaxy", "galaxies", "orbit", "astronomy", "star"],
    "war": ["war", "battle", "army", "military", "soldier"],
    "religion": ["god", "church", "religion", "religious"],
    "computers": ["computer", "software"],
    "money": ["money", "currency", "bank"],
    "medicine": ["disease", "medical", "medicine", "doctor", "patient", "surgery", "surgical", "hospital", "nurse"],
    "France": ["france", "french", "paris"],
    "Japan": ["japan", "japanese", "tokyo"],
    "China": ["china", "chinese", "beijing", "shanghai"],
    "trees": ["tree", "forest"],
    "weather": ["rain", "weather", "storm"],
    "fire": ["fire", "flame", "burning"],
    "chemistry": ["chemical", "chemistry", "chemist", "molecule", "atom"],
    "painting": ["painting", "painter"],
    "film": ["film", "movie"],
    "railways": ["railway", "train"],
    "language": ["language", "linguistic"],
    "mathematics": ["mathematics", "mathematical", "equation", "theorem"],
}
STRENGTHS = (2.0, 3.0, 5.0)
PPL_PER_CELL = 4


def _mentions(text: str, keywords: list[str]) -> bool:
    return re.search(r"\b(" + "|".join(map(re.escape, keywords)) + r")(s|es)?\b", text.lower()) is not None


def pick_features(catalogue: list[dict], concepts: dict[str, list[str]], candidates: int) -> list[dict]:
    """Per concept, the features whose top-activating tokens are most often a concept keyword
    (share of the top-token counts, at least 0.25), best first."""
    picked = []
    for concept, keywords in concepts.items():
        wanted = {singular(k) for k in keywords}
        scored = []
        for entry in catalogue:
            counts = entry["top_tokens"]
            total = sum(t["count"] for t in counts)
            hit = sum(t["count"] for t in counts if singular(t["token"].lower().strip(" .,'\"")) in wanted)
            if total and hit / total >= 0.25:
                scored.append((-hit / total, entry["id"], entry))
        for score, _, entry in sorted(scored)[:candidates]:
            picked.append({"concept": concept, "feature": entry["id"], "label": entry["label"],
                           "match": round(-score, 2)})
    return picked


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--strengths", default=",".join(str(s) for s in STRENGTHS))
    p.add_argument("--candidates", type=int, default=2, help="features tried per concept")
    args = p.parse_args(argv)
    strengths = [float(s) for s in args.strengths.split(",")]
    sae_dir = Path(args.sae).resolve()
    catalogue = json.loads((sae_dir / CATALOGUE_FILENAME).read_text())
    picked = pick_features(catalogue, CONCEPTS, args.candidates)

    from vllm import LLM, SamplingParams

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # else vLLM reserves 92% of host memory on CPU
    llm = LLM(model=str(default_model_dir()), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              additional_config={"steer": {"sae_path": str(sae_dir)}})
    conversations = [[{"role": "user", "content": q}] for q in NEUTRAL_PROMPTS]

    def params(clamps):
        return SamplingParams(temperature=0, max_tokens=args.max_tokens,
                              extra_args={"feature_clamps": json.dumps(clamps)} if clamps else None)

    jobs = [(None, None)] + [(pick, s) for pick in picked for s in strengths]
    all_convs, all_params = [], []
    for pick, strength in jobs:
        clamps = None if pick is None else [{"feature": pick["feature"], "value": strength, "unit": "max"}]
        all_convs += conversations
        all_params += [params(clamps)] * len(conversations)
    started = time.time()
    # Generation is the long part: keep its replies so a failure after it does not cost a rerun.
    cache = sae_dir / ".efficacy_replies.json"
    key = json.dumps([picked, strengths, args.max_tokens, NEUTRAL_PROMPTS], sort_keys=True)
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("key") == key:
        replies = cached["replies"]
    else:
        replies = [o.outputs[0].text for o in llm.chat(all_convs, all_params, use_tqdm=True)]
        cache.write_text(json.dumps({"key": key, "replies": replies}))

    # Fluency: perplexity of replies under the unsteered model (prompt logprobs, no clamps). Full-
    # vocabulary logprobs at every position are slow on CPU, so the first PPL_PER_CELL replies of
    # each (concept, strength) cell are scored.
    n = len(conversations)
    tokenizer = llm.get_tokenizer()
    scored_prompts, spans = [], []
    scored = [i for i in range(len(replies)) if i % n < PPL_PER_CELL]
    for conv, reply in ((all_convs[i], replies[i]) for i in scored):
        prefix_text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        prefix = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        scored_prompts.append({"prompt_token_ids": prefix + reply_ids})
        spans.append((len(prefix), len(reply_ids)))
    scoring = llm.generate(scored_prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))
    ppl = []
    for out, (start, length) in zip(scoring, spans):
        ids = out.prompt_token_ids
        nll = [-out.prompt_logprobs[i][ids[i]].logprob for i in range(start, start + length)]
        ppl.append(math.exp(sum(nll) / len(nll)))

    k = PPL_PER_CELL
    baseline_replies, baseline_ppl = replies[:n], ppl[:k]
    results = []
    for j, (pick, strength) in enumerate(jobs[1:], start=1):
        chunk, chunk_ppl = replies[j * n:(j + 1) * n], ppl[j * k:(j + 1) * k]
        kw = CONCEPTS[pick["concept"]]
        results.append({
            **pick, "strength_x_max": strength,
            "baseline_mention_rate": sum(_mentions(r, kw) for r in baseline_replies) / n,
            "mention_rate": sum(_mentions(r, kw) for r in chunk) / n,
            "median_ppl": sorted(chunk_ppl)[k // 2], "example": chunk[0],
        })
    meeting = [r for r in results if r["baseline_mention_rate"] <= 0.10 and r["mention_rate"] >= 0.60
               and r["strength_x_max"] <= 20]
    features = sorted({(r["concept"], r["feature"]) for r in meeting})
    concepts = sorted({c for c, _ in features})
    report = {"date": time.strftime("%Y-%m-%d"), "prompts": n, "max_tokens": args.max_tokens,
              "strengths": strengths, "candidates_per_concept": args.candidates,
              "baseline_median_ppl": sorted(baseline_ppl)[k // 2], "ppl_replies_per_cell": k,
              "seconds": round(time.time() - started, 1),
              "features_meeting_bar": [f for _, f in features], "concepts_meeting_bar": concepts, "results": results}
    (sae_dir / "efficacy.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    lines = [f"Steering efficacy ({report['date']}): {n} neutral prompts, {args.max_tokens} tokens, greedy; "
             f"perplexity of replies under the unsteered model: median of {k} per cell, unsteered "
             f"{report['baseline_median_ppl']:.1f}. "
             f"{len(features)} features ({len(concepts)} concepts) take their concept from ≤10% to ≥60% of "
             f"replies at ≤20× max: " + ", ".join(f"{f} ({c})" for c, f in features) + ".", "",
             "| concept | feature | label | × max | mentions unsteered | mentions steered | median ppl |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['concept']} | {r['feature']} | {r['label']} | {r['strength_x_max']:g} | "
                     f"{r['baseline_mention_rate']:.0%} | {r['mention_rate']:.0%} | {r['median_ppl']:.1f} |")
    (sae_dir / "efficacy.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    return report


if __name__ == "__main__":
    main()
