"""``moekit inspect``: every routing metric on routings built by hand where the answer is known
(a router that sends each byte to a fixed expert, a uniform random router, tiny sequences
counted by hand), the recording of a real MoE layer (the layer is left unchanged; capacity
replayed as training applies it), and the command end to end on a tiny trained run,
errors included.

    pytest tests/test_inspect.py
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moekit.cli.main import main
from moekit.config import MoEConfig
from moekit.experiments.inspect import metrics
from moekit.experiments.inspect.record import (
    Probe,
    assignments_to_table,
    capture_routing,
    record_routing,
    token_pieces,
)
from moekit.experiments.inspect.run import analyse, run_inspect
from moekit.layer import MoE
from moekit.models.lm import LMConfig, MoETransformerLM
from moekit.training.checkpoint import save_checkpoint, write_json_atomic
from moekit.training.config import TrainConfig
from moekit.training.data import ByteTokenizer
from moekit.training.trainer import train


def probe_arrays(lengths: list[int], domains: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sequence_T, position_T, domain_T for windows of the given lengths and domains."""
    sequence_T = np.repeat(np.arange(len(lengths)), lengths)
    position_T = np.concatenate([np.arange(n) for n in lengths])
    domain_T = np.repeat(np.array(domains), lengths)
    return sequence_T, position_T, domain_T


def uniform_random_topk(num_tokens: int, num_experts: int, top_k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :top_k]


# --------------------------------------------------------------------------------------------
# Metrics on hand-built routings
# --------------------------------------------------------------------------------------------


def test_fixed_byte_router_is_deterministic_and_gives_its_share_table():
    num_experts = 4
    rng = np.random.default_rng(0)
    sequence_T, position_T, domain_T = probe_arrays([64] * 20, [0] * 10 + [1] * 10)
    # Domain 0 writes bytes 0..3 (every expert), domain 1 bytes 4 and 5 (experts 0 and 1 first).
    token_T = np.where(domain_T == 0, rng.integers(0, 4, domain_T.size), rng.integers(4, 6, domain_T.size))
    expert_TK = np.stack([token_T % num_experts, (token_T + 1) % num_experts], axis=1)

    det = metrics.token_determinism(
        token_T, expert_TK[:, 0], sequence_T, position_T, num_experts, 256, metrics.position_buckets(64)
    )
    assert det["accuracy"] == 1.0
    assert det["coverage"] == 1.0
    assert all(v == 1.0 for v in det["by_position"])

    shares_GE, counts_G = metrics.assignment_shares(expert_TK, domain_T, 2, num_experts, "first")
    for d in range(2):
        expected = np.bincount(token_T[domain_T == d] % num_experts, minlength=num_experts) / (domain_T == d).sum()
        np.testing.assert_allclose(shares_GE[d], expected)
    assert counts_G.tolist() == [640, 640]
    second_GE, _ = metrics.assignment_shares(expert_TK, domain_T, 2, num_experts, "second")
    either_GE, either_counts_G = metrics.assignment_shares(expert_TK, domain_T, 2, num_experts, "either")
    np.testing.assert_allclose(either_GE, (shares_GE + second_GE) / 2)  # a share of assignments
    assert either_counts_G.tolist() == [1280, 1280]

    # Domains use different experts: far more divergent than with shuffled labels.
    div = metrics.domain_divergence(expert_TK, domain_T, sequence_T, 2, num_experts, "first")
    assert min(div["js"]) > 5 * max(div["shuffled_js"])

    top = metrics.top_tokens(token_T, expert_TK[:, 0], num_experts, 256, n=3)
    assert {row[0] for row in top[0]["by_count"]} == {0, 4}  # the ids ≡ 0 (mod 4)
    assert [row[0] for row in top[2]["by_count"]] == [2]


