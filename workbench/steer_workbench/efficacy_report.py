"""The markdown reports of efficacy.py: efficacy.md (single features, concept clamps, the user's
journey) and comparison.md (SAE steering beside prompting and a steering vector), from the report
dicts efficacy.py also writes as JSON."""

from __future__ import annotations

from steer_workbench.steering_eval import describe_decoding


def efficacy_markdown(report: dict) -> str:
    e, j, p = report["efficacy"], report["journey"], report["protocol"]
    lines = [f"# Steering efficacy ({report['date']})", "",
             f"{p['neutral_prompts']} neutral prompts, {report['max_tokens']} tokens, "
             f"{describe_decoding(report['decoding'])}, each feature at its "
             f"recommended strength (strengths.py, tuned on other prompts). Tried per concept: its first "
             f"{p['search_hits']} search hits with a recommended strength and those of its {p['aligned']} features "
             f"best aligned with its direction (concept_directions.safetensors). Unsteered: median perplexity "
             f"{e['baseline_median_ppl']:.2f}, distinct trigrams {e['baseline_distinct_trigrams']:.2f}, "
             f"answers {e['baseline_answers']:.0%}.", "",
             f"**{len(e['features_meeting_bar'])} features over {len(e['concepts_meeting_bar'])} concepts** take "
             f"their concept from ≤ 10 % to ≥ 60 % of replies with median perplexity ≤ 3× unsteered: "
             + ", ".join(e["concepts_meeting_bar"]) + ".", "",
             "| concept | feature | label | found by | × max | tokens | unsteered | steered | median ppl | distinct trigrams | answers |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in e["results"]:
        lines.append(f"| {r['concept']} | {r['feature']} | {r['label']} | {r['found_by']} | {r['strength_x_max']:g} | {r['tokens']} | "
                     f"{r['baseline_mention_rate']:.0%} | {r['concept_rate']:.0%} | {r['median_ppl']:.2f} | "
                     f"{r['distinct_trigrams']:.2f} | {r['answers']:.0%} |")
    k = e["concept_clamps"]
    lines += ["", "## Concept clamps", "",
              f"Each concept's clamp (concepts.json: several features added together along the concept's direction, "
              f"dose tuned on other prompts) on the same prompts: **{len(k['meeting_bar'])} of {k['concepts']} "
              f"concepts** meet the same bar" + (": " + ", ".join(k["meeting_bar"]) if k["meeting_bar"] else "") + ".",
              "", "| concept | features | cosine | dose (× norm) | tokens | unsteered | steered | median ppl | distinct trigrams | answers |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in k["results"]:
        lines.append(f"| {r['concept']} | {r['features']} | {r['cosine']:.2f} | {r['dose']:g} | {r['tokens']} | "
                     f"{r['baseline_mention_rate']:.0%} | {r['concept_rate']:.0%} | {r['median_ppl']:.2f} | "
                     f"{r['distinct_trigrams']:.2f} | {r['answers']:.0%} |")
    lines += ["", "## The user's journey", "",
              f"Search a word, clamp the top hit at its recommended strength, ask {p['journey_questions']} ordinary "
              f"questions: **{len(j['steered'])} of {j['queries']}** queries reach ≥ 60 % of replies with median "
              f"perplexity ≤ 3× unsteered ({j['baseline_median_ppl']:.2f}).", "",
              "| query | top hit | label | × max | tokens | unsteered | steered | median ppl | distinct trigrams | example |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in j["results"]:
        if not r["steerable"]:
            lines.append(f"| {r['query']} | {r['feature']} | (no recommended strength) | | | | | | | |")
            continue
        example = r["example"].replace("\n", " ").replace("|", "/")[:160]
        lines.append(f"| {r['query']} | {r['feature']} | {r['label']} | {r['strength_x_max']:g} | {r['tokens']} | "
                     f"{r['baseline_mention_rate']:.0%} | {r['concept_rate']:.0%} | {r['median_ppl']:.2f} | "
                     f"{r['distinct_trigrams']:.2f} | {example} |")
    lines += ["", f"The same queries with the concept clamp the search returns first (`concepts` in the reply "
              f"of `/v1/features?q=`, or `/v1/concepts?q=`) at its recommended dose: **{len(j['concept_steered'])} "
              f"of {j['queries']}** reach ≥ 60 % with median perplexity ≤ 3× unsteered.", "",
              "| query | concept clamp | features | dose (× norm) | tokens | unsteered | steered | median ppl | distinct trigrams | example |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in j["concept_results"]:
        example = r["example"].replace("\n", " ").replace("|", "/")[:160]
        lines.append(f"| {r['query']} | {r['concept_clamp']} | {r['features']} | {r['dose']:g} | {r['tokens']} | "
                     f"{r['baseline_mention_rate']:.0%} | {r['concept_rate']:.0%} | {r['median_ppl']:.2f} | "
                     f"{r['distinct_trigrams']:.2f} | {example} |")
    first = ", ".join(f"{q} ({kind})" for q, kind in j["first_offered"].items() if q in j["first_steered"])
    lines += ["", f"What the search offers first (the concept clamp where one has a dose, else the top hit): "
              f"**{len(j['first_steered'])} of {j['queries']}** steer: {first}."]
    t = report["second_turn"]
    lines += ["", "## A second turn", "",
              f"The {t['features']} features at the bar above, each at its recommended setting, on the same prompts "
              f"asked as the second user turn of a conversation (the first: \"{t['earlier_turn']}\" and the model's "
              f"unsteered reply; a clamp on `all` or `prompt` acts on those turns too): **{t['features_meeting_bar']} of "
              f"{t['features']}** meet the same bar against unsteered second turns (median perplexity "
              f"{t['baseline_median_ppl']:.2f}), over {len(t['concepts_meeting_bar'])} concepts.", "",
              "| concept | feature | × max | tokens | first turn | unsteered | second turn | median ppl | distinct trigrams | answers |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in t["results"]:
        lines.append(f"| {r['concept']} | {r['feature']} | {r['strength_x_max']:g} | {r['tokens']} | {r['first_turn_rate']:.0%} | "
                     f"{r['baseline_mention_rate']:.0%} | {r['concept_rate']:.0%} | {r['median_ppl']:.2f} | "
                     f"{r['distinct_trigrams']:.2f} | {r['answers']:.0%} |")
    return "\n".join(lines) + "\n"


def comparison_markdown(report: dict) -> str:
    c, p = report["comparison"], report["protocol"]
    lines = [f"# SAE steering beside prompting and a steering vector ({report['date']})", "",
             f"The {p['concepts']} concepts of efficacy.md, {p['neutral_prompts']} neutral prompts, {report['max_tokens']} "
             f"tokens, {describe_decoding(report['decoding'])}. Concept rate: share of replies naming the concept (averaged over all concepts, 0 where "
             "a method has no setting). Fluency: median perplexity under the unsteered model and distinct word "
             "trigrams. Answers: share of replies more likely after their own question than after another "
             "(pointwise mutual information > 0; see steering_eval.py).", "",
             "| method | concepts with a setting | mean concept rate | concepts ≥ 60 % | median ppl | distinct trigrams | answers |",
             "|---|---|---|---|---|---|---|"]
    for method, t in c["table"].items():
        fmt = (lambda v, f: "–" if v is None else format(v, f))
        lines.append(f"| {method} | {t['concepts']} | {t['mean_concept_rate']:.0%} | {t['concepts_at_60']} | "
                     f"{fmt(t['median_ppl'], '.2f')} | {fmt(t['distinct_trigrams'], '.2f')} | {fmt(t['answers'], '.0%')} |")
    lines += ["", "| concept | method | setting | concept rate | median ppl | distinct trigrams | answers |",
              "|---|---|---|---|---|---|---|"]
    for r in c["results"]:
        for method, m in r["methods"].items():
            lines.append(f"| {r['concept']} | {method} | {m['setting']} | {m['concept_rate']:.0%} | "
                         f"{m['median_ppl']:.2f} | {m['distinct_trigrams']:.2f} | {m['answers']:.0%} |")
    lines += ["", "## Why a feature steers or not: its direction",
              "", "Cosine between each concept's difference of means (the vector above) and a feature's decoder row: "
              "a clamp moves the stream along that row, and what it moves off the concept's direction changes the "
              "reply without bringing the concept (docs/reports/layer-scan-2026-12-04.md).", "",
              "| concept | top search hit | its cosine | best-aligned feature | label | cosine | concept clamp's features together |",
              "|---|---|---|---|---|---|---|"]
    for r in c.get("alignment", []):
        lines.append(f"| {r['concept']} | {r['top_hit']} | {r['top_hit_cos']} | {r['best_feature']} | "
                     f"{r['best_label']} | {r['best_cos']} | {r['concept_clamp_cos']} |")
    return "\n".join(lines) + "\n"
