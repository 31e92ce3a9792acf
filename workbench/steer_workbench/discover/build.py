"""`steer-catalogue build`: the feature catalogue of any SAE the plugin serves, on any model it serves.

The corpus runs through vLLM with the plugin (an offline engine), each document a prompt carrying
`steer_record_features`: the worker encodes the stream at the SAE's layer with the very code that
serves inspection (`worker/recorder.py`) and keeps each token's strongest `top_k` features, which
this process fetches over vLLM's RPC and folds into per-feature statistics and strongest activations
(`top_features.py`, memory bounded by the SAE's width, not the corpus). So it works for every
architecture and SAE layout the plugin serves, on a CPU or a GPU. Position 0 of each document (an
attention sink the SAE was not trained on) is left out, as training leaves it out.

Written to `--out` (the folder `server.py --catalogue ID=DIR` points at; it need not be the SAE's):
    feature_catalogue.json.gz   one entry per feature: statistics, top tokens, contexts with the
                                token marked, an automatic label, the output side (promoted tokens
                                through the model's final norm and unembedding)
    feature_stats.safetensors   max_activation (what `unit: "max"` multiplies), frequency, mean
    build.json                  what was read, and how fast
An existing catalogue in `--out` keeps its imported labels and its calibration (strengths, sweeps,
steered tokens): a rebuild replaces the input and output sides only. The state is saved after every
batch of documents (`build-state.npz`), and a build stopped half-way resumes there when run again
with the same model, SAE, corpus and settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from steer_plugin.api.admission import new_recording_key
from steer_plugin.core.catalogue_schema import validate_entries
from steer_plugin.core.sae import CATALOGUE_FILENAME, PLAIN_CATALOGUE_FILENAME, SAE, STATS_FILENAME, load_config
from steer_plugin.core.spec import MAX_TOP_K, RECORD_FIELD, FeatureRecording
from steer_plugin.search.catalogue import read_entries, write_entries
from steer_workbench.catalogue import add_output_side, build_catalogue
from steer_workbench.discover.corpus_file import file_digest, read_documents
from steer_workbench.discover.top_features import TopFeatures
from steer_workbench.offline_engine import offline_llm

STATE_FILENAME = "build-state.npz"
REPORT_FILENAME = "build.json"
INPUT_SIDE = ("label", "max_activation", "frequency", "mean_activation", "top_tokens", "top_contexts")
"""Entry fields a build writes (with `output_tokens` and the automatic label); the rest is kept."""


@dataclass(frozen=True)
class BuildConfig:
    """One catalogue build."""

    model: str
    """Hugging Face model directory (what the engine serves)."""
    sae: str
    """SAE folder or file, any layout the plugin reads."""
    corpus: str
    """Text or JSONL file (see corpus_file.py)."""
    out: str
    """Folder the catalogue is written to."""
    layer: int | None = None
    """Decoder layer the SAE reads, where its files do not say."""
    top_k: int = MAX_TOP_K
    """Features recorded per token (the recorder's most): frequencies count these (see top_features.py)."""
    top: int = 40
    """Strongest activations kept per feature: its top tokens are counted over them."""
    contexts: int = 4
    """Contexts shown per feature."""
    ctx: int = 512
    """Tokens per document (longer ones are cut)."""
    batch: int = 32
    """Documents per engine call; the state is saved after each."""
    max_documents: int | None = None
    """Read only the corpus's first n documents."""
    output_side: bool = True
    """Also the promoted tokens (loads the model's weights with transformers in this process)."""
    dtype: str = "float32"
    """The engine's dtype ("auto" on a GPU: the model's own)."""

    def key(self) -> str:
        """What a saved state must match to be resumed: everything that changes what is recorded."""
        sae = Path(self.sae)
        files = sorted(sae.rglob("*")) if sae.is_dir() else [sae]
        listing = [(str(p.relative_to(sae) if sae.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in files if p.is_file()]
        return hashlib.sha256(json.dumps([str(Path(self.model).resolve()), listing, file_digest(Path(self.corpus)),
                                          self.layer, self.top_k, self.top, self.ctx, self.max_documents,
                                          self.dtype]).encode()).hexdigest()


def _record(llm, key: str) -> dict:
    """The worker's records of one finished prompt (from whichever worker holds the SAE's layer)."""
    replies = [r for r in llm.collective_rpc("steer_pop_features", args=(key,)) if r is not None]
    if not replies:
        raise RuntimeError(f"the engine returned no feature records for {key}: does it run the plugin?")
    return replies[0]


def _read_corpus(cfg: BuildConfig, llm, state: TopFeatures, docs: list[list[int]], sae_id: str) -> tuple[int, float]:
    """Runs the documents not yet in `state` through the engine, saving the state after every batch;
    returns (tokens read, seconds taken)."""
    from vllm import SamplingParams

    state_path = Path(cfg.out) / STATE_FILENAME
    key = cfg.key()
    started, tokens_before = time.perf_counter(), state.tokens
    bar = tqdm(total=sum(map(len, docs)), initial=sum(map(len, docs[:state.documents])), unit="tok",
               desc="recording features", unit_scale=True)
    for at in range(state.documents, len(docs), cfg.batch):
        part = docs[at:at + cfg.batch]
        keys = [new_recording_key() for _ in part]  # signed by this process, whose engine admits them
        params = [SamplingParams(max_tokens=1, temperature=0.0, extra_args={RECORD_FIELD: FeatureRecording(
            key=k, sae=sae_id, top_k=cfg.top_k, scope="prompt").model_dump_json()}) for k in keys]
        llm.generate([{"prompt_token_ids": ids} for ids in part], params, use_tqdm=False)
        doc, pos, ids, values = [], [], [], []
        for number, k in enumerate(keys, start=at):
            record = _record(llm, k)
            kept = np.asarray(record["positions"]) > 0  # position 0: the attention sink
            doc.append(np.full(int(kept.sum()), number, np.int32))
            pos.append(np.asarray(record["positions"], np.int32)[kept])
            ids.append(np.asarray(record["ids"], np.int64).reshape(len(kept), -1)[kept])
            values.append(np.asarray(record["values"], np.float32).reshape(len(kept), -1)[kept])
        state.add(np.concatenate(doc), np.concatenate(pos), np.concatenate(ids), np.concatenate(values),
                  tokens=sum(len(d) - 1 for d in part))
        state.documents = at + len(part)
        state.save(state_path, key)
        bar.update(sum(map(len, part)))
        bar.set_postfix(tok_per_s=f"{(state.tokens - tokens_before) / (time.perf_counter() - started):.0f}")
    bar.close()
    return state.tokens - tokens_before, time.perf_counter() - started


def _kept_fields(out: Path) -> list[dict] | None:
    """The entries of a catalogue already in `out`, whose labels and calibration a rebuild keeps."""
    if not any((out / name).is_file() for name in (CATALOGUE_FILENAME, PLAIN_CATALOGUE_FILENAME)):
        return None
    return read_entries(out)


def _merge(built: list[dict], old: list[dict] | None) -> list[dict]:
    """Built entries with what the old catalogue had beyond the input and output sides: imported labels
    (the last one stays the shown label) and calibration fields."""
    if old is None:
        return built
    if len(old) != len(built):
        raise ValueError(f"the catalogue in the output folder has {len(old)} features, the SAE {len(built)}: "
                         "give another --out")
    for entry, before in zip(built, old):
        imported = [lab for lab in before.get("labels", []) if lab["source"] != "tokens"]
        kept = {k: v for k, v in before.items() if k not in INPUT_SIDE + ("id", "labels", "output_tokens")}
        entry.update(kept)
        entry["labels"] = entry["labels"] + imported
        if imported:
            entry["label"] = imported[-1]["text"]
    return built


def _machine() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"


def build(cfg: BuildConfig) -> dict:
    """Builds (or resumes building) the catalogue; returns the report written to build.json."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sae_cfg = load_config(cfg.sae)
    sae_id = "catalogue"
    begun = time.perf_counter()
    llm = offline_llm(cfg.model, own_process=True, max_model_len=cfg.ctx + 1, dtype=cfg.dtype,
                      additional_config={"steer": {"saes": [{"path": str(Path(cfg.sae).resolve()), "id": sae_id,
                                                             "layer": cfg.layer}],
                                                   "metrics_sample_every": 0}})
    engine_start = time.perf_counter() - begun
    tokenizer = llm.get_tokenizer()
    texts = read_documents(Path(cfg.corpus), tokenizer)[:cfg.max_documents]
    docs = [ids for ids in (tokenizer(t, add_special_tokens=True)["input_ids"][:cfg.ctx] for t in texts) if len(ids) > 1]
    key = cfg.key()
    state = TopFeatures.load(out / STATE_FILENAME, key) or TopFeatures.empty(sae_cfg.d_sae, cfg.top)
    resumed = state.documents
    new_tokens, reading = _read_corpus(cfg, llm, state, docs, sae_id)
    llm.llm_engine.engine_core.shutdown()
    del llm

    stats = state.statistics()
    entries = build_catalogue(tokenizer, docs, stats, state.top_value, state.top_doc, state.top_pos, cfg.contexts)
    if cfg.output_side:
        from steer_workbench.capture import load_hf_model

        model, _ = load_hf_model(cfg.model)
        add_output_side(entries, SAE.load(cfg.sae), model, tokenizer)
    entries = validate_entries(_merge(entries, _kept_fields(out)))
    write_entries(out, entries)
    save_file(stats, str(out / STATS_FILENAME))
    report = {"config": asdict(cfg), "documents": len(docs), "tokens": state.tokens, "resumed_at_document": resumed,
              "d_sae": sae_cfg.d_sae, "dead_fraction": float((state.count == 0).mean()),
              "seconds": {"engine_start": round(engine_start, 1), "reading": round(reading, 1),
                          "total": round(time.perf_counter() - begun, 1)},
              "tokens_per_second": round(new_tokens / reading, 1) if reading > 0 else None,
              "machine": _machine()}
    (out / REPORT_FILENAME).write_text(json.dumps(report, indent=2) + "\n")
    (out / STATE_FILENAME).unlink(missing_ok=True)  # done: a later build starts afresh
    return report
