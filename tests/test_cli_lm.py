"""``moekit train``, ``moekit sample`` and ``moekit compare`` from the command line, on tiny
models: the JSON figures, the run directory, resume conflicts and error messages.

    pytest tests/test_cli_lm.py
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from moekit.cli.main import main

TINY = ["--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "32", "--d-ff", "32",
        "--experts", "4", "--batch-size", "4", "--eval-interval", "5", "--no-progress"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("Now is the winter of our discontent made glorious summer.\n" * 60)
    return path


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_json_then_sample_then_resume(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(corpus), "--steps", "10", "--out", str(run), "--json"]) == 0
    result = last_json(capsys)
    for key in ("val_loss", "train_loss", "tokens_per_s", "total_params", "active_params", "steps"):
        assert key in result
    assert result["steps"] == 10 and result["total_params"] > result["active_params"]
    assert main(["sample", str(run), "--prompt", "Now", "--tokens", "20", "--seed", "1", "--json"]) == 0
    sample = last_json(capsys)["samples"][0]
    assert sample.startswith("Now") and len(sample.encode()) >= 20
    # Same text with and without the KV cache.
    assert main(["sample", str(run), "--prompt", "Now", "--tokens", "20", "--seed", "1", "--no-cache", "--json"]) == 0
    assert last_json(capsys)["samples"][0] == sample
    assert main(["train", "--resume", str(run), "--steps", "14", "--no-progress", "--json"]) == 0
    assert last_json(capsys)["steps"] == 14


def test_resume_refuses_changed_model_flags(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(corpus), "--steps", "2", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--experts", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "--experts 4 (not 8)" in err


def test_train_rejects_bad_data_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert main(["train", *TINY, "--data", str(missing), "--steps", "2", "--out", str(tmp_path / "r")]) == 2
    assert str(missing) in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", *TINY, "--data", str(empty), "--steps", "2", "--out", str(tmp_path / "r2")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_train_rejects_invalid_model_flags(tmp_path, corpus, capsys):
    assert main(["train", *TINY, "--data", str(corpus), "--top-k", "9", "--out", str(tmp_path / "r")]) == 2
    assert "top_k=9" in capsys.readouterr().err


def test_sample_from_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "none")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_dense_arch_trains(tmp_path, corpus, capsys):
    run = tmp_path / "dense"
    assert (
        main(["train", *TINY, "--arch", "dense", "--data", str(corpus), "--steps", "3", "--out", str(run), "--json"])
        == 0
    )
    result = last_json(capsys)
    assert result["total_params"] == result["active_params"]


@pytest.mark.slow
def test_compare_quick_writes_results_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--quick", "--seeds", "1", "--steps", "6", "--steps-a", "4", "--out", str(out), "--json"]
    assert main(args) == 0
    summary = last_json(capsys)
    assert {"moe", "dense", "dense-equal-time", "moe-top2", "switch-top1", "capacity-1.0", "no-balance-loss",
            "expert-choice", "aux-free", "dense-ffn-2x", "dense-ffn-4x"} <= set(summary)
    assert summary["moe"]["steps"] == 4 and summary["moe-top2"]["steps"] == 6
    assert summary["dense-ffn-4x"]["steps"] == 4
    # (f)'s dense models are 2x and 4x the matched FFN width: their active parameters grow.
    assert summary["dense"]["active_params"] < summary["dense-ffn-2x"]["active_params"] < summary["dense-ffn-4x"][
        "active_params"
    ]
    throughput = summary["throughput"]
    assert throughput["ratio_to_baseline"]["dense"] == 1.0 and throughput["ratio_to_baseline"]["moe"] > 0
    # (b)-(e) report one seed (--seeds 1) although (i) trained two of their shared settings.
    assert summary["moe-top2"]["seeds"] == 1 and summary["no-balance-loss"]["seeds"] == 1
    recipe = summary["recipe"]
    assert recipe["seeds"] == 2 and set(recipe["settings"]) == {
        "moe-top2", "router-init-1x", "no-z-loss", "no-balance-loss", "dense-top2"}
    draws = recipe["eval_draws"]
    assert draws["draws"] == 5 and len(draws["runs"]) == 2
    for run in draws["runs"]:  # the fixed set reproduces the trainer's own final validation loss
        assert run["fixed"] == pytest.approx(recipe["settings"]["moe-top2"]["val_losses"][run["seed"]])
    text = (out / "results.md").read_text()
    for heading in ("(a)", "(b)", "(c)", "(d)", "(e)", "(f)", "(i)"):
        assert heading in text
    for png in ("a_moe_vs_dense.png", "c_capacity.png", "d_balance.png", "e_routers.png", "f_ffn_width.png",
                "i_recipe.png"):
        assert (out / png).exists()


def test_compare_plan_i_trains_five_seeds_of_each_recipe_setting():
    import math

    from moekit.experiments.compare.run import plan_runs

    runs = plan_runs(["d", "i"], seeds=3, steps=10, quick=False)
    seeds = {}
    for run in runs:
        seeds.setdefault(run.name, set()).add(run.seed)
    assert seeds == {name: set(range(5)) for name in
                     ("moe-top2", "router-init-1x", "no-z-loss", "no-balance-loss", "dense-top2")}
    by_name = {run.name: run for run in runs if run.seed == 0}
    recipe = by_name["moe-top2"].model
    assert recipe.router_init_std == 0.02 and recipe.moe.z_loss_coef == 1e-3 and recipe.moe.balance_loss_coef == 0.02
    # Each setting changes one field of the recipe.
    assert by_name["router-init-1x"].model == replace(recipe, router_init_std=1 / math.sqrt(128))
    assert by_name["no-z-loss"].model.moe == replace(recipe.moe, z_loss_coef=0.0)
    assert by_name["no-balance-loss"].model.moe == replace(recipe.moe, balance_loss_coef=0.0)
    assert by_name["dense-top2"].model == recipe.as_dense()
    # Without (i), (d) keeps its two seeds.
    assert {run.seed for run in plan_runs(["d"], seeds=3, steps=10, quick=False)} == {0, 1}


def test_compare_plan_f_is_the_dense_baseline_at_wider_ffns():
    from moekit.experiments.compare.run import plan_runs

    runs = plan_runs(["f"], seeds=3, steps=10, quick=False, headline_steps=600)
    assert {(run.name, run.seed) for run in runs} == {
        (name, seed) for name in ("moe", "dense", "dense-ffn-2x", "dense-ffn-4x") for seed in range(3)
    }
    widths = {run.name: run.model.ffn_width(0) for run in runs if run.model.arch == "dense"}
    # Matched width k·d_ff + E/3 (SwiGLU router share) = 2·256 + 16/3 -> 517; d_ff doubled -> 1029, 2053.
    assert widths == {"dense": 517, "dense-ffn-2x": 1029, "dense-ffn-4x": 2053}
    assert all(run.train.steps == 600 and run.train.seed == 1000 + run.seed for run in runs)
