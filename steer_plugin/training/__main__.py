"""python -m steer_plugin.training --out sae_weights/NAME [--tiny]

Reproducible from --seed: corpus -> residual capture at --layer (forward stopped there) -> TopK SAE
-> held-out evaluation -> feature statistics and catalogue, written in SAELens format.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from steer_plugin.config import default_model_dir
from steer_plugin.sae import CATALOGUE_FILENAME, SAE, STATS_FILENAME
from steer_plugin.training.capture import capture, load_hf_model
from steer_plugin.training.catalogue import add_output_side, build_catalogue, feature_statistics
from steer_plugin.training.corpus import build_corpus
from steer_plugin.training.evaluate import loss_increase, reconstruction_metrics
from steer_plugin.training.topk_trainer import TrainConfig, train_topk


@dataclass(frozen=True)
class PipelineConfig:
    """What to capture and where to write it."""

    out: str = "sae_weights/smollm2-135m-instruct-l15"
    """Output directory (SAELens format plus stats, catalogue and evaluation)."""
    model_dir: str = str(default_model_dir())
    """Hugging Face directory of the model (python -m steer_plugin.prepare_model)."""
    layer: int = 15
    """Decoder layer whose output is captured: the middle of SmolLM2-135M's 30 layers."""
    ctx: int = 128
    """Tokens per document (longer documents are truncated)."""
    capture_batch: int = 8
    """Documents per capture forward."""
    max_wiki_docs: int = 0
    """Cap on Wikipedia leads (0: all 10,033)."""
    max_wordnet_docs: int = 2500
    """WordNet gloss documents (12 glosses each)."""
    heldout_docs: int = 300
    """Documents kept out of training for evaluation."""
    seed: int = 0
    """Seed of the corpus shuffle and of training."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in (PipelineConfig, TrainConfig):
        for f in fields(cls):
            if f.name == "seed" and cls is TrainConfig:
                continue
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (tests)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = vars(_parser().parse_args(argv))
    tiny = args.pop("tiny")
    if tiny:
        args.update(max_wiki_docs=60, max_wordnet_docs=10, heldout_docs=10, ctx=48, d_sae=256, k=8,
                    batch_size=256, epochs=1, dead_after_tokens=10_000)
    pipe = PipelineConfig(**{f.name: args[f.name] for f in fields(PipelineConfig)})
    train_cfg = TrainConfig(**{f.name: args[f.name] for f in fields(TrainConfig) if f.name != "seed"},
                            seed=pipe.seed)
    torch.manual_seed(pipe.seed)
    out = Path(pipe.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        timings[name] = round(time.perf_counter() - t0, 1)
        return result

    model, tokenizer = load_hf_model(pipe.model_dir)
    docs = build_corpus(tokenizer, pipe.seed, pipe.max_wordnet_docs, Path.home() / ".cache" / "steer_plugin",
                        max_wiki_docs=pipe.max_wiki_docs or None)
    held, train_docs = docs[:pipe.heldout_docs], docs[pipe.heldout_docs:]
    cap = timed("capture_train", capture, model, tokenizer, train_docs, pipe.layer, pipe.ctx, pipe.capture_batch)
    held_cap = timed("capture_heldout", capture, model, tokenizer, held, pipe.layer, pipe.ctx,
                     pipe.capture_batch, desc="capture held-out")
    hook_name = f"blocks.{pipe.layer}.hook_resid_post"
    sae = timed("train", train_topk, cap.acts, train_cfg, hook_name, "SmolLM2-135M-Instruct")
    sae.save(out, dtype=torch.float16)
    sae = SAE.load(out)  # evaluate exactly what ships (float16 on disk)
    recon = timed("eval_reconstruction", reconstruction_metrics, sae, held_cap.acts)
    ce = timed("eval_loss", loss_increase, model, sae, held_cap.tokens, pipe.layer)
    stats, top_vals, top_rows = timed("stats", feature_statistics, sae, cap)
    save_file({k: v.contiguous() for k, v in stats.items()}, str(out / STATS_FILENAME))
    catalogue = timed("catalogue", build_catalogue, tokenizer, cap, stats, top_vals, top_rows)
    timed("output_side", add_output_side, catalogue, sae, model, tokenizer)
    (out / CATALOGUE_FILENAME).write_text(json.dumps(catalogue, ensure_ascii=False, indent=0))

    dead_corpus = float((stats["frequency"] == 0).float().mean())
    report = {
        "date": time.strftime("%Y-%m-%d"), "pipeline": asdict(pipe), "train": asdict(train_cfg),
        "train_tokens": int(cap.acts.shape[0]), "heldout": recon, "loss": ce,
        "dead_fraction_train_corpus": dead_corpus, "wall_seconds": timings,
        "machine": f"{torch.get_num_threads()} torch threads",
    }
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "evaluation.md").write_text(
        f"# SAE evaluation ({report['date']})\n\n"
        f"TopK SAE, {train_cfg.d_sae} latents, k={train_cfg.k}, on `{hook_name}` of SmolLM2-135M-Instruct, "
        f"trained on {report['train_tokens']:,} tokens.\n\n"
        "| metric (held-out) | value |\n|---|---|\n"
        f"| FVU | {recon['fvu']:.4f} |\n| mean L0 | {recon['l0']:.1f} |\n"
        f"| dead latents (held-out, {recon['tokens']:,} tokens) | {recon['dead_fraction']:.2%} |\n"
        f"| dead latents (whole training corpus) | {dead_corpus:.2%} |\n"
        f"| next-token CE clean → spliced | {ce['ce_clean']:.4f} → {ce['ce_spliced']:.4f} "
        f"(+{ce['ce_increase']:.4f} nats) |\n\n"
        f"Wall time (seconds) per step: {json.dumps(timings)}\n")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
