"""`steer-catalogue compare`: how far two catalogues of one SAE agree on the input side (a rebuild
against the catalogue it replaces, another corpus, another engine).

Per feature alive in both (a positive max activation): whether the most frequent top token is the
same, whether the three most frequent (the automatic label's) are the same set, the overlap of the
top-token lists, and the ratio of max activations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from steer_plugin.search.catalogue import read_entries


def _tokens(entry: dict, n: int) -> list[str]:
    return [t["token"] for t in entry["top_tokens"][:n]]


def compare(a: Path, b: Path) -> dict:
    """Agreement of catalogue `b` with catalogue `a` (same SAE), as shares of the features alive in both."""
    first, second = read_entries(a), read_entries(b)
    if len(first) != len(second):
        raise ValueError(f"{a} has {len(first)} features, {b} {len(second)}: not the same SAE")
    alive = [(x, y) for x, y in zip(first, second) if x["max_activation"] > 0 and y["max_activation"] > 0]
    if not alive:
        raise ValueError("no feature is alive in both catalogues")
    top1 = [_tokens(x, 1) == _tokens(y, 1) for x, y in alive]
    top3 = [set(_tokens(x, 3)) == set(_tokens(y, 3)) for x, y in alive]
    overlap = [len(set(_tokens(x, 8)) & set(_tokens(y, 8))) / max(1, min(len(x["top_tokens"]), len(y["top_tokens"])))
               for x, y in alive]
    ratio = np.array([y["max_activation"] / x["max_activation"] for x, y in alive])
    return {"features": len(first), "alive_in_both": len(alive),
            "alive_only_in_first": sum(x["max_activation"] > 0 >= y["max_activation"] for x, y in zip(first, second)),
            "alive_only_in_second": sum(y["max_activation"] > 0 >= x["max_activation"] for x, y in zip(first, second)),
            "same_top_token": round(float(np.mean(top1)), 4), "same_top_3": round(float(np.mean(top3)), 4),
            "top_token_overlap": round(float(np.mean(overlap)), 4),
            "max_activation_ratio_median": round(float(np.median(ratio)), 4)}
