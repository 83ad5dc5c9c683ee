"""The package's architecture as a test: every import points down the layers, and no cycles.

    core (the layer's modules) ← models, distributed ← training, inference ← interop
    ← experiments ← cli

Every ``import`` statement counts, those inside functions and under ``TYPE_CHECKING`` too: a
lazy import hides a cycle from the interpreter, not from the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "moekit"

# The rank of each top-level part; an import may only point to a lower rank or inside its own part.
LAYERS = {
    "core": 0,
    "models": 1,
    "distributed": 1,
    "training": 2,
    "inference": 2,
    "interop": 3,
    "experiments": 4,
    "cli": 5,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str:
    """``moekit.training.trainer`` → training; ``moekit.layer`` → core; ``moekit.__main__`` → cli."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    return "cli" if module == "moekit.__main__" else "core"


def imported_modules(path: Path, module: str) -> set[str]:
    """The moekit modules that ``path`` imports, resolved to module names (not symbols)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("moekit"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("moekit"):
                continue
            for alias in node.names:  # `from moekit.distributed import checkpoint` imports a module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    return {name for name in found if name in MODULES and name != module}


MODULES = {module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}
EDGES = {module: imported_modules(path, module) for module, path in MODULES.items()}


def test_every_module_belongs_to_a_known_part() -> None:
    for module in MODULES:
        parts = module.split(".")
        if len(parts) > 2:
            assert parts[1] in LAYERS, f"{module}: {parts[1]}/ is not one of {sorted(LAYERS)}"


def wrong_edges(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in edges.items():
        for target in targets:
            source_part = part_of(module)
            # The package's __init__ re-exports the core's public names.
            target_part = "core" if target == "moekit" else part_of(target)
            if source_part != target_part and LAYERS[target_part] >= LAYERS[source_part]:
                wrong.append(f"{module} ({source_part}) imports {target} ({target_part})")
    return sorted(wrong)


def find_cycles(edges: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first search, printed as the cycle it closes."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" → ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    return cycles


def test_imports_point_down_the_layers() -> None:
    wrong = wrong_edges(EDGES)
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    # Package __init__ files only re-export: an edge into one is an edge into what it re-exports.
    edges = {m: {t for t in ts if MODULES[t].name != "__init__.py"} for m, ts in EDGES.items()}
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    ("module", "expected"),
    [("moekit.layer", "core"), ("moekit.training.trainer", "training"), ("moekit.__main__", "cli")],
)
def test_part_of(module: str, expected: str) -> None:
    assert part_of(module) == expected


def test_the_checkers_can_fail() -> None:
    # A core module importing the trainer, and the old routing ↔ capacity cycle, are caught.
    assert wrong_edges({"moekit.layer": {"moekit.training.trainer"}}) == [
        "moekit.layer (core) imports moekit.training.trainer (training)"
    ]
    assert wrong_edges({"moekit.models.lm": {"moekit.distributed.run"}})  # siblings: not allowed
    assert not wrong_edges({"moekit.cli.main": {"moekit.training.trainer", "moekit"}})
    assert find_cycles({"moekit.routing": {"moekit.capacity"}, "moekit.capacity": {"moekit.routing"}}) == [
        "moekit.capacity → moekit.routing → moekit.capacity"
    ]


def test_lazy_imports_count(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from moekit.training import trainer\n    import moekit.layer\n")
    assert imported_modules(source, "moekit.probe") == {"moekit.training.trainer", "moekit.layer"}
