"""steer-catalogue: feature discovery and calibration for your own model and SAE.

    steer-catalogue build --model DIR --sae DIR [--layer N] --corpus FILE --out DIR
    steer-catalogue import-labels --catalogue DIR FILE
    steer-catalogue calibrate --model DIR --sae DIR --catalogue DIR --features 1,2 [--concept NAME:kw,kw]
    steer-catalogue compare CATALOGUE_DIR OTHER_DIR

Then serve it: python server.py --model DIR --sae ID=SAE_DIR --catalogue ID=DIR (the catalogue folder
need not be the SAE's, which may be read-only). Each command prints a JSON report on its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from steer_workbench.discover import build, calibrate, compare, labels
from steer_workbench.discover.corpus_file import DEFAULT_CORPUS


def _numbers(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x.strip())


def _concept(text: str) -> tuple[str, list[str]]:
    name, _, words = text.partition(":")
    keywords = [w.strip().lower() for w in (words or name).split(",") if w.strip()]
    if not name.strip() or not keywords:
        raise argparse.ArgumentTypeError(f"--concept {text!r}: give NAME:KEYWORD,KEYWORD")
    return name.strip(), keywords


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--sae", required=True, help="SAE folder or file (SAELens, sparsify, Gemma Scope)")
    p.add_argument("--layer", type=int, default=None, help="decoder layer the SAE reads, where its files do not say")
    p.add_argument("--dtype", default="float32", help='the engine\'s dtype ("auto" on a GPU: the model\'s own)')


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steer-catalogue", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)

    b = commands.add_parser("build", help="the feature catalogue of an SAE, from a corpus (see build.py)")
    _engine_options(b)
    b.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="text or JSONL file (default: %(default)s)")
    b.add_argument("--out", type=Path, required=True, help="catalogue folder to write")
    defaults = build.BuildConfig("", "", "", "")
    b.add_argument("--top-k", type=int, default=defaults.top_k, help="features recorded per token")
    b.add_argument("--top", type=int, default=defaults.top, help="strongest activations kept per feature")
    b.add_argument("--ctx", type=int, default=defaults.ctx, help="tokens per document")
    b.add_argument("--batch", type=int, default=defaults.batch, help="documents per engine call (a checkpoint each)")
    b.add_argument("--max-documents", type=int, default=None, help="read only the first N documents")
    b.add_argument("--no-output-side", action="store_true", help="skip the promoted tokens (no transformers load)")

    i = commands.add_parser("import-labels", help="Neuronpedia explanations or an index,label CSV (see labels.py)")
    i.add_argument("--catalogue", type=Path, required=True, help="catalogue folder")
    i.add_argument("file", type=Path, help="Neuronpedia export (.json, .jsonl, .gz) or .csv")

    m = commands.add_parser("compare", help="how far two catalogues of one SAE agree on the input side (compare.py)")
    m.add_argument("first", type=Path)
    m.add_argument("second", type=Path)

    c = commands.add_parser("calibrate", help="recommended strengths and concept clamps (see calibrate.py)")
    _engine_options(c)
    c.add_argument("--catalogue", type=Path, required=True, help="catalogue folder (read and written)")
    c.add_argument("--features", type=_numbers(int), default=(), help="comma-separated feature ids")
    c.add_argument("--queries", type=_numbers(str), default=(), help="comma-separated searches: their top hits too")
    c.add_argument("--hits", type=int, default=1, help="search hits per query")
    c.add_argument("--concept", type=_concept, action="append", default=[], metavar="NAME:KEYWORD,KEYWORD",
                   help="a concept clamp to build (repeatable); features are checked for these concepts too")
    calib = calibrate.CalibrateConfig("", "", "")
    c.add_argument("--strengths", type=_numbers(float), default=calib.strengths, help="× max, swept on --scopes")
    c.add_argument("--scopes", type=_numbers(str), default=calib.scopes)
    c.add_argument("--prompt-strengths", type=_numbers(float), default=(), help="× max, on the prompt scope")
    c.add_argument("--concept-features", type=int, default=calib.concept_features, help="features per concept clamp")
    c.add_argument("--reply-tokens", type=int, default=calib.reply_tokens)
    return p


def run(argv: list[str] | None = None) -> dict:
    """Runs one command; returns its report (also printed as JSON)."""
    args = parser().parse_args(argv)
    if args.command == "build":
        report = build.build(build.BuildConfig(
            model=args.model, sae=args.sae, corpus=str(args.corpus), out=str(args.out), layer=args.layer,
            top_k=args.top_k, top=args.top, ctx=args.ctx, batch=args.batch, max_documents=args.max_documents,
            output_side=not args.no_output_side, dtype=args.dtype))
    elif args.command == "import-labels":
        report = labels.import_labels(args.catalogue, args.file)
    elif args.command == "compare":
        report = compare.compare(args.first, args.second)
    else:
        if not args.features and not args.queries and not args.concept:
            sys.exit("steer-catalogue calibrate: give --features, --queries or --concept")
        report = calibrate.calibrate(calibrate.CalibrateConfig(
            model=args.model, sae=args.sae, catalogue=str(args.catalogue), layer=args.layer, features=args.features,
            queries=args.queries, hits=args.hits, concepts=dict(args.concept), strengths=args.strengths,
            scopes=args.scopes, prompt_strengths=args.prompt_strengths, concept_features=args.concept_features,
            reply_tokens=args.reply_tokens, dtype=args.dtype))
    print(json.dumps(report))
    return report


def main() -> None:
    """The console script (its exit status is 0 unless a command fails)."""
    run()


if __name__ == "__main__":
    main()
