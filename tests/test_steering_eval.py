"""How steered replies are judged, how a strength is recommended, and how search ranks steerable
features: the pure pieces (the engine-driven run is in test_steering_sweep.py)."""

from __future__ import annotations

import json

from steer_plugin.search.catalogue import FeatureCatalogue, read_entries
from steer_plugin.search.concepts import ConceptBook
from steer_plugin.core.config import DEFAULT_SAE_DIR
from steer_workbench.efficacy import REPORT_HEADER, candidates_for, control_prompts
from steer_workbench.efficacy_report import comparison_markdown, efficacy_markdown
from steer_workbench.protocols import SWEEP_PROMPTS, TUNING_PROMPTS
from steer_workbench.steering_eval import (DECODING, Judged, count_mentions, describe_decoding, distinct_trigrams,
                                           mention_rate, mentions, median)
from steer_workbench.strengths import (SWEEP_FIELDS, drift_words, feature_words, recommend, refinements, screen_choice,
                                       steered_concepts, stored_cells, swept_features, without_sweeps)


def test_mentions_are_whole_words_with_plurals():
    assert mentions("I love my Dogs.", ["dog"]) and count_mentions("a dog, two dogs", ["dog"]) == 2
    assert not mentions("the dogma", ["dog"]) and mentions("beaches", ["beach"])
    assert not mentions("any text at all", []) and count_mentions("x", []) == 0  # no words: nothing shown


def test_distinct_trigrams_falls_when_a_reply_loops():
    assert distinct_trigrams("the quick brown fox jumps over the lazy dog") == 1.0
    looped = distinct_trigrams("the perfect meal, " * 10)
    assert looped < 0.2 and distinct_trigrams("hi") == 1.0
    assert median([3, 1, 2]) == 2 and median([1, 2, 3, 4]) == 2.5


def _cell(rate, ppl, trigrams=1.0):
    return {"concept_rate": rate, "median_ppl": ppl, "distinct_trigrams": trigrams}


def test_recommended_strength_is_the_most_fluent_of_the_nearly_most_effective():
    cells = {2.0: _cell(0.3, 3.0), 3.0: _cell(0.8, 5.0), 4.0: _cell(0.8, 6.0), 6.0: _cell(1.0, 20.0)}
    assert recommend(cells, baseline_ppl=2.5) == 3.0  # 6 is more effective but not fluent; 3 ties 4, more fluent
    scoped = {(1.5, "all"): _cell(0.75, 5.0), (1.5, "generated"): _cell(0.75, 3.0), (2.0, "all"): _cell(0.5, 4.0)}
    assert recommend(scoped, 2.5) == (1.5, "generated")
    assert recommend({3.0: _cell(1.0, 4.0, trigrams=0.5)}, 2.5) is None  # loops
    assert recommend({3.0: _cell(0.2, 4.0)}, 2.5) is None  # fluent but shows the feature too rarely
    assert recommend({2.0: _cell(0.2, None), 3.0: _cell(0.6, 4.0)}, 2.5) == 3.0  # unjudged: never recommended
    # within two of 16 replies of the best (as stored: 0.938 - 0.812), the more fluent; further, the more effective
    assert recommend({1.5: _cell(0.938, 6.6), 1.75: _cell(0.812, 6.4), 2.0: _cell(0.875, 6.8)}, 2.5) == 1.75
    assert recommend({1.25: _cell(0.5, 4.0), 2.0: _cell(0.875, 6.8)}, 2.5) == 2.0


