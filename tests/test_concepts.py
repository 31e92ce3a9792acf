"""Concept clamps: features chosen by matching pursuit along a concept's direction, scaled to a dose of
the stream's norm, tuned through the real engine, and found by word search."""

from __future__ import annotations

import json

import pytest
import torch

from engines import MODEL
from steer_plugin.search.catalogue import read_entries
from steer_plugin.search.concepts import CONCEPTS_FILENAME, ConceptBook, clamps_at
from steer_plugin.core.config import DEFAULT_SAE_DIR
from steer_plugin.core.sae import load_config
from steer_plugin.core.spec import Limits, parse_clamps
from steer_workbench import concepts
from steer_workbench.directions import load_directions, save_directions


def test_pursuit_recovers_a_sparse_mix_of_decoder_rows():
    gen = torch.Generator().manual_seed(1)
    W_dec = torch.randn(512, 64, generator=gen)  # [d_sae, d]
    direction = 2.0 * W_dec[5] - 1.0 * W_dec[9] + 0.5 * W_dec[100]
    chosen, weights, cosine = concepts.pursue(W_dec, direction, 3)
    assert sorted(chosen) == [5, 9, 100] and cosine == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(dict(zip(chosen, weights.tolist()))[9], -1.0, atol=1e-4, rtol=0)
    more, _, more_cosine = concepts.pursue(W_dec, torch.randn(64, generator=gen), 8)
    assert len(set(more)) == 8  # never the same row twice
    assert 0 < concepts.pursue(W_dec, direction + torch.randn(64, generator=gen), 2)[2] < more_cosine + 1


def test_one_vs_rest_leaves_out_replies_that_name_the_concept():
    d = 4
    about = ["dogs", "dogs", "cats", "cats"]
    replies = ["a dog", "dogs bark", "my cat chased a dog", "cats nap"]
    counts = torch.tensor([2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    per_token = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 1.0, 0, 0]], dtype=torch.float64)
    vectors = concepts.one_vs_rest(per_token * 2, counts, about, replies, {"dogs": ["dog"], "cats": ["cat"]})
    # dogs: own mean [1,0,0,0]; rest = only "cats nap" (the other cat reply names a dog): [0,1,0,0]
    torch.testing.assert_close(vectors[0], torch.tensor([1.0, -1.0, 0, 0]))
    torch.testing.assert_close(vectors[1], torch.tensor([-1.0, 3.0, 0, 0]))
    assert vectors.shape == (2, d)


def test_clamps_scale_with_the_dose_and_pass_the_request_contract():
    entry = {"features": [{"feature": 3, "label": "x", "unit_value": 2.0}, {"feature": 7, "label": "y", "unit_value": -1.0}]}
    clamps = clamps_at(entry, 0.25, "generated")
    assert [c["value"] for c in clamps] == [0.5, -0.25] and {c["mode"] for c in clamps} == {"add"}
    parsed = parse_clamps(json.dumps(clamps), Limits.one(16, 32))
    assert list(parsed.feature) == [3, 7]


def test_search_finds_a_concept_by_name_then_keywords():
    book = ConceptBook([
        {"concept": "the ocean", "keywords": ["sea", "ocean", "wave"], "recommended_dose": 0.25},
        {"concept": "the sea", "keywords": ["sea", "ocean", "beach"], "recommended_dose": None},
        {"concept": "dogs", "keywords": ["dog", "puppy"], "recommended_dose": 0.25},
    ])
    assert [e["concept"] for e in book.search("the sea")] == ["the sea", "the ocean"]  # name first
    assert [e["concept"] for e in book.search("sea", steerable_only=True)] == ["the ocean"]
    assert [e["concept"] for e in book.search("Puppies")] == ["dogs"]
    assert book.search("cars") == [] and ConceptBook.load("/nonexistent").entries == []


def test_the_shipped_concept_clamps_are_ready_to_send():
    book = ConceptBook.load(DEFAULT_SAE_DIR)
    steerable = [e for e in book.entries if e["recommended_dose"] is not None]
    assert len(book.entries) >= 30 and steerable
    for e in steerable:
        clamps = e["feature_clamps"]
        assert len(clamps) == len(e["features"]) <= 32 and {c["tokens"] for c in clamps} == {e["recommended_tokens"]}
        parse_clamps(json.dumps(clamps), Limits.one(load_config(DEFAULT_SAE_DIR).d_sae, 32))


@pytest.mark.slow
def test_concept_clamps_built_and_tuned_through_the_engine(tmp_path):
    from steer_plugin.core.sae import SAE
    from steer_workbench.steering_eval import Bench, Job

    sae = SAE.load(DEFAULT_SAE_DIR)
    labels = [e["label"] for e in read_entries(DEFAULT_SAE_DIR)]
    named = {"dogs": ["dog", "puppy"], "the sea": ["sea", "ocean"], "music": ["music", "song"]}
    bench = Bench(MODEL, [{"path": str(DEFAULT_SAE_DIR), "id": "sae"}], max_tokens=16, cache=tmp_path / "replies.json")
    try:
        entries, built, norm = concepts.build(sae, labels, MODEL, bench, named, 4, only={"dogs", "music"})
        report = concepts.tune(bench, entries, "sae", grid=((0.25, "generated"), (2.0, "generated")))
        plain = bench.run([Job("What is on your mind?")], fluency=False)[0]
        pushed = bench.run(concepts.concept_jobs(entries[0], ["What is on your mind?"], "sae", 0.25, "generated"),
                           fluency=False)[0]
    finally:
        bench.close()
    path = tmp_path / "directions.safetensors"
    save_directions(path, {"old": torch.ones(sae.cfg.d_in), "music": torch.zeros(sae.cfg.d_in)}, 1.0, 15)
    save_directions(path, built, norm, 15)  # merged by name: music replaced, old kept
    names, directions, median_norm = load_directions(path)
    assert names == ["old", "music", "dogs"] and directions.shape == (3, sae.cfg.d_in) and median_norm == pytest.approx(norm) and norm > 10
    assert [e["concept"] for e in entries] == ["dogs", "music"]  # the sea only contrasted
    directions = [built[e["concept"]] for e in entries]
    for entry, direction in zip(entries, directions):
        ids = [f["feature"] for f in entry["features"]]
        added = torch.tensor([f["unit_value"] for f in entry["features"]]) @ sae.W_dec[ids]
        assert len(set(ids)) == 4 and added.norm() == pytest.approx(median_norm, rel=1e-3)  # dose 1 = the norm
        assert torch.nn.functional.cosine_similarity(added, direction, dim=0) == pytest.approx(entry["cosine"], abs=2e-3)
        assert set(entry["sweep"]) == {"generated"} and set(entry["sweep"]["generated"]) == {"0.25", "2"}
        assert entry["recommended_dose"] in (None, 0.25)  # twice the stream's norm is never fluent
        assert entry["recommended_sampling"] == (None if entry["recommended_dose"] is None else bench.sampling)
    assert report["concepts"] == 2 and pushed.text != plain.text and -1 <= entries[0]["split_half"] <= 1
    (tmp_path / CONCEPTS_FILENAME).write_text(json.dumps({"concepts": entries}))
    assert ConceptBook.load(tmp_path).search("puppies")[0]["concept"] == "dogs"
