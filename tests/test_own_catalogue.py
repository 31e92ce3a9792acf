"""Discovery for an SAE that shipped without a catalogue: the user's three commands (own_catalogue.py)
made one in a folder apart from the read-only SAE, and the server started with --catalogue serves it:
search (an imported label found), feature detail, inspection and `return_features` labels. (The
playground card: test_playground.py.)"""

from __future__ import annotations

import json

import pytest

from own_catalogue import NEURONPEDIA
from steer_plugin.search.catalogue import read_entries

pytestmark = pytest.mark.slow


def test_the_commands_built_a_catalogue_beside_a_read_only_sae(own_catalogue):
    _, sae, catalogue, reports = own_catalogue
    assert sorted(p.name for p in sae.iterdir()) == ["cfg.json", "expected.npz", "sae_weights.safetensors"]
    entries = read_entries(catalogue)
    build = reports["build"]
    assert len(entries) == build["d_sae"] == 128 and build["documents"] == 48 and build["tokens"] > 1000
    assert build["tokens_per_second"] > 0 and json.loads((catalogue / "build.json").read_text()) == build
    live = [e for e in entries if e["frequency"] > 0]
    assert len(live) > 64  # a random SAE on a random model: most features fire somewhere
    assert all(e["top_tokens"] and e["top_contexts"] and "«" in e["top_contexts"][0]["text"] for e in live)
    assert all(len(e["output_tokens"]) == 10 for e in entries)  # through the model's final norm and unembedding
    assert reports["import-labels"] == {"read": 2, "added": 2, "features": 2}
    calibrated = reports["calibrate"]["features"]
    assert len(calibrated) == 2 and reports["calibrate"]["strengths"]["features"] == 2
    for feature in calibrated:  # the sweep is kept whether or not a strength was found
        assert entries[feature]["sweep"]["all"]["2"]["prompts"] >= 8 and entries[feature]["sweep_words"]
        assert "recommended_strength" in entries[feature]
    assert (catalogue / "feature_stats.safetensors").is_file()


def test_search_detail_inspection_and_return_features_use_it(three_saes, own_catalogue):
    _, http = three_saes
    found = http.get("/v1/features", params={"q": "lighthouse", "sae": "lens"}).json()
    top = found["data"][0]
    assert top["id"] == 5 and top["label"] == NEURONPEDIA[0]["description"].strip()
    assert {"text": "references to lighthouses", "source": "neuronpedia:gpt-4o-mini"} in top["labels"]
    assert http.get("/v1/saes").json()["data"][0]["catalogue"] is True

    detail = http.get("/v1/features/17", params={"sae": "lens"}).json()
    assert detail["label"] == "words about the weather" and detail["top_contexts"] and detail["output_tokens"]
    calibrated = http.get(f"/v1/features/{own_catalogue[3]['calibrate']['features'][0]}", params={"sae": "lens"})
    assert calibrated.json()["sweep"]["all"]

    labels = [e["label"] for e in read_entries(own_catalogue[2])]
    inspected = http.post("/v1/features/inspect", json={"text": "Once upon a time, in a land far away",
                                                        "sae": "lens", "top_k": 3}).json()
    active = [f for t in inspected["tokens"] for f in t["features"]]
    assert active and all(f["label"] == labels[f["id"]] for f in active)
    assert all(f["label"] == labels[f["id"]] for f in inspected["top_features"])

    r = http.post("/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 4,
                                           "temperature": 0, "return_features": {"sae": "lens", "top_k": 3}})
    generated = [f for token in r.json()["choices"][0]["features"] for f in token["features"]]
    assert generated and all(f["label"] == labels[f["id"]] for f in generated)

