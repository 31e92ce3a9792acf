import hashlib
import json
import math
import re

import numpy as np
import pytest

from steer_plugin.core.spec import (SALT_PREFIX, ClampError, Limits, Steering, VectorError, cache_salt, clamp_list,
                                    merge_plans, merge_vector_plans, parse_clamps, parse_vectors, vector_list)

LIMITS = Limits.one(d_sae=100, max_clamps=4, max_activation=np.full(100, 2.0, dtype=np.float32),
                    vectors=("calm", "tea"))


def steering(clamps=None, vectors=None, limits=LIMITS):
    return Steering.of(parse_clamps(clamps, limits), parse_vectors(vectors, limits), limits)


def test_modes_become_affine_edits():
    plan = parse_clamps([{"feature": 5, "value": 3}, {"feature": 1, "value": 2, "mode": "add"},
                         {"feature": 9, "value": 0.5, "mode": "scale", "tokens": "prompt"}], LIMITS)
    assert plan.feature.tolist() == [1, 5, 9]  # canonical order
    assert plan.mul.tolist() == [1.0, 0.0, 0.5]
    assert plan.add.tolist() == [2.0, 3.0, 0.0]
    assert plan.tokens.tolist() == [0, 0, 1]


def test_unit_max_multiplies_by_the_feature_max():
    plan = parse_clamps([{"feature": 7, "value": 10, "unit": "max"}], LIMITS)
    assert plan.add.tolist() == [20.0]


def test_json_string_and_list_agree_and_empty_means_none():
    clamps = [{"feature": 3, "value": 1.5}]
    assert parse_clamps(json.dumps(clamps), LIMITS).canonical == parse_clamps(clamps, LIMITS).canonical
    assert parse_clamps([], LIMITS) is None
    assert parse_clamps("[]", LIMITS) is None


@pytest.mark.parametrize("raw, field", [
    ({"feature": 1, "value": 1}, "must be a list"),
    ([{"feature": 1, "value": 1, "colour": "red"}], "feature_clamps[0].colour"),
    ([{"value": 1}], "feature_clamps[0].feature"),
    ([{"feature": 1}], "feature_clamps[0].value"),
    ([{"feature": 100, "value": 1}], "feature_clamps[0].feature"),
    ([{"feature": -1, "value": 1}], "feature_clamps[0].feature"),
    ([{"feature": 1.5, "value": 1}], "feature_clamps[0].feature"),
    ([{"feature": "3", "value": 1}], "feature_clamps[0].feature"),
    ([{"feature": 1, "value": "big"}], "feature_clamps[0].value"),
    ([{"feature": 1, "value": math.nan}], "feature_clamps[0].value"),
    ([{"feature": 1, "value": math.inf}], "feature_clamps[0].value"),
    ([{"feature": 1, "value": 1, "mode": "multiply"}], "feature_clamps[0].mode"),
    ([{"feature": 1, "value": 1, "unit": "sigma"}], "feature_clamps[0].unit"),
    ([{"feature": 1, "value": 1, "tokens": "some"}], "feature_clamps[0].tokens"),
    ([{"feature": 1, "value": 1}, {"feature": 1, "value": 2}], "feature_clamps[1].feature"),
    ([{"feature": i, "value": 1} for i in range(5)], "at most 4"),
    ("[{not json", "not valid JSON"),
    ([{"feature": 1, "value": 1, "when": "sometimes"}], 'feature_clamps[0].when: Value error, a condition is "active"'),
    ([{"feature": 1, "value": 1, "when": 3}], "feature_clamps[0].when"),
    ([{"feature": 1, "value": 1, "when": {"above": 1}}], "feature_clamps[0].when.feature"),
    ([{"feature": 1, "value": 1, "when": {"feature": 100}}], "feature_clamps[0].when.feature: 100 is out of range"),
    ([{"feature": 1, "value": 1, "when": {"feature": 2, "above": math.nan}}], "feature_clamps[0].when.above"),
    ([{"feature": 1, "value": 1, "when": {"feature": 2, "above": "high"}}], "feature_clamps[0].when.above"),
    ([{"feature": 1, "value": 1, "when": {"feature": 2, "sae": "other"}}], "feature_clamps[0].when.sae: unknown SAE"),
    ([{"feature": 1, "value": 1, "when": {"feature": 2, "if": 1}}], "feature_clamps[0].when.if"),
])
def test_bad_input_names_the_clamp_and_field(raw, field):
    with pytest.raises(ClampError) as err:
        parse_clamps(raw, LIMITS)
    assert field in str(err.value)


