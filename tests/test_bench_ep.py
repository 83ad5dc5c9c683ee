"""``moekit bench ep``: the all-to-all volume formula and the measured bytes.

Verified: the formula at a hand-computed value; a quick run on 1 and 2 forked ranks reports,
per rank and step, exactly the bytes that the routing of its tokens sends to the other rank
(4 row exchanges of D float32 values per assignment leaving the rank, plus the counts), and
stage times that add up to the step; with --json its stdout is one JSON document and the
table goes to stderr.

    pytest tests/test_bench_ep.py
"""

from __future__ import annotations

import json

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.cli.main import main
from moekit.experiments.bench.expert_parallel import formula_bytes


def test_formula_at_hand_computed_value():
    # T=1000, k=2, D=128, float32, R=4: 4 · 1000·2·128·4 · 3/4 = 3,072,000 bytes of rows,
    # plus 8 bytes · E/R = 4 counts · 3 other ranks = 96 bytes.
    assert formula_bytes(1000, 2, 128, 16, 4) == 3_072_000 + 96
    assert formula_bytes(1000, 2, 128, 16, 1) == 0


@pytest.mark.distributed
def test_quick_run_measures_the_bytes_its_routing_sends(capsys):
    args = ["bench", "ep", "--quick", "--ranks", "1,2", "--start-method", "fork", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    payload = json.loads(captured.out)  # --json: stdout is the JSON document alone
    case = payload["case"]
    one, two = payload["rows"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert one["sent_mb"] == 0 and one["step_ratio"] == 1.0

    # The same layer and tokens as the bench's ranks: count the assignments that leave each rank.
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=case["d_model"], d_ff=case["d_ff"], num_experts=case["num_experts"],
                          top_k=case["top_k"], balance_loss_coef=0.0, z_loss_coef=0.0))
    per_rank_bytes = []
    for rank in range(2):
        x = torch.randn(case["tokens"], case["d_model"], generator=torch.Generator().manual_seed(1000 + rank))
        owner_N = layer.router.route(x).assignments.expert_idx_N // (case["num_experts"] // 2)
        leaving = int((owner_N != rank).sum())
        per_rank_bytes.append(4 * leaving * case["d_model"] * 4 + 8 * (case["num_experts"] // 2))
    assert two["sent_mb"] == pytest.approx(sum(per_rank_bytes) / 2 / 1e6, rel=1e-9)
    assert two["formula_mb"] == pytest.approx(
        formula_bytes(case["tokens"], case["top_k"], case["d_model"], case["num_experts"], 2) / 1e6
    )
    for row in (one, two):
        stages = row["routing_ms"] + row["all_to_all_ms"] + row["experts_ms"] + row["combine_ms"]
        assert stages == pytest.approx(row["step_ms"], rel=0.3)  # medians of sums, not sums of medians
        assert row["experts_ms"] > 0 and row["all_to_all_ms"] > 0
    assert len(out) == 1
    assert any("all-to-all" in line for line in captured.err.splitlines())  # the table, on stderr
