"""The concept clamps shipped with an SAE, searchable by words (API process only).

`concepts.json` (written by `python -m steer_workbench.concepts`) holds, per concept, the
features whose clamps together add the concept's direction (`mode: add`), the strength measured to
steer replies to it fluently, and the `feature_clamps` at that strength, ready to send (`clamps_at`
builds them at another dose). A query matches a concept by its name and the keywords that show it in
a reply, compared as the feature search compares words (lower case, plural removed).
"""

from __future__ import annotations

import json
from pathlib import Path

from steer_plugin.search.catalogue import query_words, words
from steer_plugin.core.catalogue_schema import validate_concepts
from steer_plugin.core.sae import SAEFileError

CONCEPTS_FILENAME = "concepts.json"


def clamps_at(entry: dict, dose: float, tokens: str) -> list[dict]:
    """A concept entry's clamps (request form) with the mix scaled to `dose` × the median stream norm
    (its `unit_value`s add a mix whose norm is that median norm), on the `tokens` scope."""
    return [{"feature": f["feature"], "value": round(f["unit_value"] * dose, 5), "mode": "add", "unit": "absolute",
             "tokens": tokens} for f in entry["features"]]


def measured_rate(entry: dict) -> float | None:
    """Share of the calibration replies that named the concept at its recommended dose and scope
    (None: no dose was recommended)."""
    dose, tokens = entry.get("recommended_dose"), entry.get("recommended_tokens")
    if dose is None or tokens is None:
        return None
    cell = (entry.get("sweep") or {}).get(tokens, {}).get(f"{dose:g}")
    return None if cell is None else cell["concept_rate"]


class ConceptBook:
    """An SAE's concept clamps (entries of concepts.json) and a word search over them."""

    def __init__(self, entries: list[dict]):
        self.entries = entries
        self._names = [query_words(e["concept"]) for e in entries]
        self._keywords = [set().union(*map(words, e["keywords"])) for e in entries]

    @classmethod
    def load(cls, sae_path: str | Path) -> "ConceptBook":
        """The SAE's concept clamps; an empty book where it ships none."""
        path = Path(sae_path) / CONCEPTS_FILENAME
        if not path.is_file():
            return cls([])
        try:
            entries = validate_concepts(json.loads(path.read_text()))["concepts"]
        except ValueError as e:  # pydantic's ValidationError names the concept and the field
            raise SAEFileError(f"steer_plugin: {path} is not a concepts file: {str(e)[:600]}") from None
        return cls(entries)

    def search(self, query: str, steerable_only: bool = False) -> list[dict]:
        """Entries whose name or keywords hold a query word, best first: more query words in the name,
        then in the keywords, then those with a measured strength."""
        wanted = query_words(query)
        scored = []
        for i, e in enumerate(self.entries):
            if steerable_only and e.get("recommended_dose") is None:
                continue
            name, keywords = len(wanted & self._names[i]), len(wanted & self._keywords[i])
            if name or keywords:
                scored.append(((-name, -keywords, e.get("recommended_dose") is None, i), e))
        return [e for _, e in sorted(scored, key=lambda se: se[0])]