def test_a_feature_shown_only_where_replies_break_gets_the_strength_halfway_below():
    grid = {"all": (1.25, 1.5, 2.0), "generated": (1.25, 1.5, 2.0), "prompt": (2.0, 4.0)}
    cells = {(1.25, "all"): _cell(0.2, None), (1.5, "all"): _cell(0.8, 9.0), (2.0, "all"): _cell(1.0, 20.0),
             (1.25, "generated"): _cell(0.6, 8.0), (1.5, "generated"): _cell(0.9, 12.0), (2.0, "generated"): _cell(0.1, None)}
    assert refinements(cells, grid, baseline_ppl=2.5) == [(1.375, "all"), (1.125, "generated")]  # 1× below the grid
    assert refinements({(1.5, "all"): _cell(0.3, None)}, grid, 2.5) == []  # never shown: nothing to look for
    assert refinements(cells | {(2.0, "all"): _cell(0.7, 5.0)}, grid, 2.5) == []  # already recommended
    only_all = {k: c for k, c in cells.items() if k[1] == "all"}  # a sweep of --scopes all: the rest of the grid too
    assert refinements(only_all, grid, 2.5) == [(1.375, "all"), (1.25, "generated"), (1.5, "generated"), (2.0, "generated")]
    assert refinements(cells | {(1.375, "all"): _cell(0.3, None)}, grid, 2.5) == [(1.125, "generated")]  # run already
    prompted = cells | {(2.0, "prompt"): _cell(0.1, None), (4.0, "prompt"): _cell(0.75, 8.0)}
    assert refinements(prompted, grid, 2.5) == [(1.375, "all"), (1.125, "generated"), (3.0, "prompt")]  # its own grid


def test_feature_words_come_from_what_the_clamp_promotes_and_what_the_feature_fires_on():
    entry = {"steered_tokens": [{"token": " dogs", "gain": 0.2}, {"token": " a", "gain": 0.1}],
             "top_tokens": [{"token": "puppy", "count": 3}, {"token": "'s", "count": 1}]}
    assert feature_words(entry) == ["dog", "puppy"]
    assert feature_words(entry, ignore={"dog"}) == ["puppy"]  # said unsteered anyway: no evidence
    assert control_prompts(("a", "b", "c")) == {"a": "b", "b": "c", "c": "a"}


def test_drift_words_are_those_many_clamps_push_towards():
    def entry(*steered):
        return {"steered_tokens": [{"token": t, "gain": 0.1} for t in steered]}

    entries = [entry(" probably", " " + "ab"[i % 2] * (3 + i)) for i in range(60)] + [entry(" dogs")] * 2 + [entry()] * 140
    assert drift_words(entries) == {"probably"}  # in 60 of 202 entries; "dog" in 2 (< 1 % would be < 2.02)
    assert "probably" not in feature_words(entries[0], drift_words(entries))


def _entry(i, tokens, strength=None, steered=()):
    return {"id": i, "label": " / ".join(tokens), "frequency": 0.01, "recommended_strength": strength,
            "top_tokens": [{"token": t, "count": 1} for t in tokens],
            "steered_tokens": [{"token": t, "gain": 0.1} for t in steered], "top_contexts": []}


def test_search_ranks_a_steerable_match_first_when_it_matches_nearly_as_well():
    catalogue = FeatureCatalogue([
        _entry(0, ["dog"]),  # the best input-side match, never steered anything
        _entry(1, ["dog", "cat"], strength=3.0, steered=["dog"]),  # steerable, matches well
        _entry(2, ["dog", "cat", "fish", "cow", "pig", "hen", "ram"], strength=2.0),  # steerable, weak match
    ])
    ranked = [e["id"] for e, _ in catalogue.search("dogs", 3)[0]]
    assert ranked == [1, 0, 2]


def test_steerable_hits_are_judged_against_the_best_match_not_the_first_hit():
    catalogue = FeatureCatalogue([
        _entry(0, ["dog"]),  # the best match (4.0), no recommended strength
        _entry(1, ["dog", "cat"], strength=3.0),  # 2.5: within half the best, ranked first
        _entry(2, ["dog", "cat", "fish", "cow"], strength=2.0),  # 1.75: within half the first hit only
    ])
    assert {e["id"]: score for e, score in catalogue.search("dogs", 3)[0]} == {0: 4.0, 1: 2.5, 2: 1.75}
    assert [e["id"] for e, _ in catalogue.search("dogs", 3)[0]] == [1, 0, 2]
    assert [e["id"] for e in catalogue.steerable_hits("dogs", 3)] == [1]


