"""The strength sweep and the judging of replies through the real engine (plugin on), with a
difference-of-means vector served as a second SAE beside the default one."""

from __future__ import annotations

import json

import pytest
import torch

from engines import MODEL
from steer_plugin.search.catalogue import FeatureCatalogue, read_entries
from steer_plugin.core.config import DEFAULT_SAE_DIR
from steer_workbench import strengths
from steer_workbench.diff_means import write_vector_sae
from steer_workbench.protocols import SWEEP_PROMPTS, TUNING_PROMPTS
from steer_workbench.steering_eval import DECODING, Bench, Job, median

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from steer_plugin.core.sae import SAE

    sae = SAE.load(DEFAULT_SAE_DIR)
    vec_dir = tmp_path_factory.mktemp("vec") / "diffmean"
    write_vector_sae(sae.W_dec[:2], ["first", "second"], sae.cfg.hook_name, 40.0, vec_dir)
    b = Bench(MODEL, [{"path": str(DEFAULT_SAE_DIR), "id": "sae"}, {"path": str(vec_dir), "id": "diffmean"}],
              max_tokens=12, cache=tmp_path_factory.mktemp("cache") / "replies.json")
    yield b
    b.close()


def test_sweep_writes_a_measured_strength_per_feature(bench):
    # As the sweep finds it (the shipped sweeps were measured on longer replies than this bench's).
    entries = strengths.without_sweeps(read_entries(DEFAULT_SAE_DIR))
    feature = FeatureCatalogue(entries).search("trees", 1)[0][0][0]["id"]  # a concept feature
    trees = {"trees": ["tree", "forest", "wood"]}
    report = strengths.sweep(bench, "sae", entries, [feature], strengths=(1.5, 30.0), concepts=trees)
    swept = entries[feature]["sweep"]
    assert set(swept) == {"all", "generated"} and report["features"] == 1
    baseline_ppl = report["baseline_median_ppl"]
    for cells in swept.values():
        assert {"1.5", "30"} <= set(cells) <= {"1.5", "30", "1.25", "15.75"}  # the grid and any halfway refinement
        for c in cells.values():  # perplexity judged exactly where the replies could earn a recommendation
            assert (c["median_ppl"] is None) == (c["concept_rate"] < strengths.MIN_RATE)
            # every cell that could be recommended was measured on the confirmation prompts too
            assert c["prompts"] == len(SWEEP_PROMPTS) or (
                c["prompts"] == len(TUNING_PROMPTS) and not strengths.candidate(c, baseline_ppl))
    assert entries[feature]["recommended_strength"] in (None, 1.25, 1.5)  # never a wrecked strength (30, or 15.75 halfway)
    assert entries[feature]["recommended_tokens"] in ((None,) if entries[feature]["recommended_strength"] is None
                                                      else ("all", "generated"))
    assert entries[feature]["recommended_sampling"] == (None if entries[feature]["recommended_strength"] is None
                                                        else {"temperature": 0, "frequency_penalty": 0.5})
    # the concept its clamp turns replies to, measured at the recommended setting (none without one)
    assert all(c["concept"] == "trees" and c["rate"] >= strengths.MIN_RATE for c in entries[feature]["steers"])
    assert entries[feature]["steers"] == [] or entries[feature]["recommended_strength"] is not None
    wrecked = bench.run([Job(p, (("sae", feature, 30.0, "max"),)) for p in TUNING_PROMPTS])
    fine = bench.run([Job(p, (("sae", feature, 1.5, "max"),)) for p in TUNING_PROMPTS])
    assert median([j.perplexity for j in wrecked]) > median([j.perplexity for j in fine])

    # A second pass adds the prompt scope and keeps what the first measured: its cells are read back
    # from the entry, not run again, and the recommendation is made over both.
    kept = json.loads(json.dumps(swept))
    strengths.sweep(bench, "sae", entries, [feature], strengths=(1.5, 30.0), scopes=(), concepts=trees,
                    prompt_strengths=(3.0,))
    after = entries[feature]["sweep"]
    assert {t: after[t] for t in kept} == kept and set(after) == {"all", "generated", "prompt"}
    assert "3" in after["prompt"] and set(after["prompt"]) <= {"3", "2"}  # and any halfway refinement below
    setting = (entries[feature]["recommended_strength"], entries[feature]["recommended_tokens"])
    assert setting == (None, None) or after[setting[1]][f"{setting[0]:g}"]["prompts"] == len(SWEEP_PROMPTS)

    # A catalogue recommended by another rule: kept as it is, unless asked again, then recommended from
    # its cells as they stand, none run again.
    stale = dict(recommended_strength=99.0, recommended_tokens="all", steers=[])  # no cell of it: only a rule's
    entries[feature].update(stale)
    strengths.sweep(bench, "sae", entries, [feature], strengths=(1.5, 30.0), scopes=(), concepts=trees)
    assert {k: entries[feature][k] for k in stale} == stale
    strengths.sweep(bench, "sae", entries, [feature], strengths=(1.5, 30.0), scopes=(), concepts=trees, again=True)
    assert entries[feature]["sweep"] == after
    assert (entries[feature]["recommended_strength"], entries[feature]["recommended_tokens"]) == setting


