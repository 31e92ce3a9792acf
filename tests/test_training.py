"""The SAE training pipeline end to end on a tiny corpus, and the shipped default SAE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steer_plugin.config import DEFAULT_SAE_DIR, default_model_dir
from steer_plugin.sae import CATALOGUE_FILENAME, SAE, load_max_activations

pytestmark = pytest.mark.slow  # captures activations with transformers and trains


def test_tiny_training_run_writes_a_loadable_sae(tmp_path):
    from steer_plugin.training.__main__ import main

    report = main(["--tiny", "--out", str(tmp_path / "tiny")])
    sae = SAE.load(tmp_path / "tiny")
    assert sae.cfg.architecture == "topk" and sae.cfg.d_in == 576 and sae.cfg.layer == 15
    for value in (report["heldout"]["fvu"], report["heldout"]["l0"], report["loss"]["ce_increase"]):
        assert torch.isfinite(torch.tensor(value))
    catalogue = json.loads((tmp_path / "tiny" / CATALOGUE_FILENAME).read_text())
    assert len(catalogue) == sae.cfg.d_sae == len(load_max_activations(tmp_path / "tiny"))
    assert (tmp_path / "tiny" / "evaluation.md").exists()


@pytest.fixture(scope="module")
def shipped():
    if not (DEFAULT_SAE_DIR / "cfg.json").exists():
        pytest.fail(f"the default SAE is not in {DEFAULT_SAE_DIR}")
    return SAE.load(DEFAULT_SAE_DIR)


def test_shipped_sae_meets_the_bars_on_fresh_held_out_text(shipped):
    """Recomputed here on text the pipeline held out (the first documents of its seed-0 shuffle),
    not read back from evaluation.json."""
    from steer_plugin.training.capture import capture, load_hf_model
    from steer_plugin.training.corpus import build_corpus
    from steer_plugin.training.evaluate import reconstruction_metrics

    model, tokenizer = load_hf_model(str(default_model_dir()))
    docs = build_corpus(tokenizer, seed=0, max_wordnet_docs=1500, cache_dir=Path.home() / ".cache" / "steer_plugin")
    held = capture(model, tokenizer, docs[:150], shipped.cfg.layer, ctx=128, batch_size=8)
    metrics = reconstruction_metrics(shipped, held.acts)
    assert metrics["fvu"] <= 0.20, metrics
    assert metrics["l0"] <= 40, metrics
    # Dead = never active on the whole training corpus (from the shipped stats); a 15k-token
    # sample cannot see the rarest live features, so it only bounds the fraction loosely.
    stats_max = load_max_activations(DEFAULT_SAE_DIR)
    assert float((stats_max <= 0).float().mean()) <= 0.05
    assert metrics["dead_fraction"] <= 0.25, metrics


def test_shipped_catalogue_and_stats_match_the_sae(shipped):
    catalogue = json.loads((DEFAULT_SAE_DIR / CATALOGUE_FILENAME).read_text())
    assert [e["id"] for e in catalogue] == list(range(shipped.cfg.d_sae))
    assert load_max_activations(DEFAULT_SAE_DIR).shape == (shipped.cfg.d_sae,)
    live = [e for e in catalogue if e["max_activation"] > 0]
    assert all(e["label"] and e["top_tokens"] and e["top_contexts"] for e in live)
    assert sum(f.stat().st_size for f in DEFAULT_SAE_DIR.iterdir()) < 30e6


def test_catalogued_output_tokens_are_what_the_decoder_row_does_to_the_logits(shipped):
    """A push along a feature's decoder row at the final norm's input (with the rest of the stream
    orthogonal to it, so the norm's scale does not move to first order) raises most the logits of
    the tokens the catalogue lists as its output side."""
    from steer_plugin.training.capture import load_hf_model

    model, tokenizer = load_hf_model(str(default_model_dir()))
    catalogue = json.loads((DEFAULT_SAE_DIR / CATALOGUE_FILENAME).read_text())
    torch.manual_seed(0)
    with torch.inference_mode():
        for feature in (4137, 0, 1000, 3000):
            v = shipped.W_dec[feature]
            x = torch.randn(v.shape[0]) * 3
            x -= (x @ v) / (v @ v) * v
            eps = 1e-3 * x.norm() / v.norm()
            logits = lambda h: model.lm_head(model.model.norm(h[None, None]))[0, 0]  # noqa: E731
            pushed = (logits(x + eps * v) - logits(x)).topk(10).indices.tolist()
            listed = [t["token"] for t in catalogue[feature]["output_tokens"]]
            assert len(set(tokenizer.decode([t]) for t in pushed) & set(listed)) >= 9, (feature, listed)