def test_unit_max_without_a_max_table_is_rejected():
    no_max = Limits.one(d_sae=100, max_clamps=4, max_activation=None)
    with pytest.raises(ClampError, match=r"feature_clamps\[0\]\.unit"):
        parse_clamps([{"feature": 1, "value": 1, "unit": "max"}], no_max)


def test_cache_salt_depends_on_the_clamp_set_only():
    a = steering([{"feature": 1, "value": 1}, {"feature": 2, "value": 3}])
    b = steering([{"feature": 2, "value": 3}, {"feature": 1, "value": 1.0}])
    c = steering([{"feature": 1, "value": 2}])
    assert cache_salt(None, a, 10) == cache_salt(None, b, 10) != cache_salt(None, c, 10)
    assert cache_salt(None, a, 10) == cache_salt(None, a, 99)  # all-position clamps: reused across turns
    assert cache_salt(None, None, 10) is None  # plain requests share vLLM's cache as usual
    assert cache_salt("user", a, 10) not in (cache_salt(None, a, 10), cache_salt("other", a, 10))


def test_scoped_clamps_key_the_cache_by_the_prompt_boundary():
    scoped = steering([{"feature": 1, "value": 1, "tokens": "prompt"}])
    assert cache_salt(None, scoped, 10) != cache_salt(None, scoped, 11)
    scoped_vector = steering(vectors=[{"vector": "calm", "scale": 1, "tokens": "generated"}])
    assert cache_salt(None, scoped_vector, 10) != cache_salt(None, scoped_vector, 11)


@pytest.mark.parametrize("forged", [
    lambda plan: cache_salt(None, plan, 10),  # the exact salt the plugin derives for the set
    lambda plan: cache_salt(None, plan, 10)[len(SALT_PREFIX):],
    lambda plan: "steer:" + hashlib.sha256(plan.canonical.encode()).hexdigest()[:32],
])
def test_no_client_salt_reaches_a_derived_salt(forged):
    """An unsteered request carrying any salt a client could compute never shares KV with a steered one."""
    plan = steering([{"feature": 1, "value": 1}])
    derived = cache_salt(None, plan, 10)
    assert cache_salt(forged(plan), None, 10) != derived
    assert cache_salt(forged(plan), None, 10).startswith(SALT_PREFIX)


TWO = Limits({"res": LIMITS.saes["sae"], "mlp": Limits.one(d_sae=10, max_clamps=4).saes["sae"]}, max_clamps=3)
"""Two SAEs: `res` (100 features, with max activations) first, `mlp` (10 features, none)."""


def test_clamps_name_their_sae_and_default_to_the_first():
    plan = parse_clamps([{"feature": 5, "value": 1}, {"sae": "mlp", "feature": 5, "value": 2},
                         {"sae": "res", "feature": 6, "value": 3, "unit": "max"}], TWO)
    assert plan.sae.tolist() == [0, 0, 1] and plan.feature.tolist() == [5, 6, 5]
    assert plan.only(1).add.tolist() == [2.0] and plan.only(0).add.tolist() == [1.0, 6.0]
    assert parse_clamps([{"sae": "mlp", "feature": 1, "value": 1}], TWO).only(0) is None
    # The same feature id on two SAEs is two features; the canonical form (cache key) tells them apart.
    res, mlp = (parse_clamps([{"sae": s, "feature": 5, "value": 1}], TWO).canonical for s in ("res", "mlp"))
    assert res != mlp


