"""Routing statistics of one forward: how evenly the experts were used, what was dropped.

Shape suffixes: T tokens, E experts, N kept assignments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from moekit.losses import router_entropy


@dataclass
class RawRoutingStats:
    """What a layer keeps from its last forward (detached tensors; no host sync)."""

    num_tokens: int
    num_routed: int  # assignments before capacity
    tokens_per_expert_E: Tensor  # after capacity
    kept_token_idx_N: Tensor
    scores_TE: Tensor
    capacity: int | None

    def summarize(self) -> RoutingStats:
        load_E = self.tokens_per_expert_E.float()
        num_kept = int(load_E.sum().item())
        mean_load = load_E.mean().item() if load_E.numel() else 0.0
        if self.num_tokens:
            covered = torch.zeros(self.num_tokens, dtype=torch.bool, device=load_E.device)
            covered[self.kept_token_idx_N] = True
            dropped_tokens = self.num_tokens - int(covered.sum().item())
        else:
            dropped_tokens = 0
        return RoutingStats(
            num_tokens=self.num_tokens,
            tokens_per_expert=[int(v) for v in self.tokens_per_expert_E.tolist()],
            dropped_fraction=(self.num_routed - num_kept) / self.num_routed if self.num_routed else 0.0,
            dropped_token_fraction=dropped_tokens / self.num_tokens if self.num_tokens else 0.0,
            router_entropy=float(router_entropy(self.scores_TE).item()),
            load_cv=load_E.std(unbiased=False).item() / mean_load if mean_load > 0 else 0.0,
            load_imbalance=load_E.max().item() / mean_load if mean_load > 0 else 0.0,
            num_empty_experts=int((self.tokens_per_expert_E == 0).sum().item()),
            capacity=self.capacity,
        )


@dataclass
class RoutingStats:
    num_tokens: int  # routed (unmasked) tokens
    tokens_per_expert: list[int]  # assignments each expert processed, after capacity
    dropped_fraction: float  # assignments dropped by capacity / assignments routed
    dropped_token_fraction: float  # tokens left with no expert (expert choice: unchosen)
    router_entropy: float  # mean entropy of the routing distribution, nats (max log E)
    load_cv: float  # std / mean of tokens_per_expert (0 = perfectly even)
    load_imbalance: float  # max / mean of tokens_per_expert (1 = perfectly even)
    num_empty_experts: int  # experts that got no token
    capacity: int | None  # per-expert capacity used, None when dropless

    def to_dict(self) -> dict:
        return asdict(self)
