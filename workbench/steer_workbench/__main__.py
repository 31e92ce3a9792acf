"""python -m steer_workbench --out sae_weights/NAME [--tiny]

Reproducible from --seed: corpus (per source, with held-out splits) -> residual capture at --layer
(forward stopped there) -> TopK or BatchTopK SAE -> per-source held-out evaluation -> feature
statistics and catalogue (input side, output side, output score), written in SAELens format.
Then, with the engine: python -m steer_workbench.strengths (recommended strengths) and
python -m steer_workbench.efficacy (efficacy, the user's journey, the comparison). The capture and the training checkpoint live
in --work, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from steer_plugin.core.config import default_model_dir
from steer_plugin.search.catalogue import write_entries
from steer_plugin.core.sae import SAE, STATS_FILENAME
from steer_workbench.capture import Capture, cached_capture, load_hf_model
from steer_workbench.catalogue import add_output_side, build_catalogue, feature_statistics
from steer_workbench.chat_corpus import CHATS_DIR, CHATS_FILE
from steer_workbench.corpus import LICENCES, build_corpus
from steer_workbench.evaluate import evaluation_markdown, loss_increase, reconstruction_metrics
from steer_workbench.output_score import score_features
from steer_workbench.trainer import TrainConfig, train_sae

CACHE = Path.home() / ".cache" / "steer_plugin"


@dataclass(frozen=True)
class PipelineConfig:
    """What to capture and where to write it."""

    out: str = "sae_weights/smollm2-135m-instruct-l15-mixed"
    """Output directory (SAELens format plus stats, catalogue and evaluation)."""
    work: str = str(CACHE / "training")
    """Directory of the capture and the training checkpoint (resume point; several GB)."""
    chats: str = str(CHATS_DIR / CHATS_FILE)
    """The generated chat corpus (python -m steer_workbench.chat_corpus; kept in the repository)."""
    model_dir: str = str(default_model_dir())
    """Hugging Face directory of the model (python -m steer_plugin.launcher.prepare_model)."""
    layer: int = 15
    """Decoder layer whose output is captured: the middle of SmolLM2-135M's 30 layers."""
    ctx: int = 512
    """Tokens per document (longer documents are truncated)."""
    capture_batch: int = 8
    """Documents per capture forward."""
    chat_docs: int = 1100
    """Training documents from the chat corpus (caps below likewise; 0 leaves a source out)."""
    wiki_docs: int = 700
    """Training documents of Wikipedia leads."""
    wordnet_docs: int = 80
    """Training documents of WordNet glosses."""
    legal_docs: int = 260
    """Training documents of licence text."""
    code_docs: int = 260
    """Training documents of Python standard-library source."""
    technical_docs: int = 260
    """Training documents of the Python documentation."""
    heldout_docs: int = 40
    """Held-out documents per source for evaluation."""
    loss_docs: int = 20
    """Held-out documents per source for the next-token loss (two full forwards each)."""
    seed: int = 0
    """Seed of the corpus shuffle and of training."""
    capture_only: bool = False
    """Stop after the captures (they stay in --work for the run that trains)."""
    export_corpus: str = ""
    """Write the training documents to this JSONL file (one {"text"} per line, in training order) and
    stop: the corpus `steer-catalogue build` reads to rebuild the catalogue from them."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in (PipelineConfig, TrainConfig):
        for f in fields(cls):
            if f.name == "seed" and cls is TrainConfig:
                continue
            if isinstance(f.default, bool):
                parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true")
            else:
                parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (tests)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = vars(_parser().parse_args(argv))
    tiny = args.pop("tiny")
    if tiny:
        args.update(chat_docs=0, wiki_docs=40, wordnet_docs=4, legal_docs=6, code_docs=6, technical_docs=0,
                    heldout_docs=4, loss_docs=2, ctx=64, d_sae=256, k=8, batch_size=256, epochs=1,
                    dead_after_tokens=10_000, checkpoint_every=2)
    pipe = PipelineConfig(**{f.name: args[f.name] for f in fields(PipelineConfig)})
    train_cfg = TrainConfig(**{f.name: args[f.name] for f in fields(TrainConfig) if f.name != "seed"},
                            seed=pipe.seed)
    torch.manual_seed(pipe.seed)
    out, work = Path(pipe.out), Path(pipe.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        timings[name] = round(time.perf_counter() - t0, 1)
        return result

    model, tokenizer = load_hf_model(pipe.model_dir)
    caps = {s: getattr(pipe, f"{s}_docs") for s in ("chat", "wiki", "wordnet", "legal", "code", "technical")}
    train_docs, held_docs = timed("corpus", build_corpus, tokenizer, caps, CACHE, Path(pipe.chats), pipe.seed,
                                  pipe.heldout_docs)
    def capture_of(name: str, docs) -> Capture:
        """Captured per source and split, each kept in --work while its documents and settings stay; attention
        sinks left out (capture.SINK_NORM)."""
        key = json.dumps([pipe.model_dir, pipe.layer, pipe.ctx, [d.id for d in docs]])
        return cached_capture(work / f"capture-{name}.pt", key, model, tokenizer, [d.text for d in docs],
                              pipe.layer, pipe.ctx, pipe.capture_batch, desc=f"capture {name}").without_sinks()

    sources = [s for s, docs in train_docs.items() if docs]
    if pipe.export_corpus:
        Path(pipe.export_corpus).write_text("".join(json.dumps({"text": d.text}) + "\n" for s in sources
                                                    for d in train_docs[s]))
        return {"exported": {s: len(train_docs[s]) for s in sources}}
    parts = timed("capture_train", lambda: {s: capture_of(f"train-{s}", train_docs[s]) for s in sources})
    cap = Capture.concat(list(parts.values()))
    held = timed("capture_heldout", lambda: {s: capture_of(f"heldout-{s}", docs) for s, docs in held_docs.items()
                                             if docs})
    if pipe.capture_only:
        return {"captured": sources, "heldout": list(held)}
    hook_name = f"blocks.{pipe.layer}.hook_resid_post"
    checkpoint = work / "train-checkpoint.pt"
    sae = timed("train", train_sae, cap.acts, train_cfg, hook_name, "SmolLM2-135M-Instruct", checkpoint)
    sae.save(out, dtype=torch.float16)
    sae = SAE.load(out)  # evaluate exactly what ships (float16 on disk)
    per_source = {}
    for source, held_cap in held.items():
        per_source[source] = {
            **timed(f"eval_reconstruction_{source}", reconstruction_metrics, sae, held_cap.acts),
            "loss": timed(f"eval_loss_{source}", loss_increase, model, sae, held_cap.tokens[:pipe.loss_docs],
                          pipe.layer),
            "documents": len(held_cap.tokens),
        }
    stats, top_vals, top_rows = timed("stats", feature_statistics, sae, cap)
    save_file({k: v.contiguous() for k, v in stats.items()}, str(out / STATS_FILENAME))
    catalogue = timed("catalogue", build_catalogue, tokenizer, cap.tokens, stats, top_vals, cap.doc[top_rows.numpy()],
                      cap.pos[top_rows.numpy()])
    timed("output_side", add_output_side, catalogue, sae, model, tokenizer)
    scores = timed("output_score", score_features, sae, stats["max_activation"], model, tokenizer)
    for entry, scored in zip(catalogue, scores, strict=True):
        entry.update(scored)
    write_entries(out, catalogue)

    train_sources = {s: {"documents": len(train_docs[s]), "tokens": int(c.acts.shape[0]), "licence": LICENCES[s]}
                     for s, c in parts.items()}
    report = {
        "date": time.strftime("%Y-%m-%d"), "pipeline": asdict(pipe), "train": asdict(train_cfg),
        "architecture": sae.cfg.architecture, "train_tokens": int(cap.acts.shape[0]),
        "train_sources": train_sources, "heldout": per_source,
        "dead_fraction_train_corpus": float((stats["frequency"] == 0).float().mean()),
        "wall_seconds": timings, "machine": f"{torch.get_num_threads()} torch threads",
    }
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "evaluation.md").write_text(evaluation_markdown(report))
    # Kept until here so that a run stopped during evaluation resumes without training again; a finished
    # run's checkpoint would only stop the next run with other settings ("from another run").
    checkpoint.unlink(missing_ok=True)
    print(json.dumps({k: v for k, v in report.items() if k != "pipeline"}))
    return report


if __name__ == "__main__":
    main()
