"""The ``moekit`` command and the benchmark's peak-memory meter.

Verified: ``--help`` works on the command and on ``bench layer`` (with example commands);
``bench layer --quick --json --no-hf`` runs every case at toy sizes and its last line is one
JSON object with the documented keys; the peak-memory meter gives hand-computed peaks,
leaving out parameter gradients and what existed before the call.

Run: ``python -m pytest tests/test_cli.py``
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moekit.cli.main import main
from moekit.experiments.bench.layer import peak_activation_bytes

MIB = 2**20


def run_moekit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moekit", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_help_lists_commands_and_examples():
    result = run_moekit("--help")
    assert result.returncode == 0, result.stderr
    assert "bench" in result.stdout
    assert "examples:" in result.stdout


def test_bench_layer_help_lists_options_cases_and_examples():
    result = run_moekit("bench", "layer", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--quick", "--rounds", "--cases", "--json", "--no-hf"):
        assert option in result.stdout
    assert "examples:" in result.stdout
    assert "moekit bench layer --quick" in result.stdout


def test_bench_layer_quick_json_last_line_is_the_report(capsys):
    # In-process (the subprocess tests above cover the entry point); --malloc default keeps
    # the allocator setting out of the test process.
    args = ["bench", "layer", "--quick", "--json", "--no-hf", "--rounds", "1", "--malloc", "default"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["bench"] == "layer"
    assert report["quick"] is True
    assert report["rounds"] == 1
    assert isinstance(report["passed"], bool)
    assert [case["id"] for case in report["cases"]] == ["1", "2", "3", "4", "5"]
    for case in report["cases"]:
        assert {"title", "metric", "num_tokens", "dense_rows", "config", "target", "results"} <= set(case)
        (moekit,) = case["results"]  # --no-hf: only moekit
        assert moekit["impl"] == "moekit"
        assert moekit["ratio"] > 0
        assert moekit["target"] == case["target"]
        assert isinstance(moekit["passed"], bool)
        if case["metric"] == "time":
            assert len(moekit["round_ratios"]) == 1
        else:
            assert moekit["peak_bytes"] > 0 and moekit["dense_peak_bytes"] > 0


def test_unknown_case_is_an_error_that_names_the_choices(capsys):
    assert main(["bench", "layer", "--cases", "9"]) == 2
    assert "choose from ['1', '2', '3', '4', '5']" in capsys.readouterr().err


def test_bare_bench_prints_its_help(capsys):
    assert main(["bench"]) == 2
    assert "layer" in capsys.readouterr().out


def test_peak_meter_counts_what_is_live_at_once():
    def allocate():
        a = torch.empty(MIB // 4)  # 1 MiB
        b = torch.empty(2 * MIB // 4)  # 2 MiB: 3 MiB live, the peak
        del a
        c = torch.empty(MIB // 8)  # 0.5 MiB: 2.5 MiB live
        return b, c

    assert peak_activation_bytes(allocate) == 3 * MIB


def test_peak_meter_leaves_out_parameter_gradients_and_prior_memory():
    x = torch.randn(1024, 256, requires_grad=True)  # exists before: not counted
    w = torch.randn(256, 512, requires_grad=True)
    grad_y = torch.randn(1024, 512)

    def step():
        y = x @ w  # 2 MiB, live until the end
        y.backward(grad_y)  # x.grad 1 MiB counts; w.grad 0.5 MiB is a parameter gradient

    assert peak_activation_bytes(step, [w]) == 3 * MIB
    x.grad = w.grad = None
    assert peak_activation_bytes(step) == pytest.approx(3.5 * MIB)
