"""The version has one source, ``moekit.__version__``, which the package build and
``moekit --version`` both read.

    pytest tests/test_version.py
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import moekit
from moekit.cli.main import main

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_cli_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
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
