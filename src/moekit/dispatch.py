"""Token dispatch: group the assignments by expert, and combine expert outputs per token.

Shape suffixes: T tokens, D d_model, E experts, N assignments (rows).

The dispatcher is a two-method contract (``dispatch``, ``combine``) plus a frozen plan, as
in torchtitan's LocalTokenDispatcher: everything here is local index arithmetic with no
communication, so an expert-parallel subclass can add its all-to-all around it.

No [T, E, C] one-hot tensors: a stable sort of the N assignments by expert gives contiguous
rows per expert, and the combine is an index_add (or embedding_bag) over those rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.routing import Assignments


@dataclass(frozen=True)
class DispatchPlan:
    num_tokens: int
    token_idx_N: Tensor  # token of each assignment, token-major (non-decreasing)
    bag_offsets_T: Tensor  # first assignment of each token (embedding_bag offsets)
    order_N: Tensor  # assignment held by each expert-sorted row
    row_of_assignment_N: Tensor  # inverse of order_N
    token_of_row_N: Tensor  # token of each expert-sorted row
    tokens_per_expert_E: Tensor  # long
    group_ends_E: Tensor  # int32 cumulative row counts: the offs of grouped_mm
    tokens_per_expert: tuple[int, ...]  # the same counts on the host, for loops

    @property
    def num_rows(self) -> int:
        return self.order_N.numel()


def make_plan(assignments: Assignments, num_tokens: int, num_experts: int) -> DispatchPlan:
    token_idx_N = assignments.token_idx_N
    device = token_idx_N.device
    order_N = torch.argsort(assignments.expert_idx_N, stable=True)
    row_of_assignment_N = torch.empty_like(order_N)
    row_of_assignment_N[order_N] = torch.arange(order_N.numel(), device=device)
    tokens_per_expert_E = torch.bincount(assignments.expert_idx_N, minlength=num_experts)
    assignments_per_token_T = torch.bincount(token_idx_N, minlength=num_tokens)
    bag_offsets_T = torch.cumsum(assignments_per_token_T, 0) - assignments_per_token_T
    return DispatchPlan(
        num_tokens=num_tokens,
        token_idx_N=token_idx_N,
        bag_offsets_T=bag_offsets_T,
        order_N=order_N,
        row_of_assignment_N=row_of_assignment_N,
        token_of_row_N=token_idx_N[order_N],
        tokens_per_expert_E=tokens_per_expert_E,
        group_ends_E=torch.cumsum(tokens_per_expert_E, 0).to(torch.int32),
        tokens_per_expert=tuple(tokens_per_expert_E.tolist()),
    )


class LocalDispatcher:
    """Single-process dispatch: permute token rows into expert order and back."""

    # NOTE: the layer's fused permute-experts-combine path bypasses dispatch/combine; a
    # dispatcher that communicates between them (expert parallelism) turns it off.
    fusable = True

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def plan(self, assignments: Assignments, num_tokens: int) -> DispatchPlan:
        return make_plan(assignments, num_tokens, self.num_experts)

    def dispatch(self, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        """Rows of x in expert order: [N, D]."""
        return x_TD.index_select(0, plan.token_of_row_N)

    def expert_groups(self, plan: DispatchPlan) -> tuple[Tensor, tuple[int, ...]]:
        """The group ends (grouped_mm offs) and row counts of the experts this process runs."""
        return plan.group_ends_E, plan.tokens_per_expert

    def combine(self, out_ND: Tensor, weight_N: Tensor, plan: DispatchPlan) -> Tensor:
        """y[token] = Σ weight · expert_out over the token's assignments: [T, D].

        The weights are applied in float32 (router precision) and y returned in float32;
        float64 expert outputs stay float64.
        """
        dtype = torch.promote_types(out_ND.dtype, torch.float32)
        out_by_assignment_ND = out_ND.to(dtype).index_select(0, plan.row_of_assignment_N)
        weighted_ND = out_by_assignment_ND * weight_N.to(dtype)[:, None]
        y_TD = weighted_ND.new_zeros(plan.num_tokens, out_ND.shape[1])
        return y_TD.index_add(0, plan.token_idx_N, weighted_ND)
