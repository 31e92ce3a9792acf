"""The pieces of steer-catalogue: the streaming per-feature accumulator against a direct computation,
resuming, label import in each format, and a rebuild keeping labels and calibration. (The commands
end to end against a real engine and server: test_own_catalogue.py.)"""

from __future__ import annotations

import csv
import gzip
import json

import numpy as np
import pytest

from steer_plugin.search.catalogue import FeatureCatalogue, read_entries, write_entries
from steer_workbench.discover.build import _merge
from steer_workbench.discover.labels import import_labels
from steer_workbench.discover.top_features import TopFeatures

D_SAE, K, TOP = 50, 6, 4


def _batches(seed: int, n_batches: int = 5, tokens: int = 40):
    rng = np.random.default_rng(seed)
    for b in range(n_batches):
        ids = np.stack([rng.choice(D_SAE, K, replace=False) for _ in range(tokens)])  # [n, K]
        values = np.where(rng.random((tokens, K)) < 0.7, rng.random((tokens, K)) * 5, 0.0).astype(np.float32)
        yield np.full(tokens, b, np.int32), np.arange(tokens, dtype=np.int32), ids, values


def test_streamed_statistics_and_strongest_activations_equal_a_direct_computation():
    state = TopFeatures.empty(D_SAE, TOP)
    rows = []
    for doc, pos, ids, values in _batches(0):
        state.add(doc, pos, ids, values, tokens=len(doc))
        rows += [(int(f), float(v), int(d), int(p)) for d, p, fs, vs in zip(doc, pos, ids, values)
                 for f, v in zip(fs, vs) if v > 0]
    assert state.tokens == 200
    for feature in range(D_SAE):
        mine = sorted(((v, d, p) for f, v, d, p in rows if f == feature), key=lambda r: -r[0])
        assert state.count[feature] == len(mine)
        assert state.max_activation[feature] == pytest.approx(mine[0][0] if mine else 0.0)
        assert state.total[feature] == pytest.approx(sum(v for v, _, _ in mine), rel=1e-6)
        kept = [(float(v), int(d), int(p)) for v, d, p in zip(state.top_value[:, feature], state.top_doc[:, feature],
                                                             state.top_pos[:, feature]) if v > 0]
        assert [v for v, _, _ in kept] == pytest.approx([v for v, _, _ in mine[:TOP]])
        assert {(d, p) for _, d, p in kept} == {(d, p) for _, d, p in mine[:TOP]}
    stats = state.statistics()
    np.testing.assert_allclose(stats["frequency"], state.count / 200)


def test_a_saved_state_resumes_only_the_same_build(tmp_path):
    state = TopFeatures.empty(D_SAE, TOP)
    for batch in _batches(1, 2):
        state.add(*batch, tokens=40)
    state.documents = 2
    state.save(tmp_path / "s.npz", "key-a")
    back = TopFeatures.load(tmp_path / "s.npz", "key-a")
    assert back.documents == 2 and back.tokens == 80 and np.array_equal(back.top_value, state.top_value)
    assert TopFeatures.load(tmp_path / "s.npz", "key-b") is None and TopFeatures.load(tmp_path / "x.npz", "k") is None


def _entry(i: int, label: str = "dog / dogs") -> dict:
    return {"id": i, "label": label, "labels": [{"text": label, "source": "tokens"}], "max_activation": 1.0,
            "frequency": 0.1, "mean_activation": 0.5, "top_tokens": [{"token": "dog", "count": 3}],
            "top_contexts": [{"text": "a «dog» barks", "activation": 1.0}]}


@pytest.fixture
def catalogue(tmp_path):
    folder = tmp_path / "catalogue"
    folder.mkdir()
    write_entries(folder, [_entry(i) for i in range(8)])
    return folder


def test_neuronpedia_exports_and_csv_labels_are_merged_once_and_searched(catalogue, tmp_path):
    records = [{"modelId": "m", "layer": "3-res", "index": "2", "description": " the Golden Gate Bridge",
                "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair"},
               {"modelId": "m", "layer": "3-res", "index": "6", "description": "tides and the sea",
                "explanationModelName": "claude", "typeName": "oai_token-act-pair"}]
    exported = tmp_path / "export.json"
    exported.write_text(json.dumps(records))
    bulk = tmp_path / "batch-0.jsonl.gz"  # Neuronpedia's bulk files: one record per line, gzipped
    bulk.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in records[1:]).encode()))
    table = tmp_path / "labels.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([["index", "label"], [3, "suspension bridges, cables"]])

    assert import_labels(catalogue, exported) == {"read": 2, "added": 2, "features": 2}
    assert import_labels(catalogue, exported)["added"] == 0  # the same file again changes nothing
    assert import_labels(catalogue, bulk)["added"] == 0
    assert import_labels(catalogue, table)["added"] == 1
    entries = read_entries(catalogue)
    assert entries[2]["label"] == "the Golden Gate Bridge"
    assert entries[2]["labels"] == [{"text": "dog / dogs", "source": "tokens"},
                                    {"text": "the Golden Gate Bridge", "source": "neuronpedia:gpt-4o-mini"}]
    assert entries[3]["labels"][-1] == {"text": "suspension bridges, cables", "source": "csv:labels.csv"}
    hits, _ = FeatureCatalogue(entries).search("golden gate bridge", 3)
    assert [e["id"] for e, _ in hits][:2] == [2, 3]  # every query word in 2's explanation, one in 3's


def test_labels_of_another_sae_are_refused(catalogue, tmp_path):
    wrong = tmp_path / "other.json"
    wrong.write_text(json.dumps([{"index": "12", "description": "x"}]))
    with pytest.raises(ValueError, match=r"features \[12\] are outside the catalogue's 0..7"):
        import_labels(catalogue, wrong)
    (tmp_path / "bad.json").write_text(json.dumps([{"feature": 1}]))
    with pytest.raises(ValueError, match="record 1 is not a Neuronpedia explanation"):
        import_labels(catalogue, tmp_path / "bad.json")


def test_a_rebuild_keeps_imported_labels_and_calibration():
    old = [_entry(0) | {"label": "bridges", "labels": [{"text": "dog", "source": "tokens"},
                                                     {"text": "bridges", "source": "neuronpedia:x"}],
                        "recommended_strength": 2.0, "recommended_tokens": "all", "sweep": {"all": {}}},
           _entry(1)]
    built = [_entry(0, "cat / cats") | {"output_tokens": [{"token": "cat", "logit": 1.0}]}, _entry(1, "sun")]
    merged = _merge(built, old)
    assert merged[0]["label"] == "bridges" and merged[0]["recommended_strength"] == 2.0
    assert merged[0]["labels"] == [{"text": "cat / cats", "source": "tokens"}, {"text": "bridges", "source": "neuronpedia:x"}]
    assert merged[0]["top_tokens"] == built[0]["top_tokens"] and merged[0]["output_tokens"][0]["token"] == "cat"
    assert merged[1]["label"] == "sun"
    with pytest.raises(ValueError, match="has 2 features, the SAE 1"):
        _merge(built[:1], old)
