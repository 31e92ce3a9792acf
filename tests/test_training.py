"""The SAE training pipeline end to end on a tiny corpus, and the shipped default SAE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steer_plugin.core.config import DEFAULT_SAE_DIR, default_model_dir
from steer_plugin.search.catalogue import read_entries
from steer_plugin.core.sae import SAE, load_max_activations

pytestmark = pytest.mark.slow  # captures activations with transformers and trains


def test_tiny_training_run_writes_a_loadable_sae_and_resumes_from_its_captures(tmp_path):
    from steer_workbench.__main__ import main

    args = ["--tiny", "--out", str(tmp_path / "tiny"), "--work", str(tmp_path / "work")]
    report = main(args)
    sae = SAE.load(tmp_path / "tiny")
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.d_in == 576 and sae.cfg.layer == 15
    assert set(report["heldout"]) == set(report["train_sources"])  # every source evaluated on its own
    for r in report["heldout"].values():
        for value in (r["fvu"], r["l0"], r["loss"]["ce_increase"]):
            assert torch.isfinite(torch.tensor(value))
    catalogue = read_entries(tmp_path / "tiny")
    assert len(catalogue) == sae.cfg.d_sae == len(load_max_activations(tmp_path / "tiny"))
    assert all("output_score" in e and "steered_tokens" in e and "output_tokens" in e for e in catalogue)
    assert "| source |" in (tmp_path / "tiny" / "evaluation.md").read_text()
    captures = sorted(p.name for p in (tmp_path / "work").glob("capture-*.pt"))
    assert "capture-train-wiki.pt" in captures and "capture-heldout-code.pt" in captures
    assert not (tmp_path / "work" / "train-checkpoint.pt").exists()  # the next run may have other settings
    again = main(args)  # captures are reused
    assert again["wall_seconds"]["capture_train"] < report["wall_seconds"]["capture_train"] / 2


@pytest.fixture(scope="module")
def shipped():
    if not (DEFAULT_SAE_DIR / "cfg.json").exists():
        pytest.fail(f"the default SAE is not in {DEFAULT_SAE_DIR}")
    return SAE.load(DEFAULT_SAE_DIR)


def test_shipped_sae_reconstructs_the_text_it_was_made_for(shipped):
    """Recomputed here, not read back from evaluation.json, on Wikipedia documents of the corpus's
    per-source split (the shipped SAE was trained on Wikipedia leads and WordNet glosses)."""
    from steer_workbench.__main__ import CACHE
    from steer_workbench.capture import capture, load_hf_model
    from steer_workbench.corpus import build_corpus
    from steer_workbench.evaluate import reconstruction_metrics

    model, tokenizer = load_hf_model(str(default_model_dir()))
    _, held = build_corpus(tokenizer, {"wiki": 1}, CACHE, Path("/nonexistent"), heldout_docs=60)
    cap = capture(model, tokenizer, [d.text for d in held["wiki"]], shipped.cfg.layer, ctx=128, batch_size=8)
    metrics = reconstruction_metrics(shipped, cap.acts)
    assert metrics["fvu"] <= 0.20 and metrics["l0"] <= 40, metrics
    # Dead = never active on the whole training corpus (from the shipped stats).
    assert float((load_max_activations(DEFAULT_SAE_DIR) <= 0).float().mean()) <= 0.05


def test_shipped_sae_has_no_copied_latents(shipped):
    from steer_workbench.trainer import duplicate_latents

    assert int(duplicate_latents(shipped.W_dec).sum()) == 0


def test_shipped_catalogue_and_stats_match_the_sae(shipped):
    catalogue = read_entries(DEFAULT_SAE_DIR)
    assert [e["id"] for e in catalogue] == list(range(shipped.cfg.d_sae))
    assert load_max_activations(DEFAULT_SAE_DIR).shape == (shipped.cfg.d_sae,)
    live = [e for e in catalogue if e["max_activation"] > 0]
    assert all(e["label"] and e["top_tokens"] and e["top_contexts"] for e in live)
    # A feature that took an attention sink for itself has a max activation tens of times the others'.
    maxes = load_max_activations(DEFAULT_SAE_DIR)
    live_maxes = maxes[maxes > 0]
    assert float((live_maxes > 10 * live_maxes.median()).float().mean()) <= 0.002
    shipped_files = [f for f in DEFAULT_SAE_DIR.iterdir() if not f.name.startswith(".")]  # dotfiles: local caches
    assert sum(f.stat().st_size for f in shipped_files) < 60e6


def test_catalogued_output_tokens_are_what_the_decoder_row_does_to_the_logits(shipped):
    """A push along a feature's decoder row at the final norm's input (with the rest of the stream
    orthogonal to it, so the norm's scale does not move to first order) raises most the logits of
    the tokens the catalogue lists as its output side."""
    from steer_workbench.capture import load_hf_model

    model, tokenizer = load_hf_model(str(default_model_dir()))
    catalogue = read_entries(DEFAULT_SAE_DIR)
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
