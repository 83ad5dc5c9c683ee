"""Experiment (g) of ``moekit compare``: random facts, their evaluation, and the grid.

Verified: the facts generator is deterministic, its keys unique and its held-out keys disjoint
from the trained ones; a fact holds value_len · log2 26 bits; every pass of the training text
is a permutation of the facts, and passes differ. The value metrics are checked on stub models
whose answers are known exactly: an oracle scores CE 0 and exact match 1, a uniform byte model
ln 256, a model uniform over letters ln 26, one that knows the first half of every value
(ln 26)/2 and exact match 0 (so an off-by-one in the value positions fails). The models stand
at equal active compute (dense = the E=16 MoE's matched width, dense-wide = its total FFN
width); seeds are paired (one data file and one TrainConfig.seed per seed); the calibration
brackets the target exact match. End to end (slow): ``moekit compare --experiments g --quick``
stops with 130 on Ctrl-C, then writes results_g.md and g_facts.png, then reuses every run.

Run: ``python -m pytest tests/test_facts.py``
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import moekit.experiments.compare.run as compare_run
from moekit.cli.main import main
from moekit.experiments.facts import run as facts_run
from moekit.experiments.facts.data import (
    MIN_PASSES,
    UNIFORM_VALUE_CE,
    encode_prompts,
    fact_bits,
    facts_text,
    make_facts,
    value_metrics,
)
from moekit.experiments.facts.run import (
    DENSE,
    EQUAL_TIME,
    WIDE,
    FactsConfig,
    FactsGrid,
    FactsRun,
    _equal_time_tasks,
    _run_tasks,
    best_moe,
    calibrate,
    default_config,
    grid_tasks,
    models,
    next_startable,
    run_facts,
    summarize,
    train_config,
)
from moekit.experiments.facts.speed import equal_time_steps, seconds_per_step, throughput_ratios
from moekit.models.lm import MoETransformerLM


def test_generator_is_deterministic_and_keys_unique():
    facts = make_facts(300, key_len=3, value_len=5, heldout=50, seed=7)
    assert facts == make_facts(300, key_len=3, value_len=5, heldout=50, seed=7)
    assert facts.keys != make_facts(300, key_len=3, value_len=5, heldout=50, seed=8).keys
    assert len(set(facts.keys)) == 300 and len(facts.values) == 300
    assert all(len(k) == 3 and k.isalpha() and k.islower() for k in facts.keys)
    assert all(len(v) == 5 and v.isalpha() and v.islower() for v in facts.values + facts.heldout_values)
    assert len(set(facts.values)) > 290  # values are drawn independently: collisions are rare


def test_heldout_keys_are_disjoint_from_trained_keys():
    facts = make_facts(600, key_len=2, value_len=4, heldout=76, seed=0)  # all 26^2 = 676 keys used
    assert len(facts.heldout_keys) == 76 and len(set(facts.heldout_keys)) == 76
    assert not set(facts.heldout_keys) & set(facts.keys)
    with pytest.raises(ValueError, match="only 26\\^2 = 676 distinct keys"):
        make_facts(600, key_len=2, heldout=77)


def test_bits_per_fact_is_log2_of_the_value_space():
    assert fact_bits(6) == pytest.approx(math.log2(26**6)) == pytest.approx(28.2026, abs=1e-4)
    facts = make_facts(1000, value_len=6, heldout=0)
    assert facts.total_bits == pytest.approx(1000 * math.log2(26**6))


def test_every_pass_is_a_fresh_permutation_of_the_facts():
    facts = make_facts(50, key_len=3, value_len=4, heldout=5, seed=1)
    lines = facts.lines()
    text = facts_text(facts, passes=12, seed=1)
    assert text == facts_text(facts, passes=12, seed=1)
    all_lines = text.splitlines(keepends=True)
    passes = [all_lines[i : i + 50] for i in range(0, len(all_lines), 50)]
    assert len(passes) == 12
    assert all(sorted(p) == sorted(lines) for p in passes)
    assert len({tuple(p) for p in passes}) == 12  # each pass in its own order
    heldout_lines = {f"{k}:" for k in facts.heldout_keys}
    assert not any(line[:4] in heldout_lines for line in all_lines)
    with pytest.raises(ValueError, match=f"passes=9 is invalid: must be an integer >= {MIN_PASSES}"):
        facts_text(facts, passes=9, seed=1)


class Oracle:
    """Knows ``known`` leading bytes of every value (all of them by default); logits 0 elsewhere,
    except ``letters_only``, which puts -inf on every non-letter byte."""

    def __init__(self, facts: dict[str, str], known: int | None = None, letters_only: bool = False) -> None:
        self.facts, self.known, self.letters_only = facts, known, letters_only

    def __call__(self, idx_NS: torch.Tensor):
        logits_NSV = torch.zeros(*idx_NS.shape, 256)
        if self.letters_only:
            logits_NSV.fill_(float("-inf"))
            logits_NSV[..., ord("a") : ord("z") + 1] = 0.0
        for n, row in enumerate(idx_NS.tolist()):
            for p in range(len(row)):
                text = bytes(row[: p + 1]).decode()
                if ":" not in text:
                    continue
                key, partial = text[1:].split(":")
                value = self.facts.get(key)
                if value is None:
                    continue
                known = len(value) if self.known is None else self.known
                if len(partial) < known:
                    logits_NSV[n, p, ord(value[len(partial)])] = 60.0
        return logits_NSV, None


def test_value_metrics_of_an_oracle_are_perfect():
    facts = make_facts(40, key_len=3, value_len=5, heldout=10, seed=3)
    oracle = Oracle(dict(zip(facts.keys, facts.values, strict=True)))
    metrics = value_metrics(oracle, facts.keys, facts.values, batch_size=16)
    assert metrics.value_ce == pytest.approx(0.0, abs=1e-6)
    assert metrics.exact_match == 1.0 and metrics.byte_accuracy == 1.0 and metrics.count == 40
    # The oracle knows nothing of the held-out keys: it is a uniform byte model there.
    heldout = value_metrics(oracle, facts.heldout_keys, facts.heldout_values)
    assert heldout.value_ce == pytest.approx(math.log(256)) and heldout.exact_match == 0.0


def test_value_ce_is_over_all_256_bytes_and_only_over_value_bytes():
    facts = make_facts(30, key_len=3, value_len=6, heldout=0, seed=4)
    assert "aaaaaa" not in facts.values
    letters = Oracle({}, letters_only=True)
    metrics = value_metrics(letters, facts.keys, facts.values)
    assert metrics.value_ce == pytest.approx(UNIFORM_VALUE_CE) == pytest.approx(math.log(26))
    assert metrics.exact_match == 0.0  # greedy picks "a" every time
    half = Oracle(dict(zip(facts.keys, facts.values, strict=True)), known=3, letters_only=True)
    metrics = value_metrics(half, facts.keys, facts.values)
    assert metrics.value_ce == pytest.approx(math.log(26) / 2, abs=1e-6)
    assert metrics.byte_accuracy == pytest.approx(0.5, abs=0.05) and metrics.exact_match == 0.0


def test_prompts_start_at_a_line_start():
    prompts = encode_prompts(["abc"], ["xyz"])
    assert bytes(prompts[0].tolist()) == b"\nabc:xyz"
    assert bytes(encode_prompts(["abc"])[0].tolist()) == b"\nabc:"


def test_models_are_at_equal_active_compute_and_wide_has_the_moe_total_width():
    config = FactsConfig()
    grid = models(config)
    assert list(grid) == [DENSE, "moe-e4", "moe-e8", "moe-e16", "moe-e32", WIDE]
    moes = [grid[f"moe-e{e}"] for e in config.experts]
    assert all(m.arch == "moe" and m.moe.top_k == 2 and m.moe.d_ff == 64 for m in moes)
    # Dense: k·d_ff + E/3 (router share) of the E=16 MoE = 128 + 5.3 -> 133, as experiment (a).
    assert grid[DENSE].arch == "dense" and grid[DENSE].ffn_width(0) == 133
    assert grid[WIDE].arch == "dense" and grid[WIDE].ffn_width(0) == 16 * 64
    sizes = {name: sum(p.numel() for n, p in MoETransformerLM(m).named_parameters() if "ffn" in n and "norm" not in n)
             for name, m in (("moe", grid["moe-e16"]), ("wide", grid[WIDE]))}
    router = 16 * config.d_model
    assert sizes["wide"] == sizes["moe"] - router  # the wide FFN holds exactly the experts' parameters


def test_seeds_are_paired_one_data_file_and_one_train_seed(tmp_path):
    config = default_config(quick=True)
    grid = FactsGrid(tmp_path, config)
    facts0, path0, _ = grid.corpus(40, 0)
    facts1, path1, _ = grid.corpus(40, 1)
    assert facts0.keys != facts1.keys and path0 != path1
    train0 = {name: train_config(config, path0, 0) for name in models(config)}
    assert len({(t.data, t.seed, t.steps) for t in train0.values()}) == 1
    assert train_config(config, path1, 1).seed != train_config(config, path0, 0).seed
    assert all(t.max_minutes is None and t.device == "cpu" for t in train0.values())
    # The written text is exactly the facts' passes, and the file is kept on a second call.
    assert path0.read_text() == facts_text(facts0, config.passes, 0)
    assert FactsGrid(tmp_path, config).corpus(40, 0)[1] == path0


class FakeGrid:
    """Dense exact match falls with the number of facts: 1 at 500, 0.5 at 1000, ..."""

    def __init__(self, config: FactsConfig) -> None:
        self.config, self.counts, self._evaluated = config, [], {}

    def run(self, name, model, num_facts, seed, steps=None):
        if (name, num_facts, seed) in self._evaluated:
            return self._evaluated[name, num_facts, seed]
        assert name == DENSE and seed == 0
        self.counts.append(num_facts)
        em = min(1.0, 500 / num_facts)
        return FactsRun(name, seed, num_facts, {"exact_match": em, "value_ce": 1 - em}, {})


@pytest.mark.parametrize(
    "start,counts,chosen",
    [(2000, [2000, 1000], 1000), (250, [250, 500, 1000], 1000), (300, [300, 600, 1200], 1200), (64000, [64000, 32000,
     16000, 8000], 8000)],
)
def test_calibration_brackets_the_target_and_picks_the_closest(start, counts, chosen):
    config = replace(FactsConfig(), calibration_start=start, calibration_runs=4)
    grid = FakeGrid(config)
    picked, table = calibrate(grid, models(config))
    assert grid.counts == counts  # stops once two counts bracket 50%, or after 4 runs
    assert picked == chosen
    assert [row["facts"] for row in table] == sorted(counts)
    assert [row["facts"] for row in table if row["chosen"]] == [chosen]


@pytest.mark.parametrize(
    "start,waves,chosen",
    [
        # Both of the first wave store more than half: the next wave goes on up from the largest;
        # 1,000 hits 50% exactly.
        (250, [[250, 500], [1000, 2000]], 1000),
        # Both store less: down from the smallest.
        (2000, [[2000, 4000], [1000, 500]], 1000),
        # 600 stores more, 1,200 less: bracketed after the second wave.
        (300, [[300, 600], [1200, 2400]], 1200),
        # The first wave brackets: done.
        (600, [[600, 1200]], 1200),
    ],
)
def test_calibration_with_two_jobs_runs_the_next_count_beside_the_current_one(monkeypatch, start, waves, chosen):
    config = replace(FactsConfig(), calibration_start=start, calibration_runs=4)
    grid = FakeGrid(config)
    seen: list[list[int]] = []

    def in_waves(grid, tasks, jobs, received, follow_up=None):  # run_parallel's contract, in this process
        assert jobs == len(tasks) <= 2
        seen.append([task[2] for task in tasks])
        return [grid.run(*task) for task in tasks]

    monkeypatch.setattr(facts_run, "_run_tasks", in_waves)
    picked, table = calibrate(grid, models(config), jobs=2)
    assert seen == waves and picked == chosen
    # The grid reuses the calibration's runs: its seed-0 dense run at the chosen count is one of them.
    assert (DENSE, chosen, 0) in grid._evaluated and len(grid._evaluated) == len(table)


def test_grid_runs_longest_first_then_the_moes_then_dense():
    config = FactsConfig()
    tasks = grid_tasks(models(config), 1000, seeds=2)
    names = [task[0] for task in tasks]
    assert names == [WIDE] * 2 + [f"moe-e{e}" for e in config.experts for _ in range(2)] + [DENSE] * 2
    assert [task[3] for task in tasks[:2]] == [0, 1] and all(task[2] == 1000 for task in tasks)


def test_one_dense_wide_run_at_a_time():
    wide = lambda task: task[0] == WIDE  # noqa: E731
    w0, w1, m0, d0 = (WIDE, 0), (WIDE, 1), ("moe-e4", 0), (DENSE, 0)
    assert next_startable([w0, w1, m0], [], wide) == 0  # nothing runs: the first
    assert next_startable([w1, m0, d0], [w0], wide) == 1  # a wide runs: the next that is not one
    assert next_startable([w1], [w0], wide) is None  # only wides wait: wait
    assert next_startable([w1, m0], [m0], wide) == 0
    assert next_startable([w1, m0], [w0], None) == 0  # no rule: in order


def test_follow_up_tasks_run_after_the_results_they_wait_for():
    config = replace(FactsConfig(), calibration_start=500)
    grid = FakeGrid(config)
    grid._evaluated[DENSE, 500, 0] = FactsRun(DENSE, 0, 500, {"exact_match": 1.0, "value_ce": 0.0}, {})
    asked: list[list[int]] = []

    def follow_up(results):
        asked.append(sorted(results))
        return [(DENSE, None, 4000, 0)] if len(results) == 2 else []

    runs = _run_tasks(grid, [(DENSE, None, 500, 0), (DENSE, None, 1000, 0)], 1, [""], follow_up)
    # Asked after each result (the reused one counts as done) until it adds a task, which runs
    # last; then never again.
    assert [r.num_facts for r in runs] == [500, 1000, 4000] and grid.counts == [1000, 4000]
    assert asked == [[0], [0, 1]]


def test_equal_time_runs_wait_for_every_moe_and_follow_the_best_ones_speed():
    config = FactsConfig()
    grid_models = models(config)
    speed = {"ratios": {f"moe-e{e}": {"ratio": r} for e, r in zip(config.experts, (0.9, 0.8, 0.75, 0.6), strict=True)}}
    follow_up = _equal_time_tasks(config, grid_models, 1000, 3, speed)
    runs = {i: r for i, r in enumerate(synthetic_runs(GOOD)) if r.name != "moe-e32"}
    assert follow_up(runs) == []  # E=32 has no run yet
    runs = dict(enumerate(synthetic_runs(GOOD)))
    tasks = follow_up(runs)
    # The best MoE is E=16 (GOOD): 6,000 / 0.75 = 8,000 steps of dense, for every seed.
    assert [(t[0], t[2], t[3], t[4]) for t in tasks] == [(EQUAL_TIME, 1000, s, 8000) for s in range(3)]
    assert all(t[1] == grid_models[DENSE] for t in tasks)
    assert best_moe(config, list(runs.values())) == "moe-e16"


def synthetic_runs(value_ce: dict[str, float], heldout_ce: float = 3.26, heldout_accuracy: float = 1 / 26):
    """Three seeds per model; seed s shifts every model's value CE by 0.01·s (paired noise)."""
    runs = []
    for seed in range(3):
        for name, ce in value_ce.items():
            metrics = {"value_ce": ce + 0.01 * seed, "exact_match": 1 - ce / 4, "byte_accuracy": 1 - ce / 5}
            heldout = {"value_ce": heldout_ce, "exact_match": 0.0, "byte_accuracy": heldout_accuracy}
            train = {"total_params": 1, "active_params": 1, "train_seconds": 60.0}
            runs.append(FactsRun(name, seed, 1000, metrics, heldout, train))
    return runs


