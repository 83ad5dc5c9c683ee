"""Project tooling: the version has one source, and the test markers are registered and used.

Verifies: ``moekit.__version__`` is what ``moekit --version`` prints and what pyproject.toml
reads (setuptools dynamic version, no second literal); the ``slow`` and ``distributed``
markers are registered under ``--strict-markers`` (a typo in a marker is an error) and
every test that starts several processes (``tests.ranks.run_ranks``, ``moekit bench ep``)
is marked ``distributed``, so ``-m "not distributed"`` really leaves them out.

    pytest tests/test_tooling.py
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import moekit
from moekit.cli.main import main

TESTS = Path(__file__).resolve().parent
PYPROJECT = TESTS.parent / "pyproject.toml"


def test_cli_version_is_the_package_version(capsys):
    assert main(["--version"]) == 0  # main returns argparse's exit status instead of raising it
    assert capsys.readouterr().out.strip() == f"moekit {moekit.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", moekit.__version__)


def test_pyproject_reads_the_version_from_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads(PYPROJECT.read_text())
    assert "version" not in config["project"], "a second, static version in pyproject.toml"
    assert "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "moekit.__version__"}


def test_setuptools_resolves_the_same_version():
    pyprojecttoml = pytest.importorskip("setuptools.config.pyprojecttoml")
    resolved = pyprojecttoml.read_configuration(PYPROJECT)["project"]["version"]
    assert resolved == moekit.__version__


def test_markers_are_registered_and_strict():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    options = tomllib.loads(PYPROJECT.read_text())["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in options["addopts"].split()
    assert {line.split(":")[0] for line in options["markers"]} == {"slow", "distributed"}
    # A bare `pytest` selects everything: no -m in the default options.
    assert "-m" not in options["addopts"].split()


def _starts_processes(node: ast.AST) -> bool:
    """Calls run_ranks, or names the `bench ep` command (which starts its own ranks)."""
    for child in ast.walk(node):
        if isinstance(child, ast.Name) and child.id == "run_ranks":
            return True
        if isinstance(child, ast.List):
            values = [item.value for item in child.elts if isinstance(item, ast.Constant)]
            if " ".join(map(str, values[:2])) == "bench ep":
                return True
    return False


def _marks(function: ast.FunctionDef) -> set[str]:
    return {
        decorator.attr
        for decorator in function.decorator_list
        if isinstance(decorator, ast.Attribute) and ast.unparse(decorator).startswith("pytest.mark.")
    }


def test_every_multi_process_test_is_marked_distributed():
    unmarked, marked = [], 0
    for path in sorted(TESTS.glob("test_*.py")):
        functions = {node.name: node for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}
        # A test starts processes when it, or a module-level helper it calls, does.
        spawning = {name for name, function in functions.items() if _starts_processes(function)}
        grew = True
        while grew:
            callers = {
                name
                for name, function in functions.items()
                if name not in spawning
                and any(isinstance(n, ast.Name) and n.id in spawning for n in ast.walk(function))
            }
            spawning |= callers
            grew = bool(callers)
        for name in sorted(spawning):
            if name.startswith("test_"):
                if "distributed" in _marks(functions[name]):
                    marked += 1
                else:
                    unmarked.append(f"{path.name}::{name}")
    assert unmarked == []
    assert marked >= 9  # test_parallel's multi-rank tests and the bench ep run