def test_uniform_random_router_gives_the_baselines_within_sampling_error():
    num_experts, top_k, num_tokens = 8, 2, 40_000
    expert_TK = uniform_random_topk(num_tokens, num_experts, top_k)
    sequence_T, position_T, domain_T = probe_arrays([100] * 400, [0] * 200 + [1] * 200)
    token_T = np.random.default_rng(1).integers(0, 50, num_tokens)

    measured = metrics.consecutive_repetition(expert_TK, sequence_T, position_T)
    uniform = metrics.uniform_repetition_baselines(num_experts, top_k)
    matched = metrics.load_matched_repetition_baselines(expert_TK, num_experts)
    pairs = measured["pairs"]
    assert pairs == 400 * 99
    for key in ("first", "any_shared", "overlap"):
        sigma = math.sqrt(uniform[key] * (1 - uniform[key]) / pairs)
        assert abs(measured[key] - uniform[key]) < 4 * sigma, key
        assert abs(matched[key] - uniform[key]) < 0.01, key

    det = metrics.token_determinism(
        token_T, expert_TK[:, 0], sequence_T, position_T, num_experts, 50, metrics.position_buckets(100)
    )
    assert abs(det["accuracy"] - 1 / num_experts) < 0.03  # the token says nothing

    load = metrics.load_stats(expert_TK, np.full(num_tokens, math.log(num_experts)), num_experts)
    assert load["dead"] == []
    assert load["cv"] < 0.03
    np.testing.assert_allclose(load["load"], 1 / num_experts, atol=0.01)

    div = metrics.domain_divergence(expert_TK, domain_T, sequence_T, 2, num_experts)
    assert max(div["js"]) < 0.002 and max(div["shuffled_js"]) < 0.002


def test_uniform_baselines_are_mixtral_table5s():
    # Mixtral §5: 1/8 = 12.5% first choice, 1 − 6/8 · 5/7 ≈ 46% first or second, for E=8, k=2.
    baselines = metrics.uniform_repetition_baselines(8, 2)
    assert baselines["first"] == 0.125
    assert baselines["any_shared"] == pytest.approx(1 - 6 / 8 * 5 / 7)
    assert baselines["overlap"] == 0.25
    assert metrics.uniform_repetition_baselines(4, 1)["any_shared"] == pytest.approx(0.25)  # k=1: same as first


def test_consecutive_rates_counted_by_hand():
    # Two windows; pairs never cross the window boundary (token 4 → token 5).
    expert_TK = np.array(
        [
            [0, 1],
            [0, 2],
            [3, 1],
            [3, 0],
            [2, 1],  # window 0
            [2, 1],
            [1, 2],
            [1, 3],
        ]
    )  # window 1
    sequence_T, position_T, _ = probe_arrays([5, 3], [0, 0])
    result = metrics.consecutive_repetition(expert_TK, sequence_T, position_T)
    # Pairs (0,1) (1,2) (2,3) (3,4) | (5,6) (6,7): first equal in (0,1), (2,3), (6,7) → 3/6.
    # Shared: {0,1}∩{0,2}=1, {0,2}∩{3,1}=0, {3,1}∩{3,0}=1, {3,0}∩{2,1}=0, {2,1}∩{1,2}=2, {1,2}∩{1,3}=1.
    assert result["pairs"] == 6
    assert result["first"] == pytest.approx(3 / 6)
    assert result["any_shared"] == pytest.approx(4 / 6)
    assert result["overlap"] == pytest.approx((1 + 0 + 1 + 0 + 2 + 1) / 6 / 2)


def test_load_matched_baseline_is_sum_of_squared_loads():
    expert_TK = np.array([[0, 1]] * 6 + [[2, 3]] * 2 + [[1, 0]] * 2)
    matched = metrics.load_matched_repetition_baselines(expert_TK, 4)
    p = np.array([6, 2, 2, 0]) / 10  # first-choice loads: 0 ×6, 2 ×2, 1 ×2
    assert matched["first"] == pytest.approx(float(np.sum(p**2)))
    # Sets {0,1} (prob 0.8) and {2,3} (0.2) share an expert only with themselves.
    assert matched["any_shared"] == pytest.approx(0.8**2 + 0.2**2)
    r = np.array([8, 8, 2, 2]) / 10  # share of tokens holding each expert
    assert matched["overlap"] == pytest.approx(float(np.sum(r**2)) / 2)
    # The random-pairing estimate (many distinct sets) agrees with the exact value.
    estimate = metrics.load_matched_repetition_baselines(np.repeat(expert_TK, 2000, axis=0), 4, max_exact_sets=1)
    assert estimate["any_shared"] == pytest.approx(0.8**2 + 0.2**2, abs=0.01)