GOOD = {DENSE: 2.0, "moe-e4": 1.8, "moe-e8": 1.6, "moe-e16": 1.5, "moe-e32": 1.55, WIDE: 1.2}


def test_summary_pairs_seeds_and_evaluates_the_acceptance_checks():
    config = FactsConfig()
    summary = summarize(config, synthetic_runs(GOOD), 1000, [], models(config))
    assert summary["facts"]["chosen_by"] == "--facts" and summary["seeds"] == 3
    assert summary["facts"]["total_bits"] == pytest.approx(1000 * 6 * math.log2(26))
    dense = summary["models"][DENSE]
    assert dense["value_ce"] == pytest.approx([2.0, 2.01, 2.02]) and dense["value_ce_mean"] == pytest.approx(2.01)
    assert dense["value_ce_sd"] == pytest.approx(0.01)
    assert summary["paired"]["moe-e16"]["value_ce_diff"] == pytest.approx([-0.5, -0.5, -0.5])
    assert summary["paired"]["moe-e16"]["gap_recovered"] == pytest.approx(0.5 / 0.8)
    checks = summary["checks"]
    assert checks["best_moe"] == "moe-e16" and checks["best_moe_margin_per_seed"] == pytest.approx([0.5] * 3)
    assert checks["best_moe_beats_dense_by_0.3_every_seed"] and checks["value_ce_falls_with_experts_up_to_16"]
    assert checks["recovers_60_percent_of_gap"]
    assert checks["heldout_within_0.05_of_uniform"] and checks["heldout_ce_not_below_uniform"]
    assert checks["heldout_byte_accuracy_at_chance"]


