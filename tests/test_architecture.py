"""The layers of docs/architecture.md hold: every ddil_core package imports only the layers below it (lazy imports
inside functions included), no module-level import circle exists, and every module imports on its own in a fresh
process (a forked child per module, with the third-party libraries preloaded in the parent and ddil_core not)."""
from __future__ import annotations

import ast
import multiprocessing
import re
from pathlib import Path

import pytest

from tests import ROOT

PACKAGE = ROOT / "ddil_core"


def documented_layers() -> dict[str, int]:
    """{package: layer} from the layer table of docs/architecture.md."""
    layers = {}
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for layer, packages in re.findall(r"^\| (\d+) \| ([^|]+) \|", text, flags=re.M):
        for name in re.findall(r"`(\w+)`", packages):
            layers[name] = int(layer)
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The ddil_core modules a file imports (every import, or only those run at import time)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ddil_core"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ddil_core"))
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def package_of(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_package_has_a_documented_layer():
    layers = documented_layers()
    packages = {package_of(m) for m in MODULES} - {""}
    assert not packages - set(layers), f"packages missing from docs/architecture.md's layer table: " \
                                       f"{sorted(packages - set(layers))}"
    assert not set(layers) - packages, f"layers name packages that do not exist: {sorted(set(layers) - packages)}"


def test_each_package_imports_only_lower_layers():
    layers = documented_layers()
    wrong = []
    for module, path in MODULES.items():
        source = package_of(module)
        for target in imports(path, top_level_only=False):
            dest = package_of(target)
            if dest and dest != source and layers[dest] >= layers[source]:
                wrong.append(f"{module} (layer {layers[source]}) imports {target} (layer {layers[dest]})")
    assert not wrong, "imports against docs/architecture.md's layers:\n" + "\n".join(sorted(set(wrong)))


def test_no_module_level_import_circle():
    graph = {m: {t for t in imports(p, top_level_only=True) if t in MODULES and t != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _import_alone(module: str, queue) -> None:
    import importlib
    import sys

    try:
        assert not any(m == "ddil_core" or m.startswith("ddil_core.") for m in sys.modules), "ddil_core preloaded"
        importlib.import_module(module)
        queue.put((module, None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put((module, f"{type(exc).__name__}: {exc}"))


PRELOADED = ("torch", "numpy", "yaml", "PIL.Image", "diffusers", "transformers", "safetensors.torch", "accelerate",
             "prometheus_client", "fsspec", "filelock", "tqdm", "scipy.linalg", "sklearn.datasets")


def _run_all(modules: list[str], queue) -> None:
    """In a fresh interpreter without ddil_core: preload the heavy libraries, then fork one child per module."""
    import importlib

    for name in PRELOADED:
        importlib.import_module(name)
    ctx = multiprocessing.get_context("fork")
    for module in modules:
        child = ctx.Process(target=_import_alone, args=(module, queue))
        child.start()
        child.join(300)
        if child.exitcode != 0:
            queue.put((module, f"child exited with {child.exitcode}"))


def test_every_module_imports_on_its_own_in_a_fresh_process():
    modules = sorted(MODULES)
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    runner = spawn.Process(target=_run_all, args=(modules, queue))
    runner.start()
    results = dict(queue.get(timeout=900) for _ in modules)
    runner.join(60)
    failures = {m: err for m, err in results.items() if err}
    assert not failures, "modules that do not import on their own:\n" + "\n".join(f"{m}: {e}" for m, e in
                                                                                 sorted(failures.items()))