def test_replies_are_judged_and_a_vector_clamp_changes_them(bench):
    prompts = ["What is your favourite book?", "How was your day?"]
    control = {prompts[0]: prompts[1], prompts[1]: prompts[0]}
    unjudged = bench.run([Job(prompts[0])], fluency=False)[0]
    assert unjudged.perplexity is None and unjudged.pmi is None  # answered, not yet scored
    plain, added = bench.run([Job(prompts[0]), Job(prompts[0], (("diffmean", 0, 1.0, "max"),))], control)
    assert plain is unjudged and plain.perplexity is not None  # the same reply, now judged
    assert plain.text != added.text
    assert plain.perplexity > 1 and torch.isfinite(torch.tensor(plain.pmi)) and 0 < plain.trigrams <= 1
    assert plain.pmi > 0  # an unsteered answer is likelier after its own question
    prompted = bench.run([Job(prompts[0], instruction="Mention cats in your answer.")], control)[0]
    assert prompted.text != plain.text
    assert bench.run([Job(prompts[0])], control)[0] is not None  # served from the cache
    # a second turn: the earlier turns are sent, and judged, with the question
    second = Job(prompts[0], history=(("user", prompts[1]), ("assistant", plain.text)))
    assert second.messages()[:2] == [{"role": "user", "content": prompts[1]}, {"role": "assistant", "content": plain.text}]
    assert second.messages(prompts[1])[:2] == second.messages()[:2]
    later = bench.run([second], control)[0]
    assert later is not plain and later.perplexity is not None and later.pmi is not None


def test_replies_are_decoded_with_the_frequency_penalty_and_cached_apart(bench):
    job = Job("Tell me a short story about a dog.", max_tokens=64)
    penalised = bench.run([job], fluency=False)[0]
    bench.decoding = {}
    try:
        greedy = bench.run([job], fluency=False)[0]
    finally:
        bench.decoding = DECODING
    assert DECODING == {"frequency_penalty": 0.5} and bench.sampling == {"temperature": 0, **DECODING}
    assert penalised.text != greedy.text  # 64 tokens repeat some token the penalty turns away from
    assert bench.run([job], fluency=False)[0] is penalised  # each decoding keeps its own cached reply


def test_a_stopped_run_resumes_from_its_last_engine_batch(bench, monkeypatch):
    from steer_workbench import steering_eval

    monkeypatch.setattr(steering_eval, "SAVE_EVERY", 2)
    jobs = [Job(f"Name a colour, please ({i}).") for i in range(5)]
    chat, sent = bench.llm.chat, []

    def stopped_in_the_second_batch(conversations, *args, **kwargs):
        if sent:
            raise KeyboardInterrupt
        sent.append(len(conversations))
        return chat(conversations, *args, **kwargs)

    monkeypatch.setattr(bench.llm, "chat", stopped_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        bench.run(jobs, fluency=False)
    on_disk = json.loads(bench.cache_path.read_text())
    assert sent == [2] and [bench._key(j) in on_disk for j in jobs] == [True, True, False, False, False]

    def counted(conversations, *args, **kwargs):
        sent.append(len(conversations))
        return chat(conversations, *args, **kwargs)

    monkeypatch.setattr(bench.llm, "chat", counted)
    replies = bench.run(jobs, fluency=False)
    assert sent == [2, 2, 1] and all(r.text for r in replies)  # only the three unanswered, two batches
    assert all(bench._key(j) in json.loads(bench.cache_path.read_text()) for j in jobs)
