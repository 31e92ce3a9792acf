"""Which layer of the model takes steering best: difference-of-means vectors at several layers, each
added at doses relative to that layer's residual-stream norm, judged as the strength sweep judges.

    python -m steer_workbench.layer_scan --out docs/layer-scan [--layers 3,6,9] [--doses 0.25,0.5]

Why: an SAE's layer bounds what clamping its features can do. If no single direction at a layer
makes the model talk about a concept fluently, no feature of an SAE there will; the layer where the
mean difference itself steers best is where the next SAE should read.

- Vectors: for each concept of `protocols.CONCEPTS` with at least `--min-docs` conversations of the
  chat corpus naming it twice (in the first `--ctx` tokens), the difference of means at the output
  of each layer (`diff_means.chat_vector_saes`: up to `--docs-per-concept` positive documents per
  concept and as many others, one transformers forward stopped after the deepest layer scanned).
- Dose: α × the median norm of that layer's stream, added at every position (each layer's vectors
  are served by the plugin as an SAE there whose unit is that norm), so doses compare across layers
  whose norms differ several-fold.
- Judged like the strength sweep (strengths.py) on its tuning prompts: share of replies naming the
  concept, median perplexity under the unsteered model (only where at least half name it), distinct
  word trigrams. A cell steers fluently when the rate is >= 60 % (the efficacy bar, STEERED_MIN),
  perplexity <= 3× unsteered and trigrams >= 0.8.

Writes results.json and results.md to `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from steer_plugin.core.config import default_model_dir
from steer_workbench.chat_corpus import CHATS_DIR, CHATS_FILE
from steer_workbench.diff_means import chat_vector_saes
from steer_workbench.protocols import CONCEPTS, MAX_PPL_RATIO, MIN_TRIGRAMS, STEERED_MIN, TUNING_PROMPTS
from steer_workbench.steering_eval import Bench, Job, describe_decoding, feature_jobs, median, mention_rate
from steer_workbench.strengths import fluent, swept_cells


def scan(model_dir: str, chats: Path, out: Path, layers: list[int], doses: list[float], ctx: int, min_docs: int,
         per_concept: int) -> dict:
    started = time.time()
    concepts, read = chat_vector_saes(model_dir, chats, CONCEPTS, layers, out / "vectors", ctx, min_docs, per_concept)
    saes = [{"path": str((out / "vectors" / f"L{L}").resolve()), "id": f"L{L}"} for L in layers]
    bench = Bench(model_dir, saes, cache=out / ".replies.json", own_process=True)
    try:
        baseline = bench.run([Job(p) for p in TUNING_PROMPTS])
        baseline_ppl = median([j.perplexity for j in baseline])
        cells = {(c, L, a): (feature_jobs(TUNING_PROMPTS, f"L{L}", i, a), keywords)
                 for i, (c, keywords) in enumerate(concepts.items()) for L in layers for a in doses}
        summaries = swept_cells(bench, cells)
    finally:
        bench.close()
    rows = [{"concept": c, "layer": L, "dose": a, **{k: v for k, v in s.items() if k != "answers"},
             "fluent_at_bar": fluent(s, baseline_ppl) and s["concept_rate"] >= STEERED_MIN}
            for (c, L, a), s in summaries.items()]
    report = {"layers": layers, "doses": doses, "concepts": list(concepts), **read, "decoding": bench.decoding,
              "baseline_median_ppl": baseline_ppl,
              "baseline_rate": {c: mention_rate(baseline, k) for c, k in concepts.items()},
              "rows": rows, "seconds": round(time.time() - started)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    rows, concepts = report["rows"], report["concepts"]
    lines = [f"# Steering by layer: difference-of-means vectors ({time.strftime('%Y-%m-%d')})", "",
             f"{len(concepts)} concepts ({', '.join(concepts)}), vectors from {report['documents']} chat documents "
             f"({report['tokens']:,} tokens, first {report['ctx']} of each); {len(TUNING_PROMPTS)} tuning prompts, "
             f"{describe_decoding(report['decoding'])}, all positions. Dose: × the layer's median stream norm. Unsteered median perplexity "
             f"{report['baseline_median_ppl']:.2f}. A cell counts when the concept is in ≥ {STEERED_MIN:.0%} of replies "
             f"with median perplexity ≤ {MAX_PPL_RATIO:g}× unsteered and distinct trigrams ≥ {MIN_TRIGRAMS}.", "",
             "| layer | median norm | dose | mean concept rate | concepts at the bar | mean distinct trigrams |",
             "|---|---|---|---|---|---|"]
    for L in report["layers"]:
        for a in report["doses"]:
            cells = [r for r in rows if r["layer"] == L and r["dose"] == a]
            lines.append(f"| {L} | {report['median_norm'][L]:.0f} | {a:g} | "
                         f"{sum(r['concept_rate'] for r in cells) / len(cells):.0%} | "
                         f"{sum(r['fluent_at_bar'] for r in cells)} | "
                         f"{sum(r['distinct_trigrams'] for r in cells) / len(cells):.2f} |")
    lines += ["", "Per concept, the layers and doses at the bar:", ""]
    for c in concepts:
        hits = [f"L{r['layer']}×{r['dose']:g} ({r['concept_rate']:.0%}, ppl {r['median_ppl']:.1f})"
                for r in rows if r["concept"] == c and r["fluent_at_bar"]]
        lines.append(f"- {c} (unsteered {report['baseline_rate'][c]:.0%}): {', '.join(hits) or 'none'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model-dir", default=str(default_model_dir()))
    p.add_argument("--chats", type=Path, default=CHATS_DIR / CHATS_FILE)
    p.add_argument("--layers", default="3,6,9,12,15,18,21")
    p.add_argument("--doses", default="0.125,0.25,0.375,0.5,0.75")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--min-docs", type=int, default=35, help="positive documents a concept needs to be scanned")
    p.add_argument("--docs-per-concept", type=int, default=40)
    args = p.parse_args(argv)
    report = scan(args.model_dir, args.chats, args.out, [int(x) for x in args.layers.split(",")],
                  [float(x) for x in args.doses.split(",")], args.ctx, args.min_docs, args.docs_per_concept)
    print(report["seconds"], "s")
    return report


if __name__ == "__main__":
    main()
