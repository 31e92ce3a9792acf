"""The launcher's (server.py, steer-server) argument and environment handling, without starting a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steer_plugin.launcher import serve as server
from steer_plugin.core.config import DEFAULT_SAE_DIR, SAESource, SteerConfig


def _args(*argv: str):
    return server.build_parser().parse_args(["--model", "/models/m", *argv])


def test_defaults_reach_vllm_as_additional_config():
    argv = server.vllm_argv(_args("--max-clamps", "8", "--metrics-watch", "3,7"), ["--max-num-seqs", "4"])
    steer = json.loads(argv[argv.index("--additional-config") + 1])["steer"]
    assert SteerConfig.from_dict(steer) == SteerConfig(saes=(SAESource(str(DEFAULT_SAE_DIR.resolve())),), max_clamps=8,
                                                       metrics_watch=(3, 7))
    assert argv[0] == "/models/m" and argv[-2:] == ["--max-num-seqs", "4"]


def test_no_plugin_means_no_steer_config_and_the_plugin_off():
    args = _args("--no-plugin")
    assert "--additional-config" not in server.vllm_argv(args, [])
    assert server.prepare_environment(args)["STEER_PLUGIN_DISABLE"] == "1"


def test_environment_for_kv_cache_and_plugins_and_no_metrics_directory(monkeypatch):
    """Worker metrics travel over vLLM's RPC: the launcher sets no PROMETHEUS_MULTIPROC_DIR (vLLM makes
    its own where it runs several API servers)."""
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    env = server.prepare_environment(_args("--port", "8123"))
    assert env["VLLM_PLUGINS"] == "steer,steer_features" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "STEER_PLUGIN_DISABLE" not in env or env["STEER_PLUGIN_DISABLE"] in ("", "0")
    assert "PROMETHEUS_MULTIPROC_DIR" not in env


def test_user_settings_win(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "steer")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "6")
    env = server.prepare_environment(_args())
    assert env["VLLM_PLUGINS"] == "steer" and env["VLLM_CPU_KVCACHE_SPACE"] == "6"


def test_vllm_serve_options_pass_through_unchanged():
    """Data parallel, API servers, nodes: whatever follows `--` reaches `vllm serve` as given."""
    shape = ["--data-parallel-size", "2", "--api-server-count", "2", "--nnodes", "2", "--headless"]
    assert server.vllm_argv(_args(), shape)[-len(shape):] == shape


def test_context_length_comes_from_the_model_unless_set(monkeypatch):
    own_model = server.vllm_argv(_args(), [])
    assert "--max-model-len" not in own_model  # vLLM reads the context from the model's own config
    argv = server.vllm_argv(_args("--max-model-len", "1024", "--dtype", "bfloat16"), [])
    assert argv[argv.index("--max-model-len") + 1] == "1024" and argv[argv.index("--dtype") + 1] == "bfloat16"
    monkeypatch.setattr("steer_plugin.launcher.prepare_model.prepare", lambda out: Path("/models/default"))
    default = server.vllm_argv(server.build_parser().parse_args([]), [])
    assert default[default.index("--max-model-len") + 1] == str(server.DEFAULT_MAX_MODEL_LEN)


def test_several_saes_with_ids_and_layers(tmp_path):
    a, b = tmp_path / "resid_sae", tmp_path / "other"
    argv = server.vllm_argv(_args("--sae", str(a), "--sae", f"mlp={b}", "--layer", "mlp=12", "--layer", "3"), [])
    cfg = SteerConfig.from_dict(json.loads(argv[argv.index("--additional-config") + 1])["steer"])
    assert cfg.saes == (SAESource(str(a), "resid_sae", 3), SAESource(str(b), "mlp", 12))
    with pytest.raises(SystemExit, match="no --sae has id 'attn'"):
        server.vllm_argv(_args("--sae", str(a), "--layer", "attn=2"), [])


def test_catalogue_folders_and_the_sae_dtype_reach_every_process(tmp_path):
    a, b = tmp_path / "shared" / "sae", tmp_path / "other"
    argv = server.vllm_argv(_args("--sae", f"mine={a}", "--sae", f"o={b}", "--catalogue", str(tmp_path / "cat"),
                                  "--catalogue", "o=rel/cat", "--sae-dtype", "bfloat16"), [])
    cfg = SteerConfig.from_dict(json.loads(argv[argv.index("--additional-config") + 1])["steer"])
    assert [s.catalogue_dir for s in cfg.saes] == [tmp_path / "cat", Path("rel/cat").resolve()]
    assert cfg.sae_dtype == "bfloat16" and SAESource(str(a)).catalogue_dir == a  # default: beside the SAE
    with pytest.raises(SystemExit, match="no --sae has id 'x'"):
        server.vllm_argv(_args("--sae", str(a), "--catalogue", "x=/c"), [])
    with pytest.raises(ValueError, match="sae_dtype must be"):
        SteerConfig(sae_dtype="int8")


def test_sae_ids_must_differ_and_be_plain():
    with pytest.raises(ValueError, match="ids must differ"):
        SteerConfig(saes=(SAESource("/x/sae"), SAESource("/y/sae")))
    with pytest.raises(ValueError, match="letters, digits"):
        SAESource("/x/sae", id="a b")


def test_vectors_are_named_on_the_command_line(tmp_path):
    argv = server.vllm_argv(_args("--vector", f"calm={tmp_path / 'calm.gguf'}", "--vector", "tea=tea.safetensors"), [])
    cfg = SteerConfig.from_dict(json.loads(argv[argv.index("--additional-config") + 1])["steer"])
    assert [(v.name, v.path) for v in cfg.vectors] == [("calm", str(tmp_path / "calm.gguf")),
                                                       ("tea", str(Path("tea.safetensors").resolve()))]
    for item, words in [(str(tmp_path / "calm.gguf"), "give NAME=FILE"), ("a b=calm.gguf", "use letters")]:
        with pytest.raises(SystemExit, match=words):
            server.vllm_argv(_args("--vector", item), [])
    with pytest.raises(ValueError, match="steer.vectors: names must differ"):
        SteerConfig.from_dict({"vectors": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]})


def test_variants_are_read_from_their_files_and_checked(tmp_path):
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"feature_clamps": [{"feature": 3, "value": 2, "unit": "max"}],
                                  "sampling": {"temperature": 0.7, "frequency_penalty": 0.5}}))
    argv = server.vllm_argv(_args("--variant", f"golden={golden}"), [])
    cfg = SteerConfig.from_dict(json.loads(argv[argv.index("--additional-config") + 1])["steer"])
    (variant,) = cfg.variants
    assert variant.name == "golden" and variant.model_id("m") == "m:golden"
    assert variant.feature_clamps == ({"feature": 3, "value": 2, "unit": "max"},)
    for body, words in [({"clamps": []}, "unknown key 'clamps'"),
                        ({"sampling": {"logprobs": 5}}, "sampling.logprobs is not a field"),
                        ({"sampling": {"temperature": "hot"}}, "sampling.temperature must be a number")]:
        golden.write_text(json.dumps(body))
        with pytest.raises(SystemExit, match=words):
            server.vllm_argv(_args("--variant", f"golden={golden}"), [])
    with pytest.raises(SystemExit, match="give NAME=FILE"):
        server.vllm_argv(_args("--variant", str(golden)), [])
