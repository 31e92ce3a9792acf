"""The architecture rules, checked on the source: one seam into vLLM, one way (nothing imports the
hooks), vLLM's objects and environment changed only there, API and worker kept apart, serving apart
from the workbench, no import circles, and an unsupported vLLM refused at start."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import steer_plugin
from steer_plugin import vllm_seam

PACKAGE = Path(steer_plugin.__file__).parent
WORKBENCH = PACKAGE.parent / "workbench" / "steer_workbench"
PUBLIC_VLLM = {"vllm": {"SamplingParams", "LLM"}}
"""vLLM's documented interface the plugin may import outside the seam."""
SEAM = {"vllm_seam.py", "vllm_surface.py"}
"""The hooks, and the read-only surface of vLLM the API side reads."""


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
        if path.parent == PACKAGE and path.name in SEAM:
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


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (at module level or inside functions)."""
    names = {_module_name(path, root): path for path in _modules(root)}
    graph = {}
    for name, path in names.items():
        edges = set()
        for module, imported in _imports(path):
            edges |= {m for m in [module, *(f"{module}.{i}" for i in imported)] if m in names and m != name}
        graph[name] = edges
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


@pytest.mark.parametrize("root", [PACKAGE, WORKBENCH], ids=["steer_plugin", "steer_workbench"])
def test_no_import_circles(root):
    assert root.is_dir() and _circles(_graph(root)) == []


def test_nothing_imports_the_hooks():
    """The seam is on top: it imports the API and the worker; only the entry point imports it."""
    graph = _graph(PACKAGE)
    importers = sorted(name for name, edges in graph.items() if "steer_plugin.vllm_seam" in edges)
    assert importers == ["steer_plugin"]
    assert not {e for e in graph["steer_plugin.vllm_surface"] if e.startswith("steer_plugin")}


def test_serving_never_imports_the_workbench():
    offenders = [f"{path.relative_to(PACKAGE.parent)}: {module}"
                 for path in [*_modules(PACKAGE), PACKAGE.parent / "server.py"]
                 for module, _ in _imports(path) if module.split(".")[0] == "steer_workbench"]
    assert not offenders, offenders


def _vllm_names(tree: ast.AST) -> set[str]:
    """Names a module binds to vLLM modules or objects by importing them."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] == "vllm"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
            names |= {a.asname or a.name for a in node.names}
    return names


def _root(node: ast.AST) -> ast.AST:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node


def _changes_vllm(node: ast.AST, vllm_names: set[str]) -> str | None:
    """What a statement or call changes of vLLM's, if anything: an attribute or item of an object
    imported from vLLM, a decoder layer of the model (`.layers[i] = ...`), any `setattr`, or a
    VLLM_* environment variable."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
        return "setattr()"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
            node.func.attr == "putenv"
            or (node.func.attr in ("setdefault", "update") and "environ" in ast.unparse(node.func.value))):
        if any(isinstance(c, ast.Constant) and str(c.value).startswith("VLLM_")
               for arg in node.args for c in ast.walk(arg)):
            return ast.unparse(node)
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
        node, (ast.AugAssign, ast.AnnAssign)) else []
    for target in targets:
        if not isinstance(target, (ast.Attribute, ast.Subscript)):
            continue
        text = ast.unparse(target)
        root = _root(target)
        if isinstance(root, ast.Name) and root.id in vllm_names:
            return text
        if isinstance(target, ast.Subscript) and text.split("[")[0].endswith(".layers"):
            return text
        if "environ[" in text and "VLLM_" in text:
            return text
    return None


def test_vllm_objects_and_environment_are_changed_only_in_the_seam():
    offenders = []
    for path in _modules(PACKAGE):
        if path.parent == PACKAGE and path.name == "vllm_seam.py":
            continue
        tree = ast.parse(path.read_text())
        vllm_names = _vllm_names(tree)
        offenders += [f"{path.relative_to(PACKAGE)}:{node.lineno}: {change}" for node in ast.walk(tree)
                      if (change := _changes_vllm(node, vllm_names))]
    assert not offenders, offenders


def test_the_rule_sees_what_it_forbids():
    """The checker itself, on code that breaks each rule."""
    tree = ast.parse("from vllm.v1.worker.gpu_worker import Worker\nimport os\nWorker.load_model = f\n"
                     "setattr(runner, 'x', 1)\nsite.layers[3] = w\nos.environ.setdefault('VLLM_X', '0')\n"
                     "os.environ['VLLM_Y'] = '1'\nrows[3] = 1\nos.putenv('VLLM_Z', '1')\n"
                     "os.environ.update({'VLLM_W': '1'})\nos.environ.setdefault('OMP_NUM_THREADS', '1')\n")
    found = [c for node in ast.walk(tree) if (c := _changes_vllm(node, _vllm_names(tree)))]
    assert len(found) == 7 and "rows[3]" not in found and not any("OMP" in c for c in found), found


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
