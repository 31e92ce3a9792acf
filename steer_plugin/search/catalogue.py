"""The feature catalogue of the loaded SAE, searchable by words (API process only).

`feature_catalogue.json.gz` (written by training, one entry per feature: label, max/mean activation,
frequency, top tokens with counts, top contexts with the token marked «like this»; a plain
`feature_catalogue.json` is read too) is loaded once.
A query is matched word by word against, in order of weight:
    steers        the share of replies mentioning a concept named or described by a    × 3
                  query word, at the recommended strength (`steers`, strengths.py)
    top tokens    the share of the feature's top-token counts that are a query word    × 3
    steered       the share of the probability its clamp gains that goes to a query word × 2
                  (`steered_tokens`, where the catalogue has them: what steering with it says)
    promoted      the share of the tokens its decoder row promotes that are a query word × 1
                  (`output_tokens`: the direct path only, a weaker signal at middle layers)
    explained     the share of query words found in an imported explanation           × 2
                  (`labels` from Neuronpedia or a CSV: steer-catalogue import-labels)
    label         the share of query words found in the label                          × 1
    contexts      the share of top contexts whose marked token is a query word         × 1
    around        the share of top contexts with a query word anywhere in them          × 0.5
Words are compared lower-cased with a plural `s`/`es`/`ies` removed, so "dogs" finds "dog"; common
function words ("the", "of", ...) are dropped from queries that have other words.

Steerable features first: the features measured to steer replies towards a concept the query
names (`steers`) rank first; then, among the matches scoring at least half the best match, those
with a measured `recommended_strength` (the strength sweep found a fluent strength at which replies
show the feature); then the rest. So the top hit is one a user can clamp, and where the catalogue
knows one that makes replies talk about what was searched for, that one.
"""


from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np

from steer_plugin.core.catalogue_schema import validate_entries
from steer_plugin.core.files import replaced_on_success
from steer_plugin.core.sae import CATALOGUE_FILENAME, PLAIN_CATALOGUE_FILENAME, SAEFileError

STEERABLE_WITHIN = 0.5
"""A steerable match outranks an unmeasured one when it scores at least this share of the best."""
_WORD = re.compile(r"[a-z0-9]+")
_MARKED = re.compile(r"«(.*?)»")
STOPWORDS = frozenset("a an and are as at be by for from in into is it of on or that the this to was with "
                       "about me make talk".split())
"""Function words dropped from queries (and from the words a steered reply is checked for)."""


def read_entries(sae_dir: str | Path) -> list[dict]:
    """The catalogue entries next to an SAE (the compressed file, else a plain one), checked against
    `catalogue_schema.CatalogueEntry`."""
    sae_dir = Path(sae_dir)
    if (sae_dir / CATALOGUE_FILENAME).is_file():
        path, text = sae_dir / CATALOGUE_FILENAME, gzip.decompress((sae_dir / CATALOGUE_FILENAME).read_bytes())
    elif (sae_dir / PLAIN_CATALOGUE_FILENAME).is_file():
        path, text = sae_dir / PLAIN_CATALOGUE_FILENAME, (sae_dir / PLAIN_CATALOGUE_FILENAME).read_text()
    else:
        raise SAEFileError(f"steer_plugin: no {CATALOGUE_FILENAME} (or {PLAIN_CATALOGUE_FILENAME}) next to the SAE "
                           f"in {sae_dir}")
    try:
        return validate_entries(json.loads(text))
    except ValueError as e:  # pydantic's ValidationError is one: it names the entry and the field
        raise SAEFileError(f"steer_plugin: {path} is not a feature catalogue: {str(e)[:600]}") from None


