"""`steer-vllm serve MODEL [options]`: vLLM's own `vllm serve`, every option included, for where the
`vllm` command cannot start (vLLM's CPU wheel: "No package metadata was found for vllm").
`steer-server` launches vLLM through it, so options after `--` reach `vllm serve` unchanged."""

from __future__ import annotations

import sys

from steer_plugin.vllm_surface import run_vllm_cli


def main() -> None:
    run_vllm_cli(sys.argv[1:])


if __name__ == "__main__":
    main()
