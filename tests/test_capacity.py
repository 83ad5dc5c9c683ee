"""Capacity: the formula, and that each priority keeps exactly the first C assignments.

pytest tests/test_capacity.py
"""

from __future__ import annotations

import torch

from moekit.capacity import apply_capacity, capacity_keep_mask, expert_capacity, priority_order
from moekit.routing import Assignments


def make_assignments(experts_TK, scores_TK):
    experts_TK = torch.tensor(experts_TK)
    num_tokens, top_k = experts_TK.shape
    return Assignments(
        token_idx_N=torch.arange(num_tokens).repeat_interleave(top_k),
        expert_idx_N=experts_TK.reshape(-1),
        weight_N=torch.tensor(scores_TK).reshape(-1),
        rank_N=torch.arange(top_k).repeat(num_tokens),
        score_N=torch.tensor(scores_TK).reshape(-1),
    )


def test_capacity_formula():
    assert expert_capacity(4096, 64, 1, 1.25, 4) == 80  # ceil(1.25 · 4096 / 64)
    assert expert_capacity(100, 8, 2, 1.0, 0) == 25
    assert expert_capacity(10, 8, 2, 1.0, 0) == 3  # ceil(2.5)
    assert expert_capacity(10, 8, 2, 1.0, 4) == 4  # min_capacity wins
    assert expert_capacity(0, 8, 2, 1.0, 0) == 0


def test_position_priority_keeps_first_choices_then_token_order():
    # 4 tokens, k=2. Expert 0 is chosen by: t0 (rank 0), t1 (rank 1), t2 (rank 0), t3 (rank 1).
    assignments = make_assignments(
        [[0, 1], [1, 0], [0, 2], [2, 0]], [[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]]
    )
    kept, dropped = apply_capacity(assignments, 4, 3, 2, "position")
    # Expert 0 keeps the two first choices (t0, t2) before any second choice.
    expert0_tokens = kept.token_idx_N[kept.expert_idx_N == 0].tolist()
    assert expert0_tokens == [0, 2]
    assert dropped == 2
    assert kept.token_idx_N.tolist() == sorted(kept.token_idx_N.tolist())  # token-major kept


def test_score_priority_keeps_highest_probability():
    assignments = make_assignments([[0], [0], [0], [0]], [[0.2], [0.9], [0.5], [0.7]])
    kept, dropped = apply_capacity(assignments, 4, 2, 2, "score")
    assert sorted(kept.token_idx_N.tolist()) == [1, 3]
    assert dropped == 2


def test_random_priority_keeps_exactly_C_and_varies_with_seed():
    assignments = make_assignments([[0]] * 20, [[0.5]] * 20)
    chosen = set()
    for seed in range(5):
        torch.manual_seed(seed)
        kept, dropped = apply_capacity(assignments, 20, 1, 5, "random")
        assert len(kept) == 5 and dropped == 15
        chosen.add(tuple(kept.token_idx_N.tolist()))
    assert len(chosen) > 1


def test_keep_mask_is_first_C_in_given_order():
    expert_idx_N = torch.tensor([1, 1, 0, 1, 0, 1])
    order_N = torch.tensor([5, 4, 3, 2, 1, 0])  # reverse priority
    keep = capacity_keep_mask(expert_idx_N, order_N, 2, 2)
    assert keep.tolist() == [False, False, True, True, True, True]


def test_priority_order_position_is_rank_major():
    rank_N = torch.tensor([0, 1, 0, 1, 0, 1])
    order = priority_order(rank_N, torch.zeros(6), 3, "position")
    assert order.tolist() == [0, 2, 4, 1, 3, 5]
