"""Difference-of-means vectors: computed from per-document sums of the stream, read at several layers
in one forward, served as an SAE the plugin loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines import MODEL
from steer_plugin.core.sae import SAE, load_max_activations
from steer_workbench.diff_means import diff_of_sums, stream_sums, write_vector_sae
from steer_workbench.directions import alignment


def test_vector_is_the_mean_over_concept_documents_minus_the_rest(tmp_path):
    texts = ["my dog and your dogs", "the sea is calm, the sea", "a dog, a dog", "a quiet day at home"]
    direction = torch.zeros(8)
    direction[3] = 2.0
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5.0, 6.0, 4.0, 5.0], dtype=torch.float64)
    sums = torch.stack([(torch.randn(int(n), 8, generator=gen) * 0.01 + (direction if "dog" in t else 0)).sum(0)
                        for t, n in zip(texts, counts)]).double()
    vectors = diff_of_sums(sums, counts, texts, {"dogs": ["dog"], "sea": ["sea"]})
    torch.testing.assert_close(vectors[0], direction, atol=0.05, rtol=0)
    assert vectors[1][3] < -0.5  # the sea document is among the dog-free ones
    with pytest.raises(ValueError, match="horse"):
        diff_of_sums(sums, counts, texts, {"horses": ["horse"]})

    write_vector_sae(vectors, ["dogs", "sea"], "blocks.15.hook_resid_post", 150.0, tmp_path / "vec")
    sae = SAE.load(tmp_path / "vec")
    f, _ = sae.encode(torch.randn(5, 8))
    assert sae.cfg.architecture == "jumprelu" and not f.any()  # never fires: a clamp only adds
    torch.testing.assert_close(load_max_activations(tmp_path / "vec"), torch.full((2,), 150.0))  # the dose unit
    torch.testing.assert_close(sae.W_dec * vectors.norm(dim=-1)[:, None], vectors)  # unit directions


def test_stream_sums_read_the_stream_the_training_capture_reads():
    """Per-document sums at several layers (one forward, padded batches) equal the training capture's
    activations at each layer summed per document, position 0 left out in both."""
    from steer_workbench.capture import capture, load_hf_model

    model, tok = load_hf_model(MODEL)
    docs = ["The sea is big and blue, and ships sail on it every day.", "Music is the art of arranging sounds."]
    reference = {layer: capture(model, tok, docs, layer, 64, 2) for layer in (3, 15)}
    streams = stream_sums(model, [tok(d, add_special_tokens=False)["input_ids"] for d in docs], [3, 15], batch_size=2)
    for layer, cap in reference.items():
        summed = torch.zeros(2, cap.acts.shape[1], dtype=torch.float64).index_add_(
            0, torch.from_numpy(cap.doc).long(), cap.acts.double())
        sums, counts, median_norm, _ = streams[layer]
        torch.testing.assert_close(sums, summed)
        assert counts.tolist() == np.bincount(cap.doc).tolist()
        assert median_norm == pytest.approx(float(cap.acts.norm(dim=-1).median()))


def test_alignment_finds_the_feature_a_vector_points_along(tmp_path):
    from sae_factory import make_sae

    sae = make_sae("jumprelu", d_in=16, d_sae=32)
    vectors = torch.stack([sae.W_dec[7] * 3.0, sae.W_dec[20] + 0.1 * sae.W_dec[3]])
    write_vector_sae(vectors, ["seven", "twenty"], "blocks.15.hook_resid_post", 1.0, tmp_path / "vec")
    cosines = alignment(sae, SAE.load(tmp_path / "vec").W_dec)
    assert cosines.shape == (2, 32) and cosines.argmax(dim=1).tolist() == [7, 20]
    assert float(cosines[0, 7]) == pytest.approx(1.0, abs=1e-5) and float(cosines.abs().max()) <= 1 + 1e-5


@pytest.mark.slow
def test_layer_scan_serves_each_layers_vectors_through_the_plugin(tmp_path):
    """The scan's command end to end on two layers: vectors written per layer with the layer's median
    norm as their unit, every cell answered by the real engine and judged."""
    import json
    import subprocess
    import sys

    out = tmp_path / "scan"
    subprocess.run([sys.executable, "-m", "steer_workbench.layer_scan", "--out", str(out), "--layers", "3,15",
                    "--doses", "0.25", "--docs-per-concept", "10", "--min-docs", "35"], check=True, timeout=900)
    report = json.loads((out / "results.json").read_text())
    assert report["concepts"] and len(report["rows"]) == 2 * len(report["concepts"])
    for layer in (3, 15):
        sae = SAE.load(out / "vectors" / f"L{layer}")
        assert sae.cfg.hook_name == f"blocks.{layer}.hook_resid_post" and sae.cfg.d_sae == len(report["concepts"])
        units = load_max_activations(out / "vectors" / f"L{layer}")
        assert torch.allclose(units, torch.full_like(units, report["median_norm"][str(layer)]))
    assert report["median_norm"]["15"] > report["median_norm"]["3"]  # the stream grows with depth
    at_15 = [r["concept_rate"] for r in report["rows"] if r["layer"] == 15]
    unsteered = list(report["baseline_rate"].values())
    assert sum(at_15) / len(at_15) > sum(unsteered) / len(unsteered) + 0.15  # the vectors steer to their concepts
    assert (out / "results.md").read_text().count("\n| 15 |") == 1