def test_js_divergence_bounds():
    assert metrics.js_divergence([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert metrics.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert 0 < metrics.js_divergence([0.9, 0.1], [0.5, 0.5]) < 1


def test_determinism_is_measured_on_held_out_windows_by_position():
    # Token 7's expert is 0 in even windows and 1 in odd ones: a fit on one half is always wrong
    # on the other (what leakage between halves would hide).
    sequence_T, position_T, _ = probe_arrays([4] * 10, [0] * 10)
    token_T = np.full(40, 7)
    expert_T = (sequence_T % 2).astype(np.int64)
    det = metrics.token_determinism(token_T, expert_T, sequence_T, position_T, 2, 8, [0, 1, 2], min_count=3)
    assert det["accuracy"] == 0.0
    # Token 3 opens every window and always goes to expert 1: right at position 0 only.
    token_T = np.where(position_T == 0, 3, 7)
    expert_T = np.where(position_T == 0, 1, sequence_T % 2)
    det = metrics.token_determinism(token_T, expert_T, sequence_T, position_T, 2, 8, [0, 1, 2], min_count=3)
    assert det["by_position"] == [1.0, 0.0, 0.0]
    assert det["coverage"] == 1.0


def test_rare_tokens_are_not_fitted():
    sequence_T, position_T, _ = probe_arrays([4] * 4, [0] * 4)
    token_T = np.arange(16)
    det = metrics.token_determinism(token_T, np.zeros(16, dtype=np.int64), sequence_T, position_T, 2, 16, [0])
    assert det["accuracy"] is None and det["coverage"] == 0.0


def test_top_tokens_by_count_and_lift():
    # Expert 0: token 1 ×30, token 2 ×10; expert 1: token 2 ×50, token 3 ×10.
    token_T = np.array([1] * 30 + [2] * 10 + [2] * 50 + [3] * 10)
    expert_T = np.array([0] * 40 + [1] * 60)
    top = metrics.top_tokens(token_T, expert_T, 2, 4, n=2, min_count=5)
    assert top[0]["by_count"] == [[1, 30, 0.75], [2, 10, 0.25]]
    assert top[0]["by_lift"][0][0] == 1
    assert top[0]["by_lift"][0][1] == pytest.approx((30 / 40) / (30 / 100))
    assert top[1]["by_lift"][0][0] == 3  # P(3|e1)=1/6 over P(3)=1/10 beats token 2's (5/6)/(6/10)
    assert top[1]["by_lift"][0][1] == pytest.approx((10 / 60) / (10 / 100))


def test_classify_pieces_knows_indentation():
    text = "def f(x):\n    return X1\n"
    names = [metrics.TOKEN_CLASSES[c] for c in metrics.classify_pieces(list(text))]
    assert names[:4] == ["lower", "lower", "lower", "space"]
    assert names[8] == "punct"  # ':'
    assert names[9] == "newline"
    assert names[10:14] == ["indent"] * 4
    assert names[20] == "space"  # between 'return' and 'X1'
    assert names[21:23] == ["upper", "digit"]
    profile = metrics.class_profile(np.array([0, 1, 1]), np.array([0, 1, 1]), 2)
    assert profile["share"][1][1] == 1.0 and profile["lift"][1][1] == pytest.approx(1.5)


def test_load_stats_dead_experts_and_cv():
    expert_TK = np.array([[0, 1], [0, 1], [0, 2], [0, 2]])  # counts 4, 2, 2, 0
    stats = metrics.load_stats(expert_TK, np.array([0.0, 1.0, 1.0, 0.0]), 4)
    assert stats["dead"] == [3]
    assert stats["load"] == [0.5, 0.25, 0.25, 0.0]
    counts = np.array([4, 2, 2, 0])
    assert stats["cv"] == pytest.approx(counts.std() / counts.mean())
    assert stats["entropy"] == 0.5 and stats["entropy_max"] == pytest.approx(math.log(4))


def test_drops_by_position_counted_by_hand():
    expert_TK = np.array([[0, 1], [0, 1], [0, 1], [0, 1]])
    kept_TK = np.array([[True, True], [True, False], [False, True], [False, False]])
    position_T = np.array([0, 1, 2, 3])
    drops = metrics.drops_by_position(expert_TK, kept_TK, position_T, [0, 1, 2])
    assert drops["assignments"] == [0.0, 0.5, 0.75]  # bucket [2, ...) holds positions 2 and 3
    assert drops["tokens"] == [0.0, 0.0, 0.5]
    assert drops["overall"] == pytest.approx(4 / 8)


def test_routing_agreement_and_buckets():
    a = np.array([[0, 1], [2, 3], [1, 0]])
    b = np.array([[0, 1], [3, 2], [2, 3]])
    assert metrics.routing_agreement(a, b) == {"first": pytest.approx(1 / 3), "topk": pytest.approx(4 / 6)}
    assert metrics.position_buckets(128) == [0, 1, 2, 4, 8, 16, 32, 64]
    assert metrics.bucket_labels([0, 1, 2, 4], 8) == ["0", "1", "2-3", "4-7"]


def test_assignments_to_table_orders_each_token_and_marks_missing():
    token_N = np.array([0, 0, 2, 1, 2])
    expert_N = np.array([5, 3, 1, 4, 2])
    order_N = np.array([1, 0, 0, 0, 1])
    expert_TK, index_TK = assignments_to_table(token_N, expert_N, order_N, 4, 2)
    assert expert_TK.tolist() == [[3, 5], [4, -1], [1, 2], [-1, -1]]
    assert index_TK.tolist() == [[1, 0], [3, -1], [2, 4], [-1, -1]]


def test_token_pieces_join_split_utf8_characters():
    tokenizer = ByteTokenizer()
    tokens = tokenizer.encode("aé€b")
    assert token_pieces(tokens, tokenizer) == [("a", 0), ("é", 1), ("€", 3), ("b", 6)]


# --------------------------------------------------------------------------------------------
# Recording a real model
# --------------------------------------------------------------------------------------------


def test_capture_routing_records_topk_and_restores_the_layer():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2)).eval()
    x = torch.randn(10, 16)
    expected = layer(x)
    with capture_routing(layer) as captured:
        y = layer(x)
    torch.testing.assert_close(y, expected)  # recording changes nothing
    assert "route" not in vars(layer)  # the class method is back
    (routing,) = captured[""]
    topk_ids_TK = routing.scores_TE.topk(2, dim=-1).indices
    assert routing.assignments.expert_idx_N.tolist() == topk_ids_TK.reshape(-1).tolist()
    with pytest.raises(RuntimeError):
        with capture_routing(layer):
            raise RuntimeError("boom")
    assert "route" not in vars(layer)