@pytest.mark.parametrize("clamps, words", [
    ([{"sae": "attn", "feature": 1, "value": 1}], "feature_clamps[0].sae: unknown SAE 'attn'; this server has 'res', 'mlp'"),
    ([{"sae": "mlp", "feature": 10, "value": 1}], "feature_clamps[0].feature: 10 is out of range (SAE mlp has 10"),
    ([{"sae": "mlp", "feature": 1, "value": 1, "unit": "max"}], "SAE mlp has none"),
    ([{"sae": "mlp", "feature": 1, "value": 1}, {"sae": "mlp", "feature": 1, "value": 2}],
     "feature_clamps[1].feature: feature 1 of SAE mlp already clamped by feature_clamps[0]"),
    ([{"sae": s, "feature": 1, "value": 1} for s in ("res", "mlp")] + [{"feature": 2, "value": 1}] * 2,
     "4 clamps given, at most 3"),
    ([{"sae": 3, "feature": 1, "value": 1}], "feature_clamps[0].sae"),
])
def test_bad_sae_references_name_the_clamp(clamps, words):
    with pytest.raises(ClampError) as e:
        parse_clamps(clamps, TWO)
    assert words in str(e.value)


@pytest.mark.parametrize("raw, words", [
    ("[" * 20_000 + "]" * 20_000, "feature_clamps: JSON nested deeper than"),
    ("[" * 70 + "]" * 70, "feature_clamps[0][0]: JSON nested deeper than"),
    ('[{"feature": ' + "7" * 5000 + ', "value": 1}]', "feature_clamps[0].feature: a number with 5000 digits"),
    ('[{"feature": 1, "value": -' + "7" * 500 + "}]", "feature_clamps[0].value: a number with 500 digits"),
])
def test_the_string_form_is_read_with_the_limits_of_a_body(raw, words):
    """A clamp set sent as a JSON string (top level or vllm_xargs) is as untrusted as a body: a
    RecursionError or Python's int-size ValueError would be a 500 or a 400 naming nothing."""
    with pytest.raises(ClampError, match=re.escape(words)):
        parse_clamps(raw, LIMITS)


def test_a_variants_clamps_with_the_requests_after_them():
    variant = parse_clamps([{"feature": 5, "value": 1}, {"sae": "mlp", "feature": 2, "value": 0.3, "mode": "add"}], TWO)
    own = parse_clamps([{"feature": 5, "value": 0.1, "unit": "max", "tokens": "prompt"}], TWO)
    merged = merge_plans(variant, own, TWO, "variant v")
    # the request's clamp on res/5 replaces the variant's; values stay exactly as sent (0.3, not float32's)
    assert json.loads(merged.canonical) == [["res", 5, 0.0, 0.2, 1], ["mlp", 2, 1.0, 0.3, 0]]
    assert merge_plans(variant, None, TWO, "variant v").canonical == variant.canonical
    assert merge_plans(None, None, TWO, "variant v") is None
    with pytest.raises(ClampError, match="variant v brings 2 clamps and the request 2: 4 in all, at most 3"):
        merge_plans(variant, parse_clamps([{"feature": 7, "value": 1}, {"feature": 8, "value": 1}], TWO), TWO,
                    "variant v")


def test_a_condition_is_part_of_the_canonical_clamp_set():
    plain = parse_clamps([{"feature": 5, "value": 3}], LIMITS)
    active = parse_clamps([{"feature": 5, "value": 3, "when": "active"}], LIMITS)
    # "active" is the clamped feature itself above 0; in the clamp's unit, like its value
    assert active.canonical == parse_clamps([{"feature": 5, "value": 3, "when": {"feature": 5}}], LIMITS).canonical
    other = parse_clamps([{"feature": 5, "value": 1.5, "unit": "max", "when": {"feature": 8, "above": 0.25}}], LIMITS)
    assert json.loads(other.canonical) == [["sae", 5, 0.0, 3.0, 0, 8, 0.5]]
    assert other.cond.tolist() == [8] and other.above.tolist() == [0.5]
    assert plain.cond.tolist() == [-1]
    digests = {Steering.of(plan, None, LIMITS).digest for plan in (plain, active, other)}
    assert len(digests) == 3


def test_a_condition_reads_a_feature_of_the_clamps_own_sae():
    with pytest.raises(ClampError, match=r"feature_clamps\[0\]\.when\.sae: a condition reads a feature of the "
                                         r"clamp's own SAE \(res\), not mlp"):
        parse_clamps([{"feature": 1, "value": 1, "when": {"sae": "mlp", "feature": 2}}], TWO)
    same = parse_clamps([{"sae": "mlp", "feature": 1, "value": 1, "when": {"sae": "mlp", "feature": 2}}], TWO)
    assert same.cond.tolist() == [2]


