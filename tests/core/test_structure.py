"""The shape of the code: which module may import which, read from the source (AST), so a
deferred import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"kubetune": REPO / "trainer_image" / "kubetune", "kubetune_operator": REPO / "operator" / "kubetune_operator"}


def _modules() -> dict[str, Path]:
    """Every module of the product packages by dotted name (a package by its own name)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _nearest_module(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imported_modules(module: str) -> set[str]:
    """The product modules `module` imports anywhere in its source (relative imports resolved;
    `from package import name` counts as package.name where that is a module)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.update(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source for alias in node.names)
    return {found for name in names if (found := _nearest_module(name)) is not None and found != module}


def test_the_module_graph_is_read_from_the_source():
    assert imported_modules("kubetune.testing") >= {"kubetune.data.tokenize"}
    assert "kubetune.artifacts.export_format" in imported_modules("kubetune.serve.loader")  # `from ..export_format import`
    assert "kubetune.artifacts.model_source" in imported_modules("kubetune.train.loop")  # deferred imports count too
    assert "kubetune.train.export" in imported_modules("kubetune.train.main")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "kubetune.testing"))
def test_product_code_never_imports_the_test_helpers(module):
    assert "kubetune.testing" not in imported_modules(module), f"{MODULES[module]} imports kubetune.testing"


def test_no_import_cycles():
    """Tarjan's strongly connected components over every import, deferred ones included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []
    graph = {module: imported_modules(module) - {p for p in MODULES if module.startswith(p + ".")} for module in MODULES}

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_operator_never_imports_the_trainer():
    """The operator image (kopf, no torch) shares the contracts (spec, storage, planner, ...);
    nothing it reaches, deferred imports included, is the trainer's, the server's or the CLI's."""
    reached: set[str] = set()
    todo = [module for module in MODULES if module.startswith("kubetune_operator")]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(imported_modules(module))
    assert "kubetune.planner.estimate" in reached and "kubetune.planner.zero_sizes" in reached
    trainer_side = ("kubetune.train", "kubetune.serve", "kubetune.cli", "kubetune.data", "kubetune.model", "kubetune.testing")
    assert sorted(m for m in reached if m.startswith(trainer_side)) == []
    assert sorted(m for m in reached if m.startswith("kubetune.") and not in_packages(m, LOWER_LAYERS)) == []


# The layers under the trainer, each importing only itself and the layers before it.
LOWER_LAYERS = ("kubetune.api", "kubetune.planner", "kubetune.artifacts")


def in_packages(module: str, packages) -> bool:
    """Whether `module` is one of `packages` or inside one."""
    return any(module == package or module.startswith(package + ".") for package in packages)


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_each_lower_layer_imports_only_the_layers_before_it(layer):
    allowed = LOWER_LAYERS[: LOWER_LAYERS.index(layer) + 1]
    imports = {(module, imported) for module in MODULES if in_packages(module, [layer]) for imported in imported_modules(module)}
    assert sorted((m, i) for m, i in imports if i != "kubetune" and not in_packages(i, allowed)) == []


def test_the_top_level_holds_layers_not_loose_modules():
    """kubetune/'s top level: packages, plus the package's own __init__ and the test helpers."""
    loose = sorted(p.name for p in PACKAGES["kubetune"].glob("*.py"))
    assert loose == ["__init__.py", "testing.py"]


def test_importing_the_operator_imports_no_torch():
    code = (
        "import importlib, pkgutil, sys, kubetune_operator\n"
        "for info in pkgutil.iter_modules(kubetune_operator.__path__):\n"
        "    importlib.import_module('kubetune_operator.' + info.name)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'kubetune.train') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
