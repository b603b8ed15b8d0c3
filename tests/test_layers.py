"""Layers point down (docs/architecture.md): every import of a tunesmith module, at the top of a file or inside a
function, goes to a lower layer or stays inside its own package; siblings of one layer never import each other.

The registry is the one named way up: it names its plugin modules as strings (registry.py) and imports them on
the first lookup of that kind, so that validating a config needs no recipe and no layer imports one above it.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src"

# Lowest first. A module's unit is its first name under tunesmith (tunesmith.train.loss: train).
LAYERS = [
    {"errors", "tunesmith"},  # tunesmith: the package's __init__ (its __version__)
    {"paths", "allocator", "offline", "security"},
    {"registry", "hardware"},
    {"config"},
    {"rundir"},
    {"data", "models"},
    {"engine"},
    {"eval"},
    {"train", "serve", "datagen"},
    {"recipes"},
    {"cli_eval", "cli_models", "cli_service"},  # the command's eval, model and service commands
    {"cli"},  # the command: parses, calls one function (may import lazily)
    {"__main__"},
]
LAYER = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
# (importer unit, imported unit): why that arrow may point sideways or up. None today; add one only with its reason.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path, source: Path) -> str:
    parts = list(path.relative_to(source).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, source: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a tunesmith module in the file, in function bodies too; `from A import B`
    names A.B when B is a module, else A."""
    name = module_name(path, source)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                is_module = (source / submodule.replace(".", "/")).with_suffix(".py").is_file() or (
                    source / submodule.replace(".", "/")
                ).is_dir()
                found.append((node.lineno, submodule if is_module else origin))
    return [(line, module) for line, module in found if module.split(".")[0] == "tunesmith"]


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tunesmith"


def wrong_arrows(source: Path, layer: dict[str, int], exceptions: dict[tuple[str, str], str]) -> list[str]:
    """`FILE:LINE: A -> B (why it is wrong)` for every import that points sideways or up."""
    wrong = []
    for path in sorted((source / "tunesmith").rglob("*.py")):
        importer = unit(module_name(path, source))
        if importer == "tunesmith":  # the package's __init__: its version only
            continue
        for line, module in imported_modules(path, source):
            target = unit(module)
            if target == importer or (importer, target) in exceptions:
                continue
            where = f"{path.relative_to(source)}:{line}: {importer} -> {module}"
            if importer not in layer or target not in layer:
                wrong.append(f"{where} ({(importer if importer not in layer else target)} is in no layer)")
            elif layer[target] == layer[importer]:
                wrong.append(f"{where} (siblings)")
            elif layer[target] > layer[importer]:
                wrong.append(f"{where} (points up)")
    return wrong


def import_circles(source: Path) -> list[list[str]]:
    """The groups of modules that import each other round in a circle (strongly connected, Tarjan), any import
    counted: at the top of a file, inside a function, or only for type checking."""
    modules = {module_name(path, source): path for path in (source / "tunesmith").rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for _, target in imported_modules(path, source):
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target not in (name, "tunesmith") and target in modules:
                graph[name].add(target)
    order: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        order[node] = lowest[node] = len(order)
        stack.append(node)
        for target in graph[node]:
            if target not in order:
                visit(target)
                lowest[node] = min(lowest[node], lowest[target])
            elif target in stack:
                lowest[node] = min(lowest[node], order[target])
        if lowest[node] == order[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return circles


def test_no_modules_import_each_other_in_a_circle():
    assert import_circles(SOURCE) == []


def test_every_import_points_down():
    assert wrong_arrows(SOURCE, LAYER, EXCEPTIONS) == []


def test_every_top_level_module_and_package_has_a_layer():
    units = {
        path.stem if path.is_file() else path.name
        for path in (SOURCE / "tunesmith").iterdir()
        if (path.suffix == ".py" or (path / "__init__.py").is_file()) and path.name != "__init__.py"
    }
    assert sorted(units - set(LAYER)) == []


def test_the_check_finds_an_arrow_up_a_sideways_one_and_one_in_a_function(tmp_path):
    package = tmp_path / "tunesmith"
    for folder in ("data", "models", "train"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "data" / "rows.py").write_text("from tunesmith.models import loading\n")
    (package / "models" / "loading.py").write_text("def load():\n    from ..train import loop\n")
    (package / "train" / "loop.py").write_text("from tunesmith.data.rows import x\nimport tunesmith.models.loading\n")
    assert wrong_arrows(tmp_path, LAYER, {}) == [
        "tunesmith/data/rows.py:1: data -> tunesmith.models.loading (siblings)",
        "tunesmith/models/loading.py:2: models -> tunesmith.train.loop (points up)",
    ]
    assert import_circles(tmp_path) == [["tunesmith.data.rows", "tunesmith.models.loading", "tunesmith.train.loop"]]


@pytest.mark.parametrize(
    "name",
    [
        "formats",
        "methods",
        "adapters",
        "schedules",
        "tasks",
        "distill_losses",
        "preference_losses",
        "reward_functions",
        "metric_tasks",
        "metrics",
    ],
)
def test_each_registry_names_the_modules_its_plugins_live_in(name):
    from tunesmith import registry

    plugins = getattr(registry, name)
    assert plugins.modules and all(importlib.util.find_spec(module) for module in plugins.modules)
    defined_in = {
        plugins.get(entry).__module__
        for entry in plugins.names()
        if callable(plugins.get(entry)) and getattr(plugins.get(entry), "__module__", "").startswith("tunesmith.")
    }
    assert defined_in <= set(plugins.modules)
