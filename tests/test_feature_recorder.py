"""Worker-side feature recording (feature_recorder.py) and the catalogue search, without a server."""

import json

import numpy as np
import pytest
import torch

from sae_factory import make_sae
from steer_plugin.search.catalogue import FeatureCatalogue
from steer_plugin.core.config import DEFAULT_SAE_DIR
from steer_plugin.core.sae import load_config
from steer_plugin.worker.recorder import FeatureRecorder
from steer_plugin.core.spec import RECORD_FIELD, RecordingError, parse_recording
from steer_plugin.worker.step_layout import StepLayout

D_IN, D_SAE = 32, 64


def _args(key, scope, top_k=4):
    return {RECORD_FIELD: json.dumps({"key": key, "sae": "sae", "top_k": top_k, "scope": scope})}


@pytest.mark.parametrize("encode_chunk", [256, 2])  # a long prompt is encoded in pieces: same record
def test_records_the_right_positions_across_chunked_steps(encode_chunk, monkeypatch):
    monkeypatch.setattr("steer_plugin.worker.recorder.RECORD_CHUNK", encode_chunk)
    sae = make_sae("topk", d_in=D_IN, d_sae=D_SAE, k=8)
    rec = FeatureRecorder("sae")
    extra = {"p": _args("prompt-key", "prompt"), "g": _args("gen-key-1", "generation", 2), "u": None}
    # step 1: p prefills positions 0..3 of 6, g decodes position 5 (prompt of 5), u is not recorded
    # step 2: p prefills 4..5 and its first generated position 6 is not asked for
    steps = [(["u", "p", "g"], np.array([3, 4, 1]), np.array([0, 0, 5]), np.array([3, 6, 5])),
             (["p", "g"], np.array([3, 1]), np.array([4, 6]), np.array([6, 5]))]
    streams = []
    for req_ids, sched, computed, prompt in steps:
        rec.fill(StepLayout(req_ids, sched, computed, prompt, extra.get))
        stream = torch.randn(int(sched.sum()), D_IN)
        streams.append(stream)
        if rec.num_tokens:
            rec.record(sae, stream)
    p = rec.pop("prompt-key")
    assert p["positions"] == [0, 1, 2, 3, 4, 5]  # position 6 is generated, outside the prompt scope
    want = torch.cat([streams[0][3:7], streams[1][0:2]])
    f, _ = sae.encode(want)
    np.testing.assert_allclose(p["values"], f.topk(4).values.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(p["ids"], f.topk(4).indices.numpy())
    total = f[1:].sum(0).double().numpy()  # position 0 is left out of the sums
    np.testing.assert_allclose(p["total_values"], total[p["total_ids"]], rtol=1e-5)
    assert p["total_values"] == sorted(p["total_values"], reverse=True)
    g = rec.pop("gen-key-1")
    assert g["positions"] == [5, 6] and g["prompt_len"] == 5 and np.asarray(g["ids"]).shape == (2, 2)
    assert rec.pop("prompt-key") is None  # popped once


def test_unfetched_records_are_bounded():
    sae = make_sae("topk", d_in=D_IN, d_sae=D_SAE, k=8)
    rec = FeatureRecorder("sae", capacity=2)
    for i in range(3):
        key = f"key-{i:05d}"
        rec.fill(StepLayout([key], np.array([2]), np.array([0]), np.array([2]), {key: _args(key, "prompt")}.get))
        rec.record(sae, torch.randn(2, D_IN))
    assert rec.pop("key-00000") is None and rec.pop("key-00002") is not None


@pytest.mark.parametrize("raw,where", [
    ("{", "not valid JSON"), ({"key": "k", "top_k": 1, "scope": "prompt"}, ".key"),
    ({"key": "abcdefgh", "sae": "s", "top_k": 0, "scope": "prompt"}, ".top_k"),
    ({"key": "abcdefgh", "sae": "s", "top_k": 2, "scope": "everything"}, ".scope"),
    ({"key": "abcdefgh", "sae": "s", "top_k": 2, "scope": "prompt", "x": 1}, ".x"),
])
def test_recording_requests_are_validated(raw, where):
    with pytest.raises(RecordingError, match=RECORD_FIELD) as e:
        parse_recording(raw)
    assert where in str(e.value)


def test_catalogue_search_on_the_shipped_sae():
    catalogue = FeatureCatalogue.load(DEFAULT_SAE_DIR)
    assert len(catalogue) == load_config(DEFAULT_SAE_DIR).d_sae
    hits, total = catalogue.search("God", limit=10)
    assert 4137 in [e["id"] for e, _ in hits] and total >= 10  # labelled "God"; features that steer there rank first
    assert catalogue.search("make it talk about trees", 1)[0][0][0]["id"] == catalogue.search("tree", 1)[0][0][0]["id"]
    assert catalogue.search("", 5) == ([], 0)
    assert [e["id"] for e, _ in catalogue.search("sea", 10, offset=2)[0]] == \
        [e["id"] for e, _ in catalogue.search("sea", 12)[0]][2:]


def test_catalogue_is_written_compressed_and_read_compressed_or_plain(tmp_path):
    from steer_plugin.search.catalogue import read_entries, write_entries
    from steer_plugin.core.sae import CATALOGUE_FILENAME, PLAIN_CATALOGUE_FILENAME, SAEFileError

    def entry(i: int, label: str) -> dict:
        return {"id": i, "label": label, "max_activation": 2.0, "mean_activation": 1.0, "frequency": 0.01,
                "top_tokens": [{"token": label, "count": 3}], "top_contexts": [{"text": f"a «{label}»", "activation": 2.0}]}

    entries = [entry(0, "café «é»"), entry(1, "two")]
    with pytest.raises(SAEFileError, match=CATALOGUE_FILENAME):
        read_entries(tmp_path)
    (tmp_path / PLAIN_CATALOGUE_FILENAME).write_text(json.dumps(entries[:1]))  # a user's own, plain
    assert read_entries(tmp_path) == entries[:1]
    write_entries(tmp_path, entries)
    assert not (tmp_path / PLAIN_CATALOGUE_FILENAME).exists() and read_entries(tmp_path) == entries
    written = (tmp_path / CATALOGUE_FILENAME).read_bytes()
    write_entries(tmp_path, entries)
    assert (tmp_path / CATALOGUE_FILENAME).read_bytes() == written  # same entries, same bytes (no timestamp)


def test_catalogue_files_follow_the_one_schema_both_ways(tmp_path):
    """What the workbench writes and the server reads is `catalogue_schema`: an entry without a field
    the server reads is refused on the way out and on the way in, naming the entry and the field."""
    from pydantic import ValidationError

    from steer_plugin.core.sae import PLAIN_CATALOGUE_FILENAME, SAEFileError
    from steer_plugin.search.catalogue import read_entries, write_entries

    partial = [{"id": 0, "label": "x", "max_activation": 1.0, "frequency": 0.1, "top_tokens": [], "top_contexts": []}]
    with pytest.raises(ValidationError, match="mean_activation"):
        write_entries(tmp_path, partial)
    (tmp_path / PLAIN_CATALOGUE_FILENAME).write_text(json.dumps(partial))
    with pytest.raises(SAEFileError, match=r"0\.mean_activation"):
        read_entries(tmp_path)


@pytest.mark.parametrize("plural, single", [("trees", "tree"), ("horses", "horse"), ("boxes", "box"),
                                            ("churches", "church"), ("classes", "class"), ("puppies", "puppy"),
                                            ("cats", "cat"), ("glass", "glass")])
def test_a_plural_and_its_singular_are_one_search_word(plural, single):
    from steer_plugin.search.catalogue import singular

    assert singular(plural) == singular(single) == single