def tiny_lm(**moe) -> MoETransformerLM:
    moe_values = dict(d_model=32, d_ff=32, num_experts=4, top_k=2)
    moe_values.update(moe)
    torch.manual_seed(0)
    return MoETransformerLM(LMConfig(seq_len=16, n_layer=2, n_head=2, d_model=32, moe=MoEConfig(**moe_values)))


def windows_probe(num_windows: int, seq_len: int, seed: int = 0) -> Probe:
    rng = np.random.default_rng(seed)
    windows = [rng.integers(0, 256, seq_len) for _ in range(num_windows)]
    sequence_T, position_T, domain_T = probe_arrays([seq_len] * num_windows, [0] * num_windows)
    return Probe(["d"], np.concatenate(windows), domain_T, sequence_T, position_T, windows)


def test_record_routing_matches_the_router_and_position_zero_is_token_determined():
    model = tiny_lm()
    probe = windows_probe(6, 16)
    for window in probe.windows:
        window[0] = 65  # every window opens with "A"
    probe.token_T = np.concatenate(probe.windows)
    model.eval()
    with torch.no_grad(), capture_routing(model) as captured:
        model(torch.from_numpy(np.stack(probe.windows[:4])))
    model.train()
    routings = record_routing(model, probe, batch_size=4, progress=False)
    assert model.training  # the model's mode is given back
    assert [r.block for r in routings] == [0, 1]
    assert routings[0].expert_TK.shape == (96, 2) and routings[0].kept_TK is None
    scores_TE = captured["blocks.0.ffn"][0].scores_TE
    assert scores_TE.topk(2, dim=-1).indices.tolist() == routings[0].expert_TK[:64].tolist()
    # Position 0 attends to itself only: its routing is a function of the token alone.
    for routing in routings:
        first_tokens_WK = routing.expert_TK[probe.position_T == 0]
        assert (first_tokens_WK == first_tokens_WK[0]).all()
    assert routings[0].entropy_T.shape == (96,) and (routings[0].entropy_T <= math.log(4) + 1e-6).all()


