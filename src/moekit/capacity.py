"""Expert capacity: how many assignments an expert may take, and which ones it keeps.

Capacity (GShard §2.2, Switch Transformers eq. 3):
    C = max(min_capacity, ceil(capacity_factor · T · k / E))
with T the tokens of the routing group. When more than C assignments pick an expert, it
keeps the first C in priority order and drops the rest; a dropped assignment contributes
nothing to the output, so a token whose assignments are all dropped leaves the layer as 0
and only the residual connection carries it.

Priorities:
    "position"  every first choice before any second choice, then token order (GShard, Switch)
    "score"     higher router probability first (V-MoE batch-prioritized routing, Riquelme 2021)
    "random"    a random order (DeepSpeed's random token selection)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from moekit.routing import Assignments


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int
) -> int:
    """C = max(min_capacity, ceil(capacity_factor · T · k / E))."""
    return max(min_capacity, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def expert_choice_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None, min_capacity: int
) -> int:
    """Tokens each expert takes under expert choice (Zhou et al. 2022, §3.1): C from the
    formula above, at most T. ``capacity_factor=None`` means 1.0: expert choice has no
    dropless form."""
    factor = 1.0 if capacity_factor is None else capacity_factor
    return min(num_tokens, expert_capacity(num_tokens, num_experts, top_k, factor, min_capacity))


def priority_order(rank_N: Tensor, score_N: Tensor, num_tokens: int, priority: str) -> Tensor:
    """Permutation of the (token-major) assignments from most to least important."""
    if priority == "position":
        # Token-major input: a stable sort on the rank puts all first choices (in token
        # order) before all second choices.
        return torch.argsort(rank_N, stable=True)
    if priority == "score":
        return torch.argsort(score_N, descending=True, stable=True)
    if priority == "random":
        return torch.randperm(rank_N.numel(), device=rank_N.device)
    raise ValueError(f"drop_priority={priority!r} is invalid: use position, score or random")


def capacity_keep_mask(expert_idx_N: Tensor, order_N: Tensor, capacity: int, num_experts: int) -> Tensor:
    """True for the assignments among the first ``capacity`` of their expert in ``order_N``."""
    experts_by_priority_N = expert_idx_N[order_N]
    # Stable sort by expert keeps priority order inside each expert's group.
    by_expert_N = torch.argsort(experts_by_priority_N, stable=True)
    sorted_experts_N = experts_by_priority_N[by_expert_N]
    tokens_per_expert_E = torch.bincount(sorted_experts_N, minlength=num_experts)
    group_starts_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    position_in_expert_N = (
        torch.arange(sorted_experts_N.numel(), device=expert_idx_N.device) - group_starts_E[sorted_experts_N]
    )
    keep_N = torch.empty_like(expert_idx_N, dtype=torch.bool)
    keep_N[order_N[by_expert_N]] = position_in_expert_N < capacity
    return keep_N


def apply_capacity(
    assignments: Assignments,
    num_tokens: int,
    num_experts: int,
    capacity: int,
    priority: str,
    group_idx_T: Tensor | None = None,
    num_groups: int = 1,
) -> tuple[Assignments, int]:
    """Drop what exceeds ``capacity`` per expert; returns the kept assignments and the count
    dropped. Token-major order is preserved.

    With ``group_idx_T`` (the routing group, in [0, num_groups), of each token), each (group,
    expert) pair has its own ``capacity``: the groups are counted as G·E separate experts.
    """
    order_N = priority_order(assignments.rank_N, assignments.score_N, num_tokens, priority)
    expert_idx_N = assignments.expert_idx_N
    slots = num_experts
    if group_idx_T is not None:
        expert_idx_N = group_idx_T[assignments.token_idx_N] * num_experts + expert_idx_N
        slots = num_experts * num_groups
    keep_N = capacity_keep_mask(expert_idx_N, order_N, capacity, slots)
    kept = assignments.select(keep_N)
    return kept, len(assignments) - len(kept)
