"""``moekit bench offload`` (moekit.experiments.bench.offload), as a smoke test.

Verified: ``--quick --json`` runs end to end with stdout one JSON document holding the keys the
docs describe; every row's logits are bit-identical to the in-memory model's (the quantized
rows' to the in-memory model with the same quantized experts); the budgets are the ones asked
for (non-expert bytes + B% of the expert bytes, the int8/int4 rows' too); the storage
bandwidth, last-level cache and simulator hit rates are reported; bad flags (a budget that is
not a percentage, negative or zero numbers) exit 2 naming the flag, without a traceback.

    PYTHONPATH=src pytest tests/test_bench_offload.py -q
"""

from __future__ import annotations

import json

import pytest

from moekit.cli.main import main
from moekit.experiments.bench.offload import Row, bench_lm_config, forced_tokens, parse_budget_percent, run_row


def test_quick_json_end_to_end_is_bit_exact_at_the_budgets_asked(tmp_path, capsys):
    args = ["bench", "offload", "--quick", "--json", "--budgets", "100,30%", "--int8-budget", "60",
            "--int4-budget", "35", "--dir", str(tmp_path)]
    assert main(args) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # the whole of stdout is the one document
    assert "storage read bandwidth" in captured.err and "Belady" in captured.err  # the table, on stderr
    assert {"cpu", "llc_bytes", "expert_bytes", "non_expert_bytes", "storage_read_gbps", "storage_read_method",
            "all_bit_identical", "trace_note", "rows"} <= set(report)
    assert report["storage_read_gbps"] > 0 and report["all_bit_identical"] is True
    assert "random weights" in report["trace_note"]
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["in memory", "store 100%", "store 30%", "int8 60%", "int4 35%"]
    expert, non_expert = report["expert_bytes"], report["non_expert_bytes"]
    for name, percent in (("store 100%", 100), ("store 30%", 30), ("int8 60%", 60), ("int4 35%", 35)):
        row = rows[name]
        assert row["memory_budget_bytes"] == non_expert + int(expert * percent / 100)
        assert row["logits_bit_identical"] is True
        assert row["cold"]["decode_tokens_per_s"] > 0 and row["warm"]["decode_tokens_per_s"] > 0
        assert row["cold"]["decode_vs_in_memory"] > 0
        assert row["peak_resident_bytes"] > 0 and row["resident_limit_bytes"] == int(row["memory_budget_bytes"] * 1.05)
        assert 0 <= row["simulated_hit_rate"]["belady"] <= 1 and "lru" in row["simulated_hit_rate"]
        if row["all_experts_fit"]:  # read before the cold run (timed apart), as load() does: no miss during it
            assert row["expert_cache"]["misses"] == 0 and row["preload_s"] > 0
            assert len(row["preload_s_rounds"]) == report["rounds"]
        else:  # cold: every expert came from the store
            assert row["expert_cache"]["misses"] > 0 and row["preload_s"] is None
    assert rows["store 100%"]["all_experts_fit"] is True and rows["store 30%"]["all_experts_fit"] is False
    assert rows["int8 60%"]["compared_to"] == "in memory with int8 experts"
    assert rows["int4 35%"]["store_expert_percent"] < 35 and rows["int4 35%"]["all_experts_fit"] is True
    # The Belady hit rate bounds LRU's on the same trace and capacity.
    assert all(r["simulated_hit_rate"]["belady"] >= r["simulated_hit_rate"]["lru"] for r in report["rows"][1:])
    assert list(tmp_path.iterdir()) == []  # the temporary stores are removed


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--budgets", "half"], "--budgets"),
        (["--budgets", "100,-25"], "--budgets"),
        (["--budgets", "150"], "--budgets"),
        (["--budgets", ""], "--budgets"),
        (["--int8-budget", "0"], "--int8-budget"),
        (["--int4-budget", "-5"], "--int4-budget"),
        (["--prompt-tokens", "-1"], "--prompt-tokens"),
        (["--new-tokens", "0"], "--new-tokens"),
        (["--new-tokens", "1"], "--new-tokens"),
        (["--rounds", "-2"], "--rounds"),
        (["--layers", "0"], "--layers"),
        (["--dir", "/nonexistent/dir"], "--dir"),
    ],
)
def test_bad_flags_name_the_flag(capsys, flags, named):
    assert main(["bench", "offload", "--quick", *flags]) == 2
    captured = capsys.readouterr()
    assert named in captured.err and "Traceback" not in captured.err and captured.out == ""