def test_acceptance_checks_fail_where_the_results_do():
    config = FactsConfig()
    worse = {**GOOD, "moe-e8": 1.85, "moe-e16": 1.75, "moe-e32": 1.9}  # E=8 above E=4; best margin 0.25
    checks = summarize(config, synthetic_runs(worse, heldout_ce=7.0), 1000, [], models(config))["checks"]
    assert not checks["best_moe_beats_dense_by_0.3_every_seed"]
    assert not checks["value_ce_falls_with_experts_up_to_16"] and not checks["recovers_60_percent_of_gap"]
    # Overconfident on unseen keys: far from ln 26, but above it: no sign of leakage.
    assert not checks["heldout_within_0.05_of_uniform"] and checks["heldout_ce_not_below_uniform"]
    leaky = summarize(config, synthetic_runs(GOOD, heldout_ce=3.0, heldout_accuracy=0.06), 1000, [],
                      models(config))["checks"]
    assert not leaky["heldout_ce_not_below_uniform"] and not leaky["heldout_byte_accuracy_at_chance"]


def test_non_expert_weights_are_equal_between_moe_and_dense_at_one_seed():
    # Paired seeds: the same torch.manual_seed gives every model of the grid the same embeddings
    # and attention weights, whatever its FFN (models/lm.py draws them from their own stream).
    grid = models(default_config(quick=True))
    built = {}
    for name in (DENSE, "moe-e4", "moe-e8", WIDE):
        torch.manual_seed(0)
        built[name] = MoETransformerLM(grid[name])
    for name, model in built.items():
        for part in ("embed.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight"):
            assert torch.equal(model.state_dict()[part], built[DENSE].state_dict()[part]), (name, part)
    # The FFNs still differ from seed to seed, and so do the non-expert weights.
    torch.manual_seed(1)
    other = MoETransformerLM(grid[DENSE])
    assert not torch.equal(other.embed.weight, built[DENSE].embed.weight)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--experiments", "g,z"], "--experiments z is invalid: choose from a,b,c,d,e,f,g,h,i"),
        (["--experiments", "g", "--steps", "5"], "use --steps-g"),
        (["--experiments", "a", "--facts", "10"], "add g to --experiments"),
    ],
)
def test_compare_g_flags_are_checked(tmp_path, capsys, args, message):
    assert main(["compare", "--quick", "--out", str(tmp_path / "cmp"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


@pytest.mark.slow
def test_compare_g_quick_end_to_end(tmp_path, capsys, monkeypatch):
    real_train = compare_run.train
    calls: list[str] = []
    interrupt = {"next": True}

    def counting_train(model_config, train_config, out, **kwargs):
        calls.append(os.path.basename(out))
        stop, interrupt["next"] = interrupt["next"], False

        def on_step(step, row):
            if stop:
                raise KeyboardInterrupt

        return real_train(model_config, train_config, out, on_step=on_step, **kwargs)

    monkeypatch.setattr(compare_run, "train", counting_train)
    out = tmp_path / "cmp"
    # --jobs 1: every run trains in this process, where the counting patch is (the parallel
    # path has its own test).
    args = ["compare", "--experiments", "g", "--quick", "--seeds", "1", "--out", str(out), "--json", "--jobs", "1"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGINT during run dense-s0" in err and "no results_g.md was written" in err
    assert not (out / "results_g.md").exists()

    calls.clear()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)["g"]
    # Calibration (2 dense runs, the interrupted one again first), then the MoEs and dense-wide;
    # the seed-0 dense run of the chosen count is the calibration's; then dense at equal wall time.
    assert len(calls) == 2 + 3 + 1 and "dense-time" in calls[-1]
    assert set(summary["models"]) == {DENSE, "moe-e4", "moe-e8", WIDE}
    assert summary["facts"]["chosen_by"] == "calibration" and len(summary["calibration"]) == 2
    for row in summary["models"].values():
        assert 0 <= row["exact_match_mean"] <= 1 and 0 < row["value_ce_mean"] < 10
        assert len(row["value_ce"]) == 1 and len(row["heldout_ce"]) == 1
    assert set(summary["paired"]) == {"moe-e4", "moe-e8"}
    speed, equal = summary["speed"], summary["equal_time"]
    assert set(speed["ratios"]) == {DENSE, "moe-e4", "moe-e8"} and speed["ratios"][DENSE]["ratio"] == 1.0
    assert equal["moe"] == summary["checks"]["best_moe"] and equal["dense_steps"] % 20 == 0
    assert len(equal["value_ce"]) == 1 and equal["moe_margin"][0] == pytest.approx(
        equal["value_ce"][0] - summary["models"][equal["moe"]]["value_ce"][0])
    text = (out / "results_g.md").read_text()
    for part in ("## Calibration", "## Results", "Paired differences", "acceptance checks", "g_facts.png",
                 "## Training speed", "## At equal wall time"):
        assert part in text
    assert (out / "g_facts.png").stat().st_size > 0

    calls.clear()
    assert main([*args, "--facts", str(summary["facts"]["num_facts"])]) == 0
    again = json.loads(capsys.readouterr().out)["g"]
    # Every run reused: same facts, same specs; only the equal-time dense run's steps follow the
    # speed measured again (2 steps a round here, so noisy).
    assert all("dense-time" in c for c in calls)
    assert again["models"][DENSE]["value_ce"] == summary["models"][DENSE]["value_ce"]
    assert again["facts"]["chosen_by"] == "--facts" and again["calibration"] == []
    assert Path(out / "results_g.md").exists()


@pytest.mark.slow
def test_parallel_jobs_train_the_same_runs_as_one_process(tmp_path, monkeypatch):
    # --jobs 2 trains the grid in two worker processes; a second, serial call on the same --out
    # finds every run complete under its specification and trains nothing.
    out = tmp_path / "g"
    parallel = run_facts(out, seeds=1, quick=True, num_facts=20, jobs=2)
    trained: list[str] = []
    real_train = compare_run.train
    monkeypatch.setattr(compare_run, "train", lambda *a, **k: trained.append(str(a[2])) or real_train(*a, **k))
    serial = run_facts(out, seeds=1, quick=True, num_facts=20, jobs=1)
    # Only the equal-time dense run may train again: its steps follow the speed measured again.
    assert all("dense-time" in path for path in trained)
    assert parallel["models"].keys() == serial["models"].keys()
    for name, row in parallel["models"].items():
        assert row["value_ce"] == serial["models"][name]["value_ce"], name
        assert row["heldout_ce"] == serial["models"][name]["heldout_ce"], name


def test_noisy_text_keeps_every_fact_once_per_pass_and_never_reuses_a_known_key():
    from moekit.experiments.facts.probe import noisy_facts_text

    facts = make_facts(30, 3, 4, 10, seed=5)
    text = noisy_facts_text(facts, passes=10, seed=5, noise=0.5)
    lines = text.splitlines(keepends=True)
    assert len(lines) == 10 * (30 + 15)
    trained = set(facts.lines())
    known = set(facts.keys) | set(facts.heldout_keys)
    for line in trained:
        assert lines.count(line) == 10
    fresh = [line for line in lines if line not in trained]
    assert len(fresh) == 10 * 15 and not {line.split(":")[0] for line in fresh} & known


def test_probe_prints_a_learning_curve(capsys):
    from moekit.experiments.facts.probe import main as probe

    curve = probe(["--model", "moe-e4", "--facts", "20", "--steps", "4", "--every", "2", "--scale", "2"])
    assert [row[0] for row in curve] == [2, 4]
    assert all(math.isfinite(value) for row in curve for value in row[1:])
    assert capsys.readouterr().out.count("moe-e4 step") == 2


@pytest.mark.slow
def test_probe_trains_the_grids_run(tmp_path):
    # With the defaults the probe's run is the grid's run of the same model, facts and seed:
    # the same text, seed, batches and trainer, so the same final value CE to the last bit.
    from moekit.experiments.facts.probe import main as probe

    curve = probe(["--model", "moe-e4", "--facts", "20", "--steps", "6", "--every", "3", "--seed", "1"])
    config = replace(FactsConfig(), steps=6)
    run = FactsGrid(tmp_path, config).run("moe-e4", models(config)["moe-e4"], 20, 1)
    assert curve[-1][0] == 6 and curve[-1][1] == run.metrics["value_ce"]
    assert curve[-1][3] == run.heldout["value_ce"]


def test_equal_time_steps_divide_by_the_speed_ratio_and_round():
    # 4,000 steps of a model at 0.8x dense speed take as long as 5,000 dense steps.
    assert equal_time_steps(4000, 0.8) == 5000
    assert equal_time_steps(4000, 0.87) == 4600  # 4,597.7 → 4,600
    assert equal_time_steps(4000, 1.25, multiple=250) == 3250  # 3,200 → 3,250 (13 × 250)
    assert equal_time_steps(10, 0.5) == 100  # never below one multiple
    with pytest.raises(ValueError, match="ratio"):
        equal_time_steps(4000, 0.0)


def test_throughput_ratios_are_per_round_medians():
    # Round by round dense/moe: 1/2, 2/2, 1/1.25 = 0.5, 1.0, 0.8 → median 0.8.
    ratios = throughput_ratios({"dense": [1.0, 2.0, 1.0], "moe": [2.0, 2.0, 1.25]}, "dense")
    assert ratios["moe"] == {"ratio": 0.8, "min": 0.5, "max": 1.0, "seconds_per_step": 2.0}
    assert ratios["dense"]["ratio"] == 1.0


def test_seconds_per_step_runs_the_trainer_step_of_every_model(tmp_path):
    config = default_config(quick=True)
    facts = make_facts(20, config.key_len, config.value_len, config.heldout, 0)
    path = tmp_path / "facts.txt"
    path.write_text(facts_text(facts, config.passes, 0))
    grid = {name: model for name, model in models(config).items() if name != WIDE}
    times = seconds_per_step(grid, train_config(config, path, 0), rounds=2, steps_per_round=2, warmup_steps=1)
    assert set(times) == set(grid) and all(len(v) == 2 and all(t > 0 for t in v) for v in times.values())
