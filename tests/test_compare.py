"""``moekit compare`` never reports wrong results as success.

Verified, on a tiny grid (experiment d, one seed: two runs of a 2-layer, 32-wide model):
Ctrl-C or SIGTERM inside a run stops the whole grid with exit status 130, writes no
results.md, and says which run stopped; that run is trained again by the next identical
command, never reused. Runs are reused only under their full specification: another
``--steps`` trains new runs in new directories, an identical rerun trains nothing, ``--quick``
and full grids never share a run directory, and a directory holding another spec is refused.
``--json`` leaves exactly one JSON document on stdout. Every planned run has no time limit.

Run: ``python -m pytest tests/test_compare.py``
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace

import pytest

import moekit.experiments.compare.run as compare_run
from moekit.cli.main import main
from moekit.experiments.compare.run import EXPERIMENTS, incomplete_reason, plan_runs


def grid_args(out, steps: int) -> list[str]:
    return ["compare", "--quick", "--experiments", "d", "--seeds", "1", "--steps", str(steps), "--out", str(out)]


@pytest.fixture
def trainings(monkeypatch):
    """Counts the trainer's calls; ``interrupt`` makes the next training stop at its first log
    row (by raising KeyboardInterrupt, or sending SIGTERM, from ``on_step``)."""
    real_train = compare_run.train
    calls: list[str] = []
    interrupt: dict[str, object] = {"with": None}

    def counting_train(model_config, train_config, out, **kwargs):
        calls.append(os.path.basename(out))
        how = interrupt["with"]
        interrupt["with"] = None

        def on_step(step, row):
            if how == "ctrl-c":
                raise KeyboardInterrupt
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)

        return real_train(model_config, train_config, out, on_step=on_step, **kwargs)

    monkeypatch.setattr(compare_run, "train", counting_train)
    return calls, interrupt


@pytest.mark.parametrize("how,signal_name", [("ctrl-c", "SIGINT"), ("sigterm", "SIGTERM")])
def test_interrupt_stops_the_grid_and_the_run_trains_again(tmp_path, capsys, trainings, how, signal_name):
    calls, interrupt = trainings
    out = tmp_path / "cmp"
    sigterm_before = signal.getsignal(signal.SIGTERM)
    interrupt["with"] = how
    assert main(grid_args(out, 4)) == 130
    err = capsys.readouterr().err
    assert len(calls) == 1  # the grid stopped: the second run never started
    stopped = calls[0]
    assert f"interrupted by {signal_name} during run moe-top2-s0" in err and stopped in err
    assert "Run the same command again to continue" in err
    assert not (out / "results.md").exists()
    assert json.loads((out / "runs" / stopped / "results.json").read_text())["interrupted"] is True
    assert signal.getsignal(signal.SIGTERM) is sigterm_before

    calls.clear()
    assert main([*grid_args(out, 4), "--json"]) == 0
    assert calls == [stopped, calls[1]]  # the interrupted run is trained again, not reused
    summary = json.loads(capsys.readouterr().out)
    assert summary["moe-top2"]["steps"] == 4 and summary["no-balance-loss"]["steps"] == 4
    result = json.loads((out / "runs" / stopped / "results.json").read_text())
    assert result["interrupted"] is False and result["steps"] == 4
    assert (out / "results.md").exists()


def test_reuse_needs_the_same_spec(tmp_path, capsys, trainings):
    calls, _ = trainings
    out = tmp_path / "cmp"
    assert main([*grid_args(out, 3), "--json"]) == 0
    captured = capsys.readouterr()
    first = json.loads(captured.out)  # stdout holds exactly one JSON document
    assert "wrote" in captured.err
    assert len(calls) == 2

    calls.clear()
    assert main([*grid_args(out, 4), "--json"]) == 0  # other --steps: other runs
    assert len(calls) == 2
    assert json.loads(capsys.readouterr().out)["moe-top2"]["steps"] == 4
    assert len(list((out / "runs").iterdir())) == 4  # the 3-step runs are kept, not overwritten

    calls.clear()
    assert main([*grid_args(out, 3), "--json"]) == 0  # identical to the first: everything reused
    assert calls == []
    again = json.loads(capsys.readouterr().out)
    assert again["moe-top2"]["val_losses"] == first["moe-top2"]["val_losses"]
    assert again["moe-top2"]["steps"] == 3


def test_a_directory_holding_another_spec_is_refused(tmp_path, capsys, trainings):
    calls, _ = trainings
    out = tmp_path / "cmp"
    spec = plan_runs(["d"], seeds=1, steps=3, quick=True)[0]
    data_sha256 = compare_run._data_sha256(None)
    run_dir = out / "runs" / spec.directory_name(data_sha256)
    run_dir.mkdir(parents=True)
    other = spec.to_dict(data_sha256)
    other["train"]["lr"] = 1.0
    (run_dir / "spec.json").write_text(json.dumps(other))
    assert main(grid_args(out, 3)) == 1
    err = capsys.readouterr().err
    assert "holds another run (train.lr differ)" in err and "nothing was overwritten" in err
    assert calls == []
    assert json.loads((run_dir / "spec.json").read_text()) == other


def test_quick_and_full_grids_share_no_run_directory():
    full = {spec.directory_name("data") for spec in plan_runs(list(EXPERIMENTS), 2, 30, quick=False)}
    quick = {spec.directory_name("data") for spec in plan_runs(list(EXPERIMENTS), 2, 30, quick=True)}
    assert len(full) == len(plan_runs(list(EXPERIMENTS), 2, 30, quick=False))
    assert not full & quick
    spec = plan_runs(["b"], 1, 30, quick=True)[0]
    assert spec.directory_name("data") != spec.directory_name("other data")
    assert spec.directory_name("data") != replace(spec, train=replace(spec.train, beta2=0.9)).directory_name("data")


def test_planned_runs_have_no_time_limit():
    # A time limit would end a run at a machine-dependent step: compare runs stop by steps.
    for quick in (False, True):
        assert all(spec.train.max_minutes is None for spec in plan_runs(list(EXPERIMENTS), 3, 50, quick, 60))
    moe = plan_runs(["a"], 1, 50, quick=True)[0]
    assert compare_run.equal_time_spec(moe, 30.0).train.max_minutes == 0.5  # the one timed run


def test_only_a_complete_run_counts_as_finished():
    spec = plan_runs(["b"], 1, 30, quick=True)[0]
    done = {"steps": 30, "interrupted": False}
    assert incomplete_reason(done, spec) is None
    assert incomplete_reason({**done, "stopped_by": "steps"}, spec) is None
    assert incomplete_reason({**done, "interrupted": True}, spec) == "interrupted at step 30"
    assert incomplete_reason({**done, "stopped_by": "interrupt"}, spec) == "interrupted at step 30"
    assert incomplete_reason({**done, "steps": 12, "stopped_by": "diverged"}, spec) == "stopped by diverged at step 12"
    assert incomplete_reason({**done, "stopped_by": "max_minutes"}, spec) == "stopped by max_minutes at step 30"
    assert incomplete_reason({**done, "steps": 29}, spec) == "stopped at step 29 of 30"
    timed = compare_run.equal_time_spec(spec, 6.0)
    assert incomplete_reason({"steps": 17, "interrupted": False, "stopped_by": "max_minutes"}, timed) is None
    assert incomplete_reason({"steps": 17, "interrupted": False, "stopped_by": "diverged"}, timed) is not None


def test_sd_ratio_test_uses_the_two_sided_f_point_of_the_seeds():
    from moekit.experiments.compare.recipe import sd_ratio_test

    # 5 seeds: F(4, 4) upper 2.5% point 9.60, so sd ratios beyond sqrt(9.60) = 3.098 differ.
    test = sd_ratio_test(3.2, 1.0, 5)
    assert test["ratio"] == 3.2 and test["significant"] and test["critical_ratio"] == pytest.approx(3.0984, abs=1e-4)
    assert sd_ratio_test(3.0, 1.0, 5)["significant"] is False
    assert sd_ratio_test(1.0, 3.2, 5)["significant"] is True  # smaller counts too (two-sided)
    assert sd_ratio_test(1.0, 1.0, 40)["significant"] is None  # no table entry: no verdict


def test_summarize_recipe_by_hand():
    from moekit.experiments.compare.recipe import RECIPE_SETTINGS, summarize_recipe

    losses = {"moe-top2": [1.0, 1.2, 1.4], "dense-top2": [1.0, 1.1, 1.2]}
    results = {name: [{"seed": s, "val_loss": v, "load_imbalance": None}
                      for s, v in enumerate(losses.get(name, [2.0, 2.0, 2.0]))] for name in RECIPE_SETTINGS}
    summary = summarize_recipe(results, None)
    recipe, dense = summary["settings"]["moe-top2"], summary["settings"]["dense-top2"]
    assert recipe["mean"] == pytest.approx(1.2) and recipe["sd"] == pytest.approx(0.2)
    assert dense["sd"] == pytest.approx(0.1) and recipe["vs_dense"]["ratio"] == pytest.approx(2.0)
    # 3 seeds: F(2, 2) = 39.0, ratio 2 (F = 4) is within chance.
    assert recipe["vs_dense"]["significant"] is False and recipe["load_imbalance"] is None
    assert summary["seeds"] == 3 and summary["settings"]["no-z-loss"]["sd"] == 0.0
    # Paired by seed: no-z-loss at 2.0 against the recipe's 1.0 / 1.2 / 1.4.
    no_z = summary["settings"]["no-z-loss"]
    assert no_z["diff_vs_recipe"] == pytest.approx([1.0, 0.8, 0.6])
    assert no_z["diff_vs_recipe_mean"] == pytest.approx(0.8)
    assert no_z["diff_vs_recipe_same_sign"] and not dense["diff_vs_recipe_same_sign"]  # dense: 0, -0.1, -0.2
