"""House rules checked mechanically: module size, argument parsing only in entry points."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["train", "models", "data", "kernels", "infer", "recipes"]
SOURCES = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))
PARSER_MODULES = {"argparse", "click", "typer", "fire", "optparse", "getopt"}


def _is_main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def _names(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def argument_parsing_outside_entry(tree: ast.Module) -> list[int]:
    """Line numbers that parse arguments (argv, argparse & co., @hydra.main) outside the
    ``if __name__ == "__main__":`` block and outside a top-level ``main`` function."""
    allowed: set[int] = set()
    for node in tree.body:
        if _is_main_guard(node) or (isinstance(node, ast.FunctionDef) and node.name == "main"):
            allowed.update(range(node.lineno, node.end_lineno + 1))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            modules = []
        parses = any(m.split(".")[0] in PARSER_MODULES for m in modules) or (
            isinstance(node, ast.Attribute)
            and (node.attr == "argv" or (node.attr == "main" and _names(node.value, "hydra")))
        )
        if parses and node.lineno not in allowed:
            bad.append(node.lineno)
    return bad


def test_sources_found():
    assert len(SOURCES) >= 10


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_module_under_800_lines(path):
    assert len(path.read_text().splitlines()) <= 800


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_argument_parsing_only_in_entry_points(path):
    tree = ast.parse(path.read_text())
    assert argument_parsing_outside_entry(tree) == [], f"{path}: argument parsing in a library"


def test_the_check_catches_library_parsing():
    library = "import sys\nimport argparse\n\ndef run():\n    return sys.argv[1:]\n"
    entry = (
        "import sys\n\ndef main():\n    return sys.argv\n\nif __name__ == '__main__':\n    main()\n"
    )
    assert argument_parsing_outside_entry(ast.parse(library)) == [2, 5]
    assert argument_parsing_outside_entry(ast.parse(entry)) == []


# Package layers, lowest first: a module may import its own package and the ones below it, never
# one above (so there is no import circle between packages). `recipes` (config, errors, the CLI
# wrapper) imports none of the others; `models` (weights, objectives, tensor-level draft
# forwards, the target) never imports `infer` (how drafters are served) or `data`.
LAYERS = ["recipes", "kernels", "models", "data", "infer", "train"]


def imported_packages(tree: ast.Module) -> dict[str, list[int]]:
    """Project packages imported anywhere in the module (lazy imports included) -> lines."""
    found: dict[str, list[int]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in LAYERS:
                found.setdefault(top, []).append(node.lineno)
    return found


def upward_imports(package: str, tree: ast.Module) -> list[str]:
    """Imports of packages above ``package`` in LAYERS, as 'package:line'."""
    level = LAYERS.index(package)
    return [
        f"{other}:{line}"
        for other, lines in imported_packages(tree).items()
        if LAYERS.index(other) > level
        for line in lines
    ]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_only_go_down_the_layers(path):
    package = path.relative_to(REPO).parts[0]
    bad = upward_imports(package, ast.parse(path.read_text()))
    assert bad == [], f"{path} imports from a higher layer ({' < '.join(LAYERS)}): {bad}"


def test_the_layer_check_catches_each_seam():
    """Each crossing this layering forbids is caught, lazy imports included."""
    models_to_infer = "def proposer():\n    from infer.proposers import DraftLMProposer\n"
    models_to_data = "from data.distill import target_fingerprint\n"
    recipes_to_models = "def load():\n    import models.target\n"
    assert upward_imports("models", ast.parse(models_to_infer)) == ["infer:2"]
    assert upward_imports("models", ast.parse(models_to_data)) == ["data:1"]
    assert upward_imports("recipes", ast.parse(recipes_to_models)) == ["models:2"]
    assert upward_imports("train", ast.parse(models_to_infer + models_to_data)) == []


def test_target_fingerprints_live_next_to_the_target():
    import models.target

    assert callable(models.target.target_fingerprint) and callable(models.target.tokenizer_hash)
    assert "def target_fingerprint" not in (REPO / "data" / "distill.py").read_text()


def module_of(path: Path) -> str:
    """Dotted module name of a source file (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (lazy imports included); ``from
    a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``."""
    modules = {module_of(p): p for p in SOURCES if p.relative_to(REPO).parts[0] == package}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]  # fmt: skip
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of ``graph`` as [a, b, ..., a], or [] when there is none."""
    state, stack = {}, []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle_inside_a_package(package):
    cycle = find_cycle(import_graph(package))
    assert cycle == [], f"import circle in {package}/: {' -> '.join(cycle)}"


def test_the_circle_check_catches_one():
    graph = {"infer.eval": {"infer.tune", "infer.decode"}, "infer.tune": {"infer.eval"},
             "infer.decode": set()}  # fmt: skip
    assert find_cycle(graph) == ["infer.eval", "infer.tune", "infer.eval"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert "infer.proposers.heads" in import_graph("infer")["infer.proposers.hidden_transfer"]


def test_every_family_has_its_proposer_module_and_a_recipe():
    """A family is ``models/<m>.py`` + ``infer/proposers/<m>.py`` + a recipe (the README's
    layout): checked for every registered family."""
    from infer.proposers import FAMILY_PROPOSERS
    from models.registry import load_families
    from recipes import load_config

    recipes = {}
    for path in (REPO / "recipes" / "recipe").glob("*.yaml"):
        recipes.setdefault(load_config([f"recipe={path.stem}"]).drafter.type, path.stem)
    for name, cls in load_families().items():
        module = cls.__module__.split(".")[-1]
        assert (REPO / "infer" / "proposers" / f"{module}.py").is_file(), (name, module)
        assert name in FAMILY_PROPOSERS, f"{name} has no proposer"
        assert name in recipes, f"{name} has no recipe"