def test_training_capacity_is_replayed_as_the_layer_applies_it():
    model = tiny_lm(capacity_factor=1.0, min_capacity=1)
    probe = windows_probe(4, 16)  # one batch of 4 windows, as training would route it
    routings = record_routing(model, probe, batch_size=4, progress=False)
    kept_TK = routings[0].kept_TK
    assert kept_TK is not None and not kept_TK.all()
    model.train()
    model(torch.from_numpy(np.stack(probe.windows)))
    trained_counts = model.blocks[0].ffn.last_stats.tokens_per_expert_E.tolist()
    replayed_counts = np.bincount(routings[0].expert_TK[kept_TK], minlength=4).tolist()
    assert replayed_counts == trained_counts


@pytest.mark.parametrize("router", ["topk", "switch", "gshard", "noisy_topk", "expert_choice", "aux_free"])
def test_every_router_is_recorded_and_analysed(router):
    moe = {"router": router, "top_k": 1 if router == "switch" else 2}
    if router == "expert_choice":
        moe["capacity_factor"] = 1.0
    model = tiny_lm(**moe)
    probe = windows_probe(5, 16)
    routings = record_routing(model, probe, batch_size=4, progress=False)
    results = analyse(probe, routings, ByteTokenizer(), 16, [0, 1])
    for routing, row in zip(routings, results["per_layer"].values(), strict=True):
        first = routing.expert_TK[:, 0]
        if router != "expert_choice":  # every token has its top-k (GShard's second kept in eval)
            assert (routing.expert_TK >= 0).all()
            # Choices are ordered: the first has the highest weight.
            if routing.expert_TK.shape[1] > 1:
                assert (routing.weight_TK[:, 0] >= routing.weight_TK[:, 1] - 1e-6).all() or router == "aux_free"
        else:  # each expert takes C = T·k/E tokens of its batch
            assert (routing.expert_TK >= 0).sum() == 5 * 16 * 2
        assert set(row["shares"]) == ({"either", "first"} if router == "switch" else {"either", "first", "second"})
        np.testing.assert_allclose(np.sum(row["shares"]["either"]["whole"]), 1.0)
        assert row["load"]["entropy"] <= math.log(4) + 1e-6
        assert 0 <= row["repetition"]["measured"]["first"] <= 1
        assert (first >= -1).all() and (first < 4).all()


def test_report_for_top1_with_capacity_drops_and_a_checkpoint(tmp_path):
    config = LMConfig(
        seq_len=16,
        n_layer=2,
        n_head=2,
        d_model=32,
        moe=MoEConfig(
            d_model=32, d_ff=32, num_experts=4, top_k=1, router="switch", capacity_factor=1.0, min_capacity=1
        ),
    )
    run = tmp_path / "run"
    run.mkdir()
    write_json_atomic(
        run / "config.json", {"model": config.to_dict(), "train": {"batch_size": 4}, "tokenizer": {"kind": "bytes"}}
    )
    torch.manual_seed(0)
    save_checkpoint(run, MoETransformerLM(config), {"step": 7})
    early = tmp_path / "early"
    torch.manual_seed(1)
    save_checkpoint(early, MoETransformerLM(config), {"step": 2})  # early/checkpoint: weights only
    text = tmp_path / "text.txt"
    text.write_text("Hello, world! 123 " * 40)
    results, *_ = run_inspect(
        run, [str(text)], tmp_path / "out", checkpoints=[str(early / "checkpoint")], progress=False
    )
    row = results["per_layer"]["0"]
    assert row["drops"] is not None and 0 < row["drops"]["overall"] < 1
    assert set(results["figures"]) >= {"drops", "stability", "repetition", "shares"}
    assert results["stability"]["note"] is None
    (checkpoint,) = results["stability"]["checkpoints"]
    assert checkpoint["step"] == 2 and checkpoint["per_layer"]["0"]["first"] < 1  # other weights
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Capacity drops by position" in page
    assert "top-1 sets" not in page and "share ≥1" not in page  # k=1: the set columns would repeat first