def test_a_feature_measured_to_steer_towards_the_query_ranks_first():
    sea = {"concept": "the sea", "words": ["sea", "ocean", "wave"], "rate": 0.75}
    catalogue = FeatureCatalogue([
        _entry(0, ["ocean"], strength=1.5, steered=["ocean"]),  # the best word match, steerable
        _entry(1, ["of", "the", "galaxies"], strength=1.25) | {"steers": [sea]},  # its replies talk of the sea
        _entry(2, ["tide"], strength=2.0) | {"steers": [sea | {"rate": 0.5}]},
        _entry(3, ["ocean", "wave"]) | {"steers": None},  # unmeasured
    ])
    assert [e["id"] for e, _ in catalogue.search("the ocean", 4)[0]] == [1, 2, 0, 3]  # by the keywords, not only the name
    assert [e["id"] for e in catalogue.steerable_hits("sea", 4)] == [1, 2]  # 0 matches "ocean" only
    assert catalogue.search("galaxies", 1)[0][0][0]["id"] == 1 and not catalogue.search("space", 1)[0]


def test_the_sweep_takes_the_top_hits_of_each_concept_and_the_first_of_each_of_its_words():
    entries = [_entry(0, ["dog"]), _entry(1, ["dog", "cat"]), _entry(2, ["dog", "cat", "cow"]),
               _entry(3, ["puppy"]), _entry(4, ["puppy", "kitten"]), _entry(5, ["bark"], steered=["bark"])]
    entries[5]["steered_mass"] = 0.9
    assert swept_features(entries, 0, ["dogs"], hits=2, words=["puppy"]) == [0, 1, 3]
    assert swept_features(entries, 1, [], words=["puppies", "kitten"]) == [3, 4, 5]  # 5: highest steered mass


def test_sweep_records_the_concepts_a_feature_steers_towards():
    def judged(*texts):
        return [Judged(t, None, None, 1.0) for t in texts]

    replies = judged("The ocean waves.", "A sea breeze.", "I like dogs.", "Rain again.")
    unsteered = judged("I like dogs.", "My dog.", "Nothing.", "Tea.")
    concepts = {"the sea": ["sea", "ocean"], "dogs": ["dog"], "rain": ["rain"]}
    unsteered_rates = {name: mention_rate(unsteered, keywords) for name, keywords in concepts.items()}
    assert steered_concepts(replies, unsteered_rates, concepts) == [{"concept": "the sea", "words": ["sea", "ocean"], "rate": 0.5}]


def test_the_screen_chooses_the_features_whose_replies_turn_to_a_concept_most():
    def judged(*texts):
        return [Judged(t, None, None, 1.0) for t in texts]

    unsteered = judged("A walk in the park.", "I like my dog.")
    replies = [judged("The sea.", "Waves."),  # 0: the sea in one reply
               judged("The sea, the sea.", "The ocean."),  # 1: in both, three times
               judged("The sea.", "An ocean."),  # 2: in both, twice
               judged("My dog.", "A dog."),  # 3: dogs, but unsteered replies name them too (in one)
               judged("Nothing.", "Nothing.")]
    concepts = {"the sea": ["sea", "ocean"], "dogs": ["dog"]}
    assert screen_choice(replies, unsteered, concepts, 2) == [1, 2, 3]
    assert screen_choice(replies, unsteered, {"dogs": ["dog"]}, 2) == [3]  # 2 of 2 beats 1 of 2; no one else above it
    assert screen_choice(replies, unsteered, {"the sea": ["sea", "ocean"]}, 3) == [0, 1, 2]


def test_a_kept_sweep_is_read_back_as_cells_and_candidates_are_chosen_as_by_a_fresh_sweep():
    entries = read_entries(DEFAULT_SAE_DIR)
    swept = next(e for e in entries if e.get("sweep") and e["recommended_strength"] is not None)
    cells = stored_cells(swept)
    assert all(isinstance(s, float) and t in swept["sweep"] for s, t in cells)
    assert recommend(cells, max(1.0, swept["sweep"][swept["recommended_tokens"]][f"{swept['recommended_strength']:g}"]["median_ppl"] / 3)) \
        == (swept["recommended_strength"], swept["recommended_tokens"])
    assert stored_cells({"sweep": None}) == {} == stored_cells({})
    # cells stored before the confirmation stage were measured on the tuning prompts alone
    assert stored_cells({"sweep": {"all": {"1.5": _cell(0.5, 4.0)}}})[1.5, "all"]["prompts"] == len(TUNING_PROMPTS)
    assert all(c["prompts"] in (len(TUNING_PROMPTS), len(SWEEP_PROMPTS)) for c in cells.values())
    fresh = without_sweeps(entries)
    assert not any(k in e for e in fresh for k in SWEEP_FIELDS) and entries[swept["id"]].get("sweep")  # a copy
    assert fresh[swept["id"]]["label"] == swept["label"]


