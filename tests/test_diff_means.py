"""Difference-of-means vectors: computed from a capture, served as an SAE the plugin loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines import MODEL
from steer_plugin.sae import SAE, load_max_activations
from steer_plugin.training.capture import Capture
from steer_plugin.training.diff_means import diff_means, write_vector_sae


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


def test_vector_is_the_mean_over_concept_documents_minus_the_rest(tokenizer, tmp_path):
    texts = ["my dog and your dogs", "the sea is calm", "a dog, a dog", "a quiet day at home"]
    tokens = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    direction = torch.zeros(8)
    direction[3] = 2.0
    gen = torch.Generator().manual_seed(0)
    acts, doc = [], []
    for i, t in enumerate(tokens):
        rows = torch.randn(len(t), 8, generator=gen) * 0.01 + (direction if "dog" in texts[i] else 0)
        acts.append(rows)
        doc += [i] * len(t)
    cap = Capture(torch.cat(acts), np.array(doc, dtype=np.int32), np.zeros(len(doc), dtype=np.int32), tokens)
    vectors = diff_means(cap, tokenizer, {"dogs": ["dog"], "sea": ["sea"]}, min_hits=1)
    torch.testing.assert_close(vectors[0], direction, atol=0.05, rtol=0)
    assert vectors[1][3] < -0.5  # the sea document is among the dog-free ones

    write_vector_sae(vectors, ["dogs", "sea"], "blocks.15.hook_resid_post", tmp_path / "vec")
    sae = SAE.load(tmp_path / "vec")
    f, _ = sae.encode(torch.randn(5, 8))
    assert sae.cfg.architecture == "jumprelu" and not f.any()  # never fires: a clamp only adds
    torch.testing.assert_close(load_max_activations(tmp_path / "vec"), vectors.norm(dim=-1))
    torch.testing.assert_close(sae.W_dec * vectors.norm(dim=-1)[:, None], vectors)


def test_layer_scan_reads_the_stream_the_capture_reads():
    """The scan's per-document sums at several layers (one forward, padded batches) equal the training
    capture's activations at each layer summed per document, position 0 left out in both."""
    from steer_plugin.training.capture import capture, load_hf_model
    from steer_plugin.training.layer_scan import layer_sums

    model, tok = load_hf_model(MODEL)
    docs = ["The sea is big and blue, and ships sail on it every day.", "Music is the art of arranging sounds."]
    reference = {layer: capture(model, tok, docs, layer, 64, 2) for layer in (3, 15)}
    streams = layer_sums(model, [tok(d, add_special_tokens=False)["input_ids"] for d in docs], [3, 15], batch_size=2)
    for layer, cap in reference.items():
        summed = torch.zeros(2, cap.acts.shape[1], dtype=torch.float64).index_add_(
            0, torch.from_numpy(cap.doc).long(), cap.acts.double())
        sums, counts, median_norm = streams[layer]
        torch.testing.assert_close(sums, summed)
        assert counts.tolist() == np.bincount(cap.doc).tolist()
        assert median_norm == pytest.approx(float(cap.acts.norm(dim=-1).median()))