def write_entries(sae_dir: str | Path, entries: list[dict]) -> None:
    """Writes the compressed catalogue (one entry per line inside, and mtime 0, so that the same entries give
    the same bytes) and removes a plain one, which would otherwise be shadowed but still read by people.
    Entries are checked against the schema first: what is written is what the server reads."""
    validate_entries(entries)
    text = "[\n" + ",\n".join(json.dumps(e, ensure_ascii=False, separators=(",", ":")) for e in entries) + "\n]\n"
    with replaced_on_success(Path(sae_dir, CATALOGUE_FILENAME)) as written:
        written.write_bytes(gzip.compress(text.encode(), mtime=0))
    Path(sae_dir, PLAIN_CATALOGUE_FILENAME).unlink(missing_ok=True)


def singular(word: str) -> str:
    """A lower-case word with a plural ending removed (crude; shared with the strength sweep): `ies` ->
    `y`; `es` only after ss, x, z, ch, sh (boxes, churches, classes); otherwise `s`, so that trees,
    horses and places meet tree, horse and place (stripping `es` there made "tre" of trees)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("sses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def words(text: str) -> set[str]:
    return {singular(w) for w in _WORD.findall(text.lower())}


def query_words(query: str) -> set[str]:
    """A query's words less function words (all of them where it has no other)."""
    found = words(query)
    return found - STOPWORDS or found


def steering_rate(entry: dict, query: str) -> float | None:
    """Share of the calibration replies that named a concept the query names, with this feature clamped
    at its recommended strength (its `steers` matching a query word; None: none measured)."""
    wanted = query_words(query)
    rates = [c["rate"] for c in entry.get("steers") or []
             if wanted & (words(" ".join([c["concept"], *c["words"]])) - STOPWORDS)]
    return max(rates) if rates else None


_ADDITIVE = ("tokens", "steered", "promoted", "explained", "label", "contexts", "around")
"""Score parts that add up over a query's words (`steers` takes the largest instead)."""


def _word_shares(tokens: list[dict], weight) -> dict[str, float]:
    """stemmed word -> summed weight(token) of the tokens it occurs in."""
    shares: dict[str, float] = {}
    for t in tokens:
        for w in words(t["token"]):
            shares[w] = shares.get(w, 0.0) + weight(t)
    return shares


def _parts(entry: dict) -> dict[str, dict[str, float]]:
    """Per score part, stemmed word -> what the word contributes to the entry's score in that part."""
    counts = entry.get("top_tokens", [])
    total = sum(t["count"] for t in counts) or 1
    contexts = entry.get("top_contexts", [])
    context_share: dict[str, float] = {}
    around_share: dict[str, float] = {}
    for c in contexts:
        for w in {w for marked in _MARKED.findall(c["text"]) for w in words(marked)}:
            context_share[w] = context_share.get(w, 0.0) + 1 / len(contexts)
        for w in words(c["text"]):
            around_share[w] = around_share.get(w, 0.0) + 1 / len(contexts)
    promoted = entry.get("output_tokens", [])
    steered = entry.get("steered_tokens", [])
    gained = sum(t["gain"] for t in steered) or 1.0
    steers: dict[str, float] = {}
    for concept in entry.get("steers") or []:
        for w in words(" ".join([concept["concept"], *concept["words"]])) - STOPWORDS:
            steers[w] = max(steers.get(w, 0.0), concept["rate"])
    return {"steers": steers, "tokens": _word_shares(counts, lambda t: t["count"] / total),
            "steered": _word_shares(steered, lambda t: t["gain"] / gained),
            "promoted": _word_shares(promoted, lambda t: 1 / len(promoted)),
            "explained": dict.fromkeys(words(" ".join(lab["text"] for lab in entry.get("labels", [])
                                                      if lab["source"] != "tokens")), 1.0),
            "label": dict.fromkeys(words(entry.get("label", "")), 1.0), "contexts": context_share,
            "around": around_share}