def test_efficacy_tries_good_steerable_matches_then_steerable_aligned_features():
    catalogue = FeatureCatalogue([
        _entry(0, ["dog"]),  # the best match, no recommended strength: not tried
        _entry(1, ["dog", "cat"], strength=3.0, steered=["dog"]),
        _entry(2, ["dog", "cat", "fish", "cow", "pig", "hen", "ram"], strength=2.0),  # matches too weakly
        _entry(3, ["bark"], strength=1.5),  # aligned with the concept, steerable
        _entry(4, ["leash"]),  # aligned, no recommended strength
    ])
    tried = candidates_for(catalogue, "dogs", 4, aligned=[4, 1, 3])
    assert [(e["id"], how) for e, how in tried] == [(1, "search"), (3, "alignment")]


def test_the_journey_counts_what_the_search_offers_first():
    from steer_workbench.efficacy import first_offers, first_steered

    first = first_offers(["dogs", "cats", "pizza", "rain"], with_clamp={"dogs", "rain"}, with_feature={"dogs", "cats"})
    assert first == {"dogs": "concept clamp", "cats": "feature", "pizza": None, "rain": "concept clamp"}
    # dogs: the feature steers but the concept clamp offered above it does not; rain: the clamp does
    assert first_steered(first, steered=["dogs", "cats"], concept_steered=["rain"]) == ["cats", "rain"]


def test_concept_alignment_reports_the_top_hit_and_the_best_aligned_feature():
    import torch

    from steer_workbench.efficacy import concept_alignment

    catalogue = FeatureCatalogue([
        {"id": i, "label": label, "frequency": 0.01, "top_tokens": [{"token": label, "count": 1}], "top_contexts": []}
        for i, label in enumerate(["dog", "bark", "sea"])])
    cosines = torch.tensor([[0.2, 0.7, 0.0], [0.0, 0.1, 0.5]])  # [vectors, d_sae]
    book = ConceptBook([{"concept": "dogs", "keywords": ["dog"], "cosine": 0.85, "recommended_dose": 0.25}])
    rows = concept_alignment(catalogue, book, cosines, ["dogs", "the sea"])
    assert [(r["top_hit"], r["top_hit_cos"], r["best_feature"], r["best_cos"], r["concept_clamp_cos"])
            for r in rows] == [(0, 0.2, 1, 0.7, 0.85), (2, 0.5, 2, 0.5, None)]
    assert rows[0]["best_label"] == "bark"


def test_a_cached_reply_is_keyed_by_what_the_sae_files_say(tmp_path):
    """A rebuilt SAE (new weights or max activations) must not be answered from replies cached for the
    old one under the same clamp; its catalogue and concept clamps do not change what a clamp does."""
    import shutil

    from steer_plugin.core.config import DEFAULT_SAE_DIR
    from steer_plugin.core.sae import STATS_FILENAME
    from steer_workbench.steering_eval import fingerprint

    copy = tmp_path / "sae"
    shutil.copytree(DEFAULT_SAE_DIR, copy, ignore=shutil.ignore_patterns("feature_catalogue.json*", ".*"))
    before = fingerprint(copy)
    (copy / "concepts.json").write_text("{}")
    assert fingerprint(copy) == before == fingerprint(DEFAULT_SAE_DIR)
    (copy / STATS_FILENAME).write_bytes((copy / STATS_FILENAME).read_bytes() + b" ")
    assert fingerprint(copy) != before


def test_shipped_reports_are_what_their_json_renders_to():
    efficacy = json.loads((DEFAULT_SAE_DIR / "efficacy.json").read_text())
    comparison = json.loads((DEFAULT_SAE_DIR / "comparison.json").read_text())
    assert efficacy_markdown(efficacy) == (DEFAULT_SAE_DIR / "efficacy.md").read_text()
    header = {k: comparison.pop(k) for k in REPORT_HEADER}
    assert comparison_markdown(header | {"comparison": comparison}) == (DEFAULT_SAE_DIR / "comparison.md").read_text()
    assert describe_decoding(DECODING) == "greedy, frequency penalty 0.5"  # the shipped reports' decoding
    assert efficacy["decoding"] == header["decoding"] == DECODING
