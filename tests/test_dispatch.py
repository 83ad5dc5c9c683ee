"""The dispatch stage alone (moekit.dispatch), on hand-written assignment lists.

Verifies, against values derived by hand in the comments (not by calling the code under
test): the dispatch plan of a hand-written top-2 assignment list (expert-sorted order and its
inverse, token of each row, tokens per expert, group ends, embedding-bag offsets); dispatch
and combine on it; the permute ∘ combine round trip (weights summing to one per token give
x back exactly); an expert with no row, every row in one expert, and no rows at all.

    pytest tests/test_dispatch.py
"""

from __future__ import annotations

import torch

from moekit.dispatch import LocalDispatcher, make_plan
from moekit.routing import Assignments


def assignments_of(pairs: list[tuple[int, int]], weights: list[float]) -> Assignments:
    """Token-major (token, expert) pairs as moekit's flat assignment list."""
    token_idx_N = torch.tensor([t for t, _ in pairs], dtype=torch.long)
    rank_N = torch.tensor([sum(1 for t2, _ in pairs[:n] if t2 == t) for n, (t, _) in enumerate(pairs)])
    weight_N = torch.tensor(weights)
    return Assignments(
        token_idx_N=token_idx_N,
        expert_idx_N=torch.tensor([e for _, e in pairs], dtype=torch.long),
        weight_N=weight_N,
        rank_N=rank_N,
        score_N=weight_N.clone(),
    )


# T=4 tokens, E=4 experts, top-2 where token 3 kept one choice (its second was dropped).
# Assignment n:   0       1       2       3       4       5       6
# (token, expert) (0, 2)  (0, 0)  (1, 0)  (1, 3)  (2, 2)  (2, 3)  (3, 0)
# Expert 1 gets nothing.
PAIRS = [(0, 2), (0, 0), (1, 0), (1, 3), (2, 2), (2, 3), (3, 0)]
# Dyadic weights: every sum below is exact in float32. Each token's weights sum to 1.
WEIGHTS = [0.75, 0.25, 0.5, 0.5, 0.875, 0.125, 1.0]


def test_plan_of_a_hand_written_assignment_list():
    plan = make_plan(assignments_of(PAIRS, WEIGHTS), num_tokens=4, num_experts=4)
    # Stable sort by expert: expert 0 holds assignments 1, 2, 6 (in that order), expert 1
    # none, expert 2 assignments 0, 4, expert 3 assignments 3, 5.
    assert plan.order_N.tolist() == [1, 2, 6, 0, 4, 3, 5]
    # Its inverse: assignment 0 sits in row 3, 1 in row 0, 2 in row 1, 3 in row 5, ...
    assert plan.row_of_assignment_N.tolist() == [3, 0, 1, 5, 4, 6, 2]
    # The tokens of assignments 1, 2, 6, 0, 4, 3, 5.
    assert plan.token_of_row_N.tolist() == [0, 1, 3, 0, 2, 1, 2]
    assert plan.tokens_per_expert_E.tolist() == [3, 0, 2, 2]
    assert plan.tokens_per_expert == (3, 0, 2, 2)
    # Cumulative row counts (grouped_mm's offs): the empty expert repeats the previous end.
    assert plan.group_ends_E.tolist() == [3, 3, 5, 7] and plan.group_ends_E.dtype == torch.int32
    # Tokens hold 2, 2, 2, 1 assignments: their first assignments are 0, 2, 4, 6.
    assert plan.bag_offsets_T.tolist() == [0, 2, 4, 6]
    assert plan.num_rows == 7 and plan.num_tokens == 4
    group_ends, counts = LocalDispatcher(4).expert_groups(plan)
    assert group_ends.tolist() == [3, 3, 5, 7] and counts == (3, 0, 2, 2)


def test_dispatch_and_combine_by_hand():
    dispatcher = LocalDispatcher(4)
    assignments = assignments_of(PAIRS, WEIGHTS)
    plan = dispatcher.plan(assignments, num_tokens=4)
    x_TD = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])  # x[t] = (t+1)·[1, 10]
    # Rows in expert order are the tokens 0, 1, 3, 0, 2, 1, 2.
    rows = dispatcher.dispatch(x_TD, plan)
    assert rows.tolist() == [[1, 10], [2, 20], [4, 40], [1, 10], [3, 30], [2, 20], [3, 30]]
    # An "expert output" equal to the row number r: out[r] = [r, -r].
    out_ND = torch.stack([torch.arange(7.0), -torch.arange(7.0)], dim=1)
    # y[t] = Σ over t's assignments of weight · out[row of the assignment]:
    #   t0: 0.75·row 3 + 0.25·row 0  = 2.25
    #   t1: 0.5·row 1  + 0.5·row 5   = 3.0
    #   t2: 0.875·row 4 + 0.125·row 6 = 3.5 + 0.75 = 4.25
    #   t3: 1.0·row 2                = 2.0
    y_TD = dispatcher.combine(out_ND, assignments.weight_N, plan)
    assert y_TD.dtype == torch.float32
    assert y_TD.tolist() == [[2.25, -2.25], [3.0, -3.0], [4.25, -4.25], [2.0, -2.0]]


def test_permute_then_combine_is_identity_when_weights_sum_to_one():
    dispatcher = LocalDispatcher(4)
    assignments = assignments_of(PAIRS, WEIGHTS)
    plan = dispatcher.plan(assignments, num_tokens=4)
    x_TD = torch.randn(4, 5)
    # Identity experts: y[t] = Σ_w w · x[t] = x[t] since every token's weights sum to 1 (exact
    # in float32 for these dyadic weights).
    y_TD = dispatcher.combine(dispatcher.dispatch(x_TD, plan), assignments.weight_N, plan)
    torch.testing.assert_close(y_TD, x_TD, atol=0, rtol=0)


def test_every_row_in_one_expert():
    # E=3, all four assignments to expert 1: experts 0 and 2 are empty.
    plan = make_plan(assignments_of([(0, 1), (1, 1), (2, 1), (3, 1)], [1.0] * 4), num_tokens=4, num_experts=3)
    assert plan.order_N.tolist() == [0, 1, 2, 3]  # already sorted: stable sort keeps token order
    assert plan.tokens_per_expert == (0, 4, 0)
    assert plan.group_ends_E.tolist() == [0, 4, 4]


def test_no_rows_at_all():
    # Three tokens, none routed (everything dropped): the plan is empty and combine gives zeros.
    empty = Assignments(*(torch.zeros(0, dtype=torch.long) for _ in range(2)), torch.zeros(0),
                        torch.zeros(0, dtype=torch.long), torch.zeros(0))
    dispatcher = LocalDispatcher(2)
    plan = dispatcher.plan(empty, num_tokens=3)
    assert plan.num_rows == 0 and plan.tokens_per_expert == (0, 0)
    assert plan.group_ends_E.tolist() == [0, 0]
    assert plan.bag_offsets_T.tolist() == [0, 0, 0]
    rows = dispatcher.dispatch(torch.randn(3, 4), plan)
    assert rows.shape == (0, 4)
    y_TD = dispatcher.combine(rows, empty.weight_N, plan)
    assert y_TD.tolist() == [[0.0] * 4] * 3