class FeatureCatalogue:
    """Catalogue entries by feature id, and a ranked word search over them.

    The search index is inverted: per stemmed word and score part, the features the word reaches
    (ids [m] int32) and what it adds to each (values [m] float64), so a query costs what its words'
    postings hold, not a pass over every feature (searches run in the API server's process, beside
    every other request; a long query through a per-feature loop held the interpreter for tens of
    milliseconds). Parts are summed word by word in the query's order, exactly as a per-feature sum."""

    def __init__(self, entries: list[dict]):
        self.entries = entries
        collected: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
        for feature, entry in enumerate(entries):
            for part, shares in _parts(entry).items():
                for w, value in shares.items():
                    ids, values = collected.setdefault(w, {}).setdefault(part, ([], []))
                    ids.append(feature)
                    values.append(value)
        self._postings = {w: {part: (np.asarray(ids, dtype=np.int32), np.asarray(values, dtype=np.float64))
                              for part, (ids, values) in parts.items()} for w, parts in collected.items()}
        self._steerable = np.array([bool(e.get("recommended_strength")) for e in entries], dtype=bool)
        self._frequency = np.array([e.get("frequency", 0.0) for e in entries], dtype=np.float64)

    @classmethod
    def load(cls, sae_path: str | Path) -> "FeatureCatalogue":
        entries = read_entries(sae_path)
        if [e["id"] for e in entries] != list(range(len(entries))):
            raise SAEFileError(f"steer_plugin: the catalogue in {sae_path} must list features 0..n-1 in order")
        return cls(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, feature: int) -> dict | None:
        return self.entries[feature] if 0 <= feature < len(self.entries) else None

    def label(self, feature: int) -> str:
        return self.entries[feature]["label"] if 0 <= feature < len(self.entries) else ""

    def _scores(self, wanted: set[str]) -> tuple[np.ndarray, np.ndarray]:
        """(score [n], steers [n]) of every feature for the query words `wanted`."""
        n = len(self.entries)
        sums = {part: np.zeros(n) for part in _ADDITIVE}
        steers = np.zeros(n)
        for w in wanted:
            for part, (ids, values) in self._postings.get(w, {}).items():
                if part == "steers":
                    steers[ids] = np.maximum(steers[ids], values)
                else:
                    sums[part][ids] += values  # a word reaches a feature once per part: ids are unique
        label, explained = sums["label"] / len(wanted), sums["explained"] / len(wanted)
        score = (3 * steers + 3 * sums["tokens"] + 2 * sums["steered"] + sums["promoted"] + 2 * explained + label
                 + sums["contexts"] + 0.5 * sums["around"])
        return score, steers

    def _ranked(self, query: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every match in search order: (feature [m] int, score [m] float, ranked steerable first [m] bool)."""
        wanted = query_words(query)
        if not wanted:
            return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=bool)
        score, steers = self._scores(wanted)
        matched = np.flatnonzero(score > 0)  # [m]
        scored = score[matched]
        best = scored.max() if len(matched) else 0.0
        tiers = np.where(steers[matched] > 0, 0,
                         np.where(self._steerable[matched] & (scored >= STEERABLE_WITHIN * best), 1, 2))
        # Ties (common for single-token features) go to the more frequent, better-attested feature.
        order = np.lexsort((matched, -self._frequency[matched], -scored, tiers))
        return matched[order], scored[order], tiers[order] < 2

    def search(self, query: str, limit: int, offset: int = 0) -> tuple[list[tuple[dict, float]], int]:
        """(entry, score) of the best matches, best first, and how many features match at all."""
        features, scores, _ = self._ranked(query)
        page = slice(offset, offset + limit)
        return [(self.entries[i], round(float(s), 4)) for i, s in zip(features[page], scores[page])], len(features)

    def steerable_hits(self, query: str, n: int) -> list[dict]:
        """The first n of the matches search ranks steerable first: those measured to steer towards
        the query, then those with a recommended strength scoring at least STEERABLE_WITHIN × the best
        match (one matching by a context word only is no answer to the query)."""
        features, _, first = self._ranked(query)
        return [self.entries[i] for i in features[first][:n]]
