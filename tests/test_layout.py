"""The architecture rules, checked on the source: one seam into vLLM, API and worker kept apart,
and an unsupported vLLM refused at start."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import steer_plugin
from steer_plugin import vllm_seam

PACKAGE = Path(steer_plugin.__file__).parent
PUBLIC_VLLM = {"vllm": {"SamplingParams", "LLM"}}
"""vLLM's documented interface the plugin may import outside the seam."""


def _imports(path: Path) -> list[tuple[str, set[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, set()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, {alias.name for alias in node.names}))
    return out


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def test_only_the_seam_imports_vllm_internals():
    offenders = []
    for path in _modules(PACKAGE):
        if path.name == "vllm_seam.py":
            continue
        for module, names in _imports(path):
            if module.split(".")[0] != "vllm":
                continue
            if not names or not names <= PUBLIC_VLLM.get(module, set()):
                offenders.append(f"{path.relative_to(PACKAGE)}: {module} {sorted(names)}")
    assert not offenders, offenders


@pytest.mark.parametrize("side, other", [("api", "worker"), ("worker", "api")])
def test_api_and_worker_never_import_each_other(side, other):
    offenders = [f"{path.name}: {module}" for path in _modules(PACKAGE / side) for module, names in _imports(path)
                 if module.startswith(f"steer_plugin.{other}")
                 or (module == "steer_plugin" and other in names)]
    assert not offenders, offenders


def test_no_module_points_outside_the_repository():
    for path in list(_modules(PACKAGE)) + [PACKAGE.parent / "server.py"]:
        assert "shared/notes" not in path.read_text(), path


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "not-a-version"])
def test_unsupported_vllm_stops_start_up_naming_the_range(version):
    with pytest.raises(vllm_seam.UnsupportedVllmError) as info:
        vllm_seam.check_vllm_version(version, allow_any=False)
    message = str(info.value)
    assert vllm_seam.SUPPORTED_VLLM in message and version in message and "STEER_PLUGIN_ALLOW_ANY_VLLM" in message
    vllm_seam.check_vllm_version(version, allow_any=True)  # the override lets it start


def test_register_refuses_an_unsupported_vllm(monkeypatch):
    """Through the plugin entry point itself; a SystemExit, which vLLM's plugin loader does not swallow."""
    monkeypatch.setattr(vllm_seam, "installed_vllm_version", lambda: "0.30.0")
    monkeypatch.delenv("STEER_PLUGIN_DISABLE", raising=False)
    monkeypatch.delenv("STEER_PLUGIN_ALLOW_ANY_VLLM", raising=False)
    with pytest.raises(SystemExit, match=r"supports vLLM >=0\.32\.0,<0\.33"):
        steer_plugin.register()


def test_the_installed_vllm_is_supported():
    vllm_seam.check_vllm_version(vllm_seam.installed_vllm_version(), allow_any=False)


def _call_as(module: str, function: str):
    """Call `roles_of_this_load` from a function of the given name in a module of the given name."""
    namespace = {"__name__": module, "roles": vllm_seam.roles_of_this_load}
    exec(f"def {function}(self=None):\n    return roles()\n", namespace)
    return namespace[function]()


def test_each_process_gets_the_hooks_of_what_it_loads_as():
    assert _call_as("vllm.v1.worker.worker_base", "init_worker") == {"worker"}
    assert _call_as("vllm.v1.engine.core", "__init__") == {"engine", "worker"}
    assert _call_as("vllm.engine.arg_utils", "create_engine_config") == {"frontend"}