def test_budget_percentages_parse_and_refuse_by_name():
    assert parse_budget_percent("50", "--budgets") == 50.0
    assert parse_budget_percent(" 12.5% ", "--budgets") == 12.5
    for bad in ("0", "-1", "100.5", "nan", "inf", "fifty"):
        with pytest.raises(ValueError, match="--budgets"):
            parse_budget_percent(bad, "--budgets")


def test_decode_is_fed_the_fixed_random_sequence_not_the_argmax():
    # A random model's greedy output repeats a token (and its experts): the benchmark feeds
    # every decode step the next token of one seeded random sequence instead, the same per row.
    import torch

    from moekit.models.lm import MoETransformerLM

    torch.manual_seed(0)
    model = MoETransformerLM(bench_lm_config(quick=True, dtype=torch.float32, llc_bytes=None)).eval()
    prompt = [3, 1, 4, 1, 5]
    logits: list = []
    result = run_row(Row("in memory", "same", None, model=model), prompt, 12, keep=logits)
    forced = forced_tokens(prompt, 12, model.config.vocab_size)
    assert result.tokens == forced and forced == forced_tokens(prompt, 12, model.config.vocab_size)
    assert len(set(forced)) > 6  # varied, unlike a random model's greedy output
    assert len(logits) == 12 and all(torch.isfinite(step).all() for step in logits)  # the model's own logits


def hand_trace(path, num_experts: int):
    """One layer whose tokens alternate between experts (0, 1) and (1, 0), saved as a trace file."""
    import numpy as np

    from moekit.inference.trace import TRACE_FORMAT, TRACE_VERSION, LayerTrace, RoutingTrace

    rows = np.tile(np.array([[0, 1], [1, 0]], dtype=np.int16), (50, 1))
    layer = LayerTrace("blocks.0.ffn", num_experts, 2, rows, np.arange(100, dtype=np.int32))
    metadata = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "layers": [layer.name],
                "num_experts": [num_experts], "top_k": [2], "source": "hand-made", "trained": True,
                "model": "test", "text": "none"}
    return RoutingTrace([layer], np.zeros(0, dtype=np.int32), metadata).save(path)


def test_routing_trace_is_replayed_by_every_row(tmp_path, capsys):
    # A trace that uses experts 0 and 1 of 8 at every token: with it, every row routes there, so
    # the 25% budget (2 slots per layer) misses only each layer's first two requests and the
    # simulator sees the same.
    path = hand_trace(tmp_path / "t", num_experts=8)
    args = ["bench", "offload", "--quick", "--json", "--budgets", "25", "--no-quant", "--dir", str(tmp_path),
            "--routing-trace", str(path)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["all_bit_identical"] is True and "replayed from" in report["trace_note"]
    row = {r["name"]: r for r in report["rows"]}["store 25%"]
    assert row["expert_cache"]["misses"] == 2 * 2  # 2 layers, each loads experts 0 and 1 once
    # 2 layers x 2 choices x (16 prompt tokens + 7 fed back: the 8th new token is never run)
    # requests, of which 4 miss.
    assert row["simulated_hit_rate"]["lru"] == row["simulated_hit_rate"]["belady"] == pytest.approx(1 - 4 / 92)

    bad = hand_trace(tmp_path / "bad", num_experts=16)
    assert main(["bench", "offload", "--quick", "--no-quant", "--routing-trace", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "has 8 experts, top-2; the trace's layer blocks.0.ffn has 16 experts" in err and "Traceback" not in err
    assert main(["bench", "offload", "--quick", "--routing-trace", str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz: no such trace file" in capsys.readouterr().err
