"""Add the output side (the tokens each feature's decoder row promotes) to an SAE's catalogue.

    python -m steer_workbench.output_labels --sae sae_weights/NAME [--model-dir DIR]

Rewrites `feature_catalogue.json.gz` in place with an `output_tokens` list per feature
(see `catalogue.promoted_tokens`); the input-side fields stay as they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from steer_plugin.core.config import default_model_dir
from steer_plugin.search.catalogue import read_entries, write_entries
from steer_plugin.core.sae import SAE
from steer_workbench.capture import load_hf_model
from steer_workbench.catalogue import add_output_side


def rewrite_catalogue(sae_dir: Path, model_dir: str, add) -> list[dict]:
    """Loads the SAE, the model and the catalogue, lets add(entries, sae, model, tokenizer) fill
    fields into the entries, and writes the catalogue back in place."""
    entries = read_entries(sae_dir)
    model, tokenizer = load_hf_model(model_dir)
    add(entries, SAE.load(sae_dir), model, tokenizer)
    write_entries(sae_dir, entries)
    return entries


def add_output_tokens(sae_dir: Path, model_dir: str, top: int = 10) -> list[dict]:
    return rewrite_catalogue(sae_dir, model_dir,
                             lambda entries, sae, model, tok: add_output_side(entries, sae, model, tok, top))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", type=Path, required=True)
    p.add_argument("--model-dir", default=str(default_model_dir()))
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args(argv)
    add_output_tokens(args.sae, args.model_dir, args.top)


if __name__ == "__main__":
    main()