# --------------------------------------------------------------------------------------------
# The command end to end
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny MoE LM trained for a few steps, and three labelled text files."""
    root = tmp_path_factory.mktemp("inspect")
    prose = root / "prose.txt"
    prose.write_text("To be, or not to be, that is the question.\n" * 60)
    code = root / "code.py"
    code.write_text("def f(x):\n    return x + 1\n\n\nclass A:\n    value = 42\n" * 40)
    numbers = root / "numbers.txt"
    numbers.write_text(" ".join(str(i * 37 % 1000) for i in range(400)))
    config = LMConfig(
        seq_len=32, n_layer=2, n_head=2, d_model=32, moe=MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2)
    )
    train_config = TrainConfig(
        steps=3,
        batch_size=4,
        eval_interval=3,
        eval_batches=1,
        log_interval=1,
        checkpoint_interval=3,
        max_minutes=None,
        data=str(prose),
    )
    run = root / "run"
    train(config, train_config, run, progress=False)
    return {"root": root, "run": run, "data": f"{prose},{code},{numbers}", "prose": prose}


def test_inspect_writes_report_and_json_summary(tiny_run, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["inspect", str(tiny_run["run"]), "--data", tiny_run["data"], "--out", str(out), "--json", "--no-progress"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout)  # the only thing on stdout
    assert stdout.count("\n") == 1
    assert summary["domains"] == ["prose", "code", "numbers"]
    assert set(summary["layers"]) == {"0", "1"}
    layer = summary["layers"]["0"]
    assert layer["repeat_first_uniform"] == 0.25
    assert layer["repeat_any_shared_uniform"] == pytest.approx(1 - 1 / 6)  # 1 − C(2,2)/C(4,2)
    routing = json.loads((out / "routing.json").read_text())
    assert routing["summary"] == summary
    row = routing["per_layer"]["1"]
    for key in ("shares", "divergence", "repetition", "determinism", "top_tokens", "classes", "load"):
        assert key in row
    assert set(row["shares"]) == {"either", "first", "second"}
    assert len(row["shares"]["first"]["domains"]) == 3
    assert routing["stability"]["note"].startswith("only one checkpoint")
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(routing["figures"]) >= 6
    assert "http" not in page and "<script" not in page  # self-contained, no network
    assert 'title="expert' in page  # coloured text
    for name in routing["figures"].values():
        assert (out / name).stat().st_size > 1000

    # A second run replaces the report; --terminal prints ANSI colours on stdout.
    assert (
        main(args[:-2] + ["--terminal", "--no-progress", "--layers", "1", "--checkpoints", str(tiny_run["run"])]) == 0
    )
    text = capsys.readouterr().out
    assert "\x1b[48;2;" in text and "layer 1" in text and "-- code --" in text
    stability = json.loads((out / "routing.json").read_text())["stability"]
    assert stability["checkpoints"][0]["step"] == 3
    assert stability["checkpoints"][0]["per_layer"]["0"] == {"first": 1.0, "topk": 1.0}  # itself


def dense_run(path):
    config = LMConfig(
        seq_len=16,
        n_layer=1,
        n_head=2,
        d_model=32,
        arch="dense",
        moe=MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2),
    )
    path.mkdir()
    write_json_atomic(path / "config.json", {"model": config.to_dict(), "train": {}, "tokenizer": {"kind": "bytes"}})
    save_checkpoint(path, MoETransformerLM(config), {})
    return path


@pytest.mark.parametrize(
    "case, flag",
    [
        ("missing_file", "--data"),
        ("empty_file", "--data"),
        ("dense", "MODEL"),
        ("not_a_run", "MODEL"),
        ("busy_out", "--out"),
        ("bad_layers", "--layers"),
        ("bad_checkpoint", "--checkpoints"),
        ("terminal_json", "--terminal"),
    ],
)
def test_inspect_errors_exit_2_with_one_line_naming_the_flag(tiny_run, tmp_path, capsys, case, flag):
    run, data, out = str(tiny_run["run"]), str(tiny_run["prose"]), str(tmp_path / "out")
    extra: list[str] = []
    if case == "missing_file":
        data = str(tmp_path / "nope.txt")
    elif case == "empty_file":
        (tmp_path / "empty.txt").write_text("")
        data = f"{data},{tmp_path / 'empty.txt'}"
    elif case == "dense":
        run = str(dense_run(tmp_path / "dense"))
    elif case == "not_a_run":
        run = str(tmp_path)
    elif case == "busy_out":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    elif case == "bad_layers":
        extra = ["--layers", "5"]
    elif case == "bad_checkpoint":
        extra = ["--checkpoints", str(tmp_path)]
    elif case == "terminal_json":
        extra = ["--terminal", "--json"]
    code = main(["inspect", run, "--data", data, "--out", out, "--no-progress", *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith("moekit inspect: error:") and flag in lines[0]
    if case == "busy_out":
        assert (tmp_path / "out" / "keep.txt").read_text() == "mine"  # nothing overwritten