def test_a_plan_written_back_as_clamps_reads_back_the_same():
    plan = parse_clamps([{"feature": 9, "value": 0.7, "unit": "max", "mode": "add", "tokens": "generated",
                          "when": {"feature": 4, "above": 0.5}},
                         {"sae": "mlp", "feature": 3, "value": 1.3, "mode": "scale"}, {"feature": 1, "value": 0}], TWO)
    again = parse_clamps(json.dumps(clamp_list(plan, TWO)), TWO)
    assert again.canonical == plan.canonical and again.mode.tolist() == plan.mode.tolist()


def test_vectors_are_validated_and_sorted_by_name():
    plan = parse_vectors([{"vector": "tea", "scale": 2, "tokens": "prompt"}, {"vector": "calm", "scale": -0.5}], LIMITS)
    assert plan.vector.tolist() == [0, 1] and plan.scale.tolist() == [-0.5, 2.0] and plan.tokens.tolist() == [0, 1]
    assert parse_vectors(json.dumps(vector_list(plan, LIMITS)), LIMITS).rows == plan.rows
    assert parse_vectors([], LIMITS) is None


@pytest.mark.parametrize("raw, words", [
    ({"vector": "calm", "scale": 1}, "steering_vectors: must be a list"),
    ([{"vector": "storm", "scale": 1}], "steering_vectors[0].vector: unknown vector 'storm'; this server has 'calm', 'tea'"),
    ([{"vector": "calm"}], "steering_vectors[0].scale"),
    ([{"vector": "calm", "scale": math.inf}], "steering_vectors[0].scale"),
    ([{"vector": "calm", "scale": "1"}], "steering_vectors[0].scale"),
    ([{"vector": "calm", "scale": 1, "tokens": "some"}], "steering_vectors[0].tokens"),
    ([{"vector": "calm", "scale": 1, "layer": 3}], "steering_vectors[0].layer"),
    ([{"vector": "calm", "scale": 1}, {"vector": "calm", "scale": 2}], "steering_vectors[1].vector: calm already given"),
    ([{"vector": "calm", "scale": 1}] * 3, "3 vectors given, this server has 2"),
    ("[{", "steering_vectors: not valid JSON"),
])
def test_bad_vectors_name_the_entry_and_field(raw, words):
    with pytest.raises(VectorError) as err:
        parse_vectors(raw, LIMITS)
    assert words in str(err.value)


def test_a_server_without_vectors_says_how_to_load_one():
    with pytest.raises(VectorError, match="this server has none \\(start it with --vector NAME=FILE\\)"):
        parse_vectors([{"vector": "calm", "scale": 1}], TWO)


def test_the_canonical_steering_holds_clamps_and_vectors():
    both = steering([{"feature": 3, "value": 1}], [{"vector": "tea", "scale": 0.5}])
    assert json.loads(both.canonical) == {"clamps": [["sae", 3, 0.0, 1.0, 0]], "vectors": [["tea", 0.5, 0]]}
    assert both.counts == (1, 1)
    assert json.loads(steering(vectors=[{"vector": "calm", "scale": 1}]).canonical) == {"vectors": [["calm", 1, 0]]}
    assert steering() is None
    # a vector, its scale and its scope are all part of the identity (and so of the cache salt)
    digests = {steering(vectors=v).digest for v in ([{"vector": "calm", "scale": 1}], [{"vector": "calm", "scale": 2}],
                                                   [{"vector": "tea", "scale": 1}],
                                                   [{"vector": "calm", "scale": 1, "tokens": "prompt"}])}
    assert len(digests) == 4


def test_a_variants_vectors_with_the_requests_after_them():
    variant = parse_vectors([{"vector": "calm", "scale": 1}, {"vector": "tea", "scale": 2}], LIMITS)
    own = parse_vectors([{"vector": "tea", "scale": 0}], LIMITS)
    assert merge_vector_plans(variant, own).rows == ((0, 1, 0), (1, 0, 0))
    assert merge_vector_plans(None, None) is None
