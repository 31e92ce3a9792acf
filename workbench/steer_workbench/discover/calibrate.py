"""`steer-catalogue calibrate`: recommended strengths and concept clamps for any model and SAE.

Everything is measured on real replies of the model through vLLM with the plugin (steering_eval),
against the model's own unsteered replies to the same prompts:
- **features** (`--features`, and the top search hits of `--queries`): each clamped (`set`, unit
  max) at every strength of `--strengths` on every token scope of `--scopes` (and `--prompt-strengths`
  on the prompt's positions), then refined and confirmed by the sweep's rule (strengths.sweep): the
  most fluent setting that shows the feature in nearly as many replies as the best; a feature whose
  replies turn to a `--concept` gets `steers`, and a search for it offers the feature first;
- **concept clamps** (`--concept NAME:kw,kw`): the concept's direction from the model's own replies
  about it (a difference of means at the SAE's layer), spelled out by matching pursuit over the
  decoder rows, and a dose tuned the same way (concepts.py).
Results go into the catalogue folder (`feature_catalogue.json.gz`, `concepts.json`) in the schema the
server reads; replies are cached there, so a run stopped half-way resumes and a wider run only adds
cells. The default grids come from the shipped model's calibration, each with its reason in
strengths.py and protocols.py; they are options here, to be widened for a model that breaks later
(larger models take stronger clamps) or narrowed for a quick pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from steer_plugin.core.sae import SAE
from steer_plugin.search.catalogue import FeatureCatalogue, read_entries, write_entries
from steer_plugin.search.concepts import CONCEPTS_FILENAME
from steer_workbench import concepts as concept_clamps
from steer_workbench import strengths
from steer_workbench.protocols import DOSE_GRID, SCOPES
from steer_workbench.steering_eval import REPLY_TOKENS, Bench

CACHE_FILENAME = ".steering_replies.json"
SAE_ID = "sae"
"""The SAE's id inside the calibration engine (requests name it; nothing outside sees it)."""


@dataclass(frozen=True)
class CalibrateConfig:
    """One calibration run."""

    model: str
    """Hugging Face model directory."""
    sae: str
    """SAE folder or file, any layout the plugin reads."""
    catalogue: str
    """Catalogue folder (steer-catalogue build's --out): read, and written back."""
    layer: int | None = None
    """Decoder layer the SAE reads, where its files do not say."""
    features: tuple[int, ...] = ()
    """Features to calibrate."""
    queries: tuple[str, ...] = ()
    """Also the top `hits` search hits of each of these queries."""
    hits: int = 1
    concepts: dict[str, list[str]] = field(default_factory=dict)
    """Concept clamps to build (name -> words that show it in a reply); features are also checked for them."""
    strengths: tuple[float, ...] = strengths.STRENGTHS
    """Clamp strengths (× max, mode set) swept on `scopes`."""
    scopes: tuple[str, ...] = SCOPES
    prompt_strengths: tuple[float, ...] = ()
    """Strengths swept on the prompt scope too (empty: none; strengths.PROMPT_STRENGTHS is the shipped grid)."""
    concept_features: int = concept_clamps.FEATURES
    """Features per concept clamp."""
    reply_tokens: int = REPLY_TOKENS
    """Tokens per reply."""
    dtype: str = "float32"
    """The engine's dtype ("auto" on a GPU)."""


def calibrate(cfg: CalibrateConfig) -> dict:
    """Runs the calibration and writes it into the catalogue folder; returns a report."""
    started = time.time()
    folder = Path(cfg.catalogue)
    entries = read_entries(folder)
    hits = [e["id"] for q in cfg.queries for e, _ in FeatureCatalogue(entries).search(q, cfg.hits)[0]]
    features = sorted(set(cfg.features) | set(hits))
    outside = [f for f in features if not 0 <= f < len(entries)]
    if outside:
        raise ValueError(f"features {outside} are outside the catalogue's 0..{len(entries) - 1}")
    sae = {"path": str(Path(cfg.sae).resolve()), "id": SAE_ID, "layer": cfg.layer, "catalogue": str(folder.resolve())}
    bench = Bench(cfg.model, [sae], max_tokens=cfg.reply_tokens, cache=folder / CACHE_FILENAME, own_process=True,
                  dtype=cfg.dtype)
    report: dict = {"features": features}
    try:
        if features:
            report["strengths"] = strengths.sweep(bench, SAE_ID, entries, features, cfg.strengths, cfg.scopes,
                                                  cfg.concepts, cfg.prompt_strengths)
            write_entries(folder, entries)
        if cfg.concepts:
            loaded = SAE.load(cfg.sae)
            layer = cfg.layer if cfg.layer is not None else loaded.cfg.layer
            built, directions, median_norm = concept_clamps.build(
                loaded, [e["label"] for e in entries], cfg.model, bench,
                concept_clamps.default_concepts() | cfg.concepts, cfg.concept_features, set(cfg.concepts), layer)
            report["concepts"] = concept_clamps.tune(bench, built, SAE_ID, DOSE_GRID)
            concept_clamps.add_concepts(folder / CONCEPTS_FILENAME, built, directions, median_norm, layer,
                                        cfg.concept_features, report["concepts"], started)
    finally:
        bench.close()
    report["seconds"] = round(time.time() - started, 1)
    return report
