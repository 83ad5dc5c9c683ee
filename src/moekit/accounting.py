"""Parameter arithmetic of MoE models: total vs active parameters.

Total counts every parameter once (tied embeddings once). Active counts what one token's
forward touches: of each MoE layer's routed experts only top_k of num_experts (for expert
choice, top_k is the average number of experts per token), everything else in full.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moekit.layer import MoE


@dataclass
class ParameterCount:
    total: int
    active: int
    routed_experts: int  # all routed expert parameters (part of total)

    def to_dict(self) -> dict[str, int]:
        return {
            "total_params": self.total,
            "active_params": self.active,
            "routed_expert_params": self.routed_experts,
        }


def count_parameters(model: nn.Module) -> ParameterCount:
    total = sum(p.numel() for p in model.parameters())
    routed = 0
    inactive = 0.0
    outer_names: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, MoE) or any(name.startswith(outer + ".") for outer in outer_names):
            continue  # NOTE: a nested (hierarchical) MoE counts inside its outer layer's experts
        outer_names.append(name)
        expert_params = sum(p.numel() for p in module.experts.parameters())
        routed += expert_params
        config = module.config
        capacity_factor = config.capacity_factor or 1.0
        experts_per_token = config.top_k * (capacity_factor if config.router == "expert_choice" else 1.0)
        inactive += expert_params * (1 - min(1.0, experts_per_token / config.num_experts))
    return ParameterCount(total=total, active=round(total - inactive), routed_experts=routed)
