"""Held-out evaluation of an SAE: reconstruction, sparsity, dead latents, downstream loss."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from steer_plugin.core.config import default_model_dir
from steer_plugin.core.sae import SAE
from steer_workbench.capture import Capture, is_sink, load_hf_model, load_saved


@torch.inference_mode()
def reconstruction_metrics(sae: SAE, acts: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """acts: [N, d_in]. FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖²; L0 = mean active latents per token;
    dead = fraction of latents that never fire on these tokens."""
    mean = acts.mean(0)
    err = var = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for start in range(0, acts.shape[0], chunk):
        x = acts[start:start + chunk]
        f, norm = sae.encode(x)
        err += (x - sae.decode(f, norm)).pow(2).sum().item()
        var += (x - mean).pow(2).sum().item()
        active = f > 0
        l0 += active.sum().item()
        fired |= active.any(0)
    return {"fvu": err / var, "l0": l0 / acts.shape[0], "dead_fraction": 1.0 - fired.float().mean().item(),
            "tokens": int(acts.shape[0])}


@torch.inference_mode()
def loss_increase(model, sae: SAE, token_lists: list[list[int]], layer: int, batch_size: int = 8) -> dict:
    """Next-token cross-entropy with layer `layer`'s output replaced by the SAE reconstruction
    (positions >= 1 that are not attention sinks: position 0 and the rare others, capture.SINK_NORM,
    were left out of training) vs clean."""
    splice = {"on": False}

    def hook(_module, _inputs, output):
        if not splice["on"]:
            return None
        hidden = output[0] if isinstance(output, tuple) else output  # [B, T, d]
        flat = hidden[:, 1:].reshape(-1, hidden.shape[-1])  # [B·(T−1), d]
        keep = ~is_sink(flat)
        f, norm = sae.encode(flat[keep])
        flat = flat.clone()
        flat[keep] = sae.decode(f, norm)
        hidden = hidden.clone()
        hidden[:, 1:] = flat.reshape(hidden.shape[0], -1, hidden.shape[-1])
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.model.layers[layer].register_forward_hook(hook)
    sums = {"clean": 0.0, "spliced": 0.0}
    count = 0
    try:
        for start in tqdm(range(0, len(token_lists), batch_size), desc="loss increase", unit="batch"):
            batch = token_lists[start:start + batch_size]
            width = max(len(t) for t in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, t in enumerate(batch):
                ids[row, :len(t)] = torch.tensor(t)
                mask[row, :len(t)] = 1
            labels = ids.masked_fill(mask == 0, -100)
            for name, on in (("clean", False), ("spliced", True)):
                splice["on"] = on
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                ce = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                    ignore_index=-100, reduction="sum")
                sums[name] += ce.item()
            count += int((labels[:, 1:] != -100).sum())
    finally:
        handle.remove()
    clean, spliced = sums["clean"] / count, sums["spliced"] / count
    return {"ce_clean": clean, "ce_spliced": spliced, "ce_increase": spliced - clean, "tokens": count}


def evaluation_markdown(report: dict) -> str:
    """The evaluation report of a pipeline run (see __main__.py) as a Markdown page."""
    train = report["train"]
    lines = [f"# SAE evaluation ({report['date']})", "",
             f"{train['activation']} SAE (saved as `{report['architecture']}`), {train['d_sae']:,} latents, "
             f"k = {train['k']}, on layer {report['pipeline']['layer']} of SmolLM2-135M-Instruct, trained on "
             f"{report['train_tokens']:,} tokens (position 0 of each document left out).", "",
             "| source | training documents | training tokens | licence |", "|---|---|---|---|",
             *[f"| {s} | {d['documents']:,} | {d['tokens']:,} | {d['licence']} |" for s, d in report['train_sources'].items()],
             "", "Held-out documents of each source (a split by file, conversation or article), position 0 left out:", "",
             "| source | documents | tokens | FVU | mean L0 | dead (held-out) | next-token loss clean → spliced |",
             "|---|---|---|---|---|---|---|"]
    for source, r in report["heldout"].items():
        loss = r["loss"]
        lines.append(f"| {source} | {r['documents']} | {r['tokens']:,} | {r['fvu']:.3f} | {r['l0']:.1f} | "
                     f"{r['dead_fraction']:.1%} | {loss['ce_clean']:.3f} → {loss['ce_spliced']:.3f} "
                     f"(+{loss['ce_increase']:.3f}) |")
    lines += ["", f"Dead latents over the whole training corpus: {report['dead_fraction_train_corpus']:.2%}.", "",
              f"Wall time (seconds) per step: {json.dumps(report['wall_seconds'])}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """python -m steer_workbench.evaluate --sae DIR [--work DIR]: any SAE of the same layer on the
    held-out captures a pipeline run left in --work (per source: FVU, L0, dead, next-token loss)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--sae", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "steer_plugin" / "training")
    p.add_argument("--loss-docs", type=int, default=20, help="documents per source for the loss (0: skip it)")
    args = p.parse_args(argv)
    sae = SAE.load(args.sae)
    model, _ = load_hf_model(str(default_model_dir()))
    report = {}
    for path in sorted(args.work.glob("capture-heldout-*.pt")):
        cap = Capture(**load_saved(path)["capture"]).without_sinks()
        report[path.stem.removeprefix("capture-heldout-")] = {
            **reconstruction_metrics(sae, cap.acts),
            **({"loss": loss_increase(model, sae, cap.tokens[:args.loss_docs], sae.cfg.layer)} if args.loss_docs else {})}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
