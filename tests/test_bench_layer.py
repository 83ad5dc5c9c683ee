"""``moekit bench layer`` reports what users get: the default allocator's figures first.

Verified at toy sizes (--quick, one round, no transformers): with ``--malloc both`` (the
default) every case's result holds the default-allocator figure as its ratio and the
malloc-reuse figure (measured in a second process) beside it; the report names the CPU and
which allocator each figure used; with --json stdout holds exactly one JSON document and the
table goes to stderr; ``--malloc reuse`` makes the reuse figure the headline.

Run: ``python -m pytest tests/test_bench_layer.py``
"""

from __future__ import annotations

import builtins
import json
import platform

import pytest

from moekit.cli.main import main
from moekit.experiments.bench.layer import cpu_model_name, malloc_reuse_available

needs_glibc = pytest.mark.skipif(not malloc_reuse_available(), reason="malloc reuse needs glibc's mallopt")


@needs_glibc
def test_quick_json_has_both_allocator_figures_per_case_and_the_cpu(capsys):
    args = ["bench", "layer", "--quick", "--json", "--no-hf", "--rounds", "1", "--cases", "1,5"]
    assert main(args) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout is the JSON document and nothing else
    assert report["cpu"] == cpu_model_name() and report["cpu"]
    assert report["malloc"] == "both" and report["headline_allocator"] == "default"
    assert set(report["allocators"]) == {"ratio", "malloc_reuse"}
    assert [case["id"] for case in report["cases"]] == ["1", "5"]
    for case in report["cases"]:
        (moekit,) = case["results"]
        reuse = moekit["malloc_reuse"]
        assert moekit["ratio"] > 0 and reuse["ratio"] > 0
        assert "passed" not in reuse  # the verdict judges the headline figure only
        if case["metric"] == "time":
            assert len(moekit["round_ratios"]) == 1 and len(reuse["round_ratios"]) == 1
        else:
            assert moekit["peak_bytes"] > 0 and reuse["peak_bytes"] > 0
    table = captured.err
    (title,) = [line for line in table.splitlines() if line.startswith("moekit bench layer on ")]
    assert report["cpu"] in title
    assert "default malloc" in table and "malloc reuse" in table


@needs_glibc
def test_malloc_reuse_alone_is_the_headline(capsys):
    args = ["bench", "layer", "--quick", "--json", "--no-hf", "--rounds", "1", "--cases", "5", "--malloc", "reuse"]
    assert main(args) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["headline_allocator"] == "reuse" and set(report["allocators"]) == {"ratio"}
    assert "keeping freed memory" in report["allocators"]["ratio"]
    (moekit,) = report["cases"][0]["results"]
    assert moekit["peak_bytes"] > 0 and "malloc_reuse" not in moekit
    assert "default malloc" not in captured.err


def test_cpu_model_name_falls_back_without_proc_cpuinfo(monkeypatch):
    def no_files(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(builtins, "open", no_files)
    assert cpu_model_name() == (platform.processor() or platform.machine() or "unknown CPU")
