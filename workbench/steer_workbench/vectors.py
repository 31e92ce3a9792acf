"""python -m steer_workbench.vectors: a steering vector for any transformers model, from examples.

    python -m steer_workbench.vectors --model DIR --positive happy.txt --negative sad.txt --out happy.gguf
    python -m steer_workbench.vectors --model DIR --concept "tea:tea,teapot" --out tea.gguf

The direction at layer k is the mean residual stream at the output of decoder layer k over the
positive texts' tokens minus the mean over the negative texts' (difference of means; position 0,
the attention sink, left out). `--concept NAME:KEYWORDS` takes the chat corpus instead: documents
that name the concept at least twice against as many others. The file is written in llama.cpp's
control-vector layout (`.gguf`: F32 `direction.<k>`, k >= 1) or as safetensors with the same names
(`.safetensors`, k >= 0), which `server.py --vector NAME=FILE` serves; a request's `scale` multiplies
the mean difference as stored.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from steer_workbench.capture import load_hf_model
from steer_workbench.chat_corpus import CHATS_DIR, CHATS_FILE
from steer_workbench.diff_means import diff_of_sums, sample_documents, stream_sums


def read_texts(path: Path) -> list[str]:
    """One text per line of a .txt file, or the "text" of each line of a .jsonl file; blank lines skipped."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    texts = [json.loads(line)["text"] for line in lines] if path.suffix == ".jsonl" else lines
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


def parse_layers(spec: str, num_layers: int, first: int) -> list[int]:
    """`middle`, `all`, a list `3,5` or a range `4-9` -> decoder layer indices (those from `first` on)."""
    if spec == "middle":
        return [num_layers // 2]
    if spec == "all":
        return list(range(first, num_layers))
    layers = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        layers += list(range(int(low), int(high or low) + 1))
    bad = [k for k in layers if not first <= k < num_layers]
    if bad:
        raise ValueError(f"--layers: {bad[0]} is outside {first}..{num_layers - 1} for this model and file type")
    return sorted(set(layers))


def contrast(model, tokenizer, positive: list[str], negative: list[str], layers: list[int],
             batch_size: int = 8) -> dict[int, np.ndarray]:
    """Layer -> mean stream over the positive texts' tokens minus the negative texts' [d_model] float32."""
    token_lists = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in positive + negative]
    short = [t for t, ids in zip(positive + negative, token_lists) if len(ids) < 2]
    if short:
        raise ValueError(f"text {short[0]!r} has no token after the first: nothing to read")
    sums = stream_sums(model, token_lists, layers, batch_size)
    is_positive = torch.tensor([True] * len(positive) + [False] * len(negative))
    out = {}
    for layer, read in sums.items():
        pos = read.sums[is_positive].sum(0) / read.counts[is_positive].sum()
        neg = read.sums[~is_positive].sum(0) / read.counts[~is_positive].sum()
        out[layer] = (pos - neg).float().numpy()
    return out


def concept_contrast(model, tokenizer, concept: str, keywords: list[str], layers: list[int], chats: Path,
                     ctx: int = 256) -> dict[int, np.ndarray]:
    """Layer -> the concept's difference of means over the chat corpus (`diff_means`)."""
    token_lists, texts, kept = sample_documents(tokenizer, chats, {concept: keywords}, ctx, min_docs=3,
                                                per_concept=40)
    if concept not in kept:
        raise ValueError(f"--concept {concept}: fewer than 3 chat documents name {keywords} twice")
    sums = stream_sums(model, token_lists, layers)
    return {layer: diff_of_sums(read.sums, read.counts, texts, kept)[0].numpy() for layer, read in sums.items()}


def write_vector(path: Path, directions: dict[int, np.ndarray], model_hint: str) -> None:
    """GGUF in llama.cpp's control-vector layout, or safetensors with the same tensor names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gguf":
        from gguf import GGUFWriter

        writer = GGUFWriter(str(path), "controlvector")
        writer.add_string("controlvector.model_hint", model_hint)  # what llama.cpp's generator writes too
        writer.add_uint32("controlvector.layer_count", len(directions))
        for layer in sorted(directions):
            writer.add_tensor(f"direction.{layer}", directions[layer].astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({f"direction.{k}": v.astype(np.float32) for k, v in directions.items()}, str(path))
    else:
        raise ValueError(f"--out: {path.name} is neither .gguf nor .safetensors")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m steer_workbench.vectors", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="transformers model folder")
    p.add_argument("--positive", type=Path, help="texts the vector pushes towards (.txt lines or .jsonl)")
    p.add_argument("--negative", type=Path, help="texts it pushes away from")
    p.add_argument("--concept", help="NAME:KEYWORD,KEYWORD from the chat corpus instead of two files")
    p.add_argument("--chats", type=Path, default=CHATS_DIR / CHATS_FILE, help="chat corpus for --concept")
    p.add_argument("--layers", default="middle", help="middle (default), all, a list 3,5 or a range 4-9")
    p.add_argument("--out", type=Path, required=True, help=".gguf (llama.cpp's layout) or .safetensors")
    args = p.parse_args(argv)
    if (args.concept is None) == (args.positive is None or args.negative is None):
        p.error("give --positive and --negative, or --concept")
    model, tokenizer = load_hf_model(args.model)
    first = 1 if args.out.suffix == ".gguf" else 0
    layers = parse_layers(args.layers, model.config.num_hidden_layers, first)
    if args.concept is not None:
        name, _, keywords = args.concept.partition(":")
        directions = concept_contrast(model, tokenizer, name, [k for k in keywords.split(",") if k] or [name],
                                      layers, args.chats)
    else:
        directions = contrast(model, tokenizer, read_texts(args.positive), read_texts(args.negative), layers)
    write_vector(args.out, directions, model.config.model_type)
    norms = ", ".join(f"{k}: {np.linalg.norm(v):.3g}" for k, v in sorted(directions.items()))
    print(f"wrote {args.out} (layer: norm {norms})")


if __name__ == "__main__":
    main()
