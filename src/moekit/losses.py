"""Auxiliary losses of the router, as pure functions.

Shape suffixes: T tokens, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor


def balance_loss(scores_TE: Tensor, selected_per_expert_E: Tensor, top_k: int) -> Tensor:
    """Switch Transformers load-balancing loss (Fedus et al. 2021, eq. 4-6).

        loss = E / (T · k) · Σ_i n_i · P_i

    n_i: assignments that chose expert i (before capacity dropping), P_i: mean router
    probability of expert i over the T tokens. With the T·k normalization (as Megatron-Core
    does) it is 1.0 at perfect balance for any k, and E/k when every token puts all its
    probability on one expert. Hugging Face's ``load_balancing_loss_func`` returns k times
    this. Gradients flow through P only (n is a count).
    """
    num_tokens, num_experts = scores_TE.shape
    if num_tokens == 0:
        return scores_TE.sum() * 0.0
    mean_prob_E = scores_TE.float().mean(dim=0)
    return num_experts / (num_tokens * top_k) * torch.dot(selected_per_expert_E.float(), mean_prob_E)


def hf_balance_loss(scores_TE: Tensor, selected_per_expert_E: Tensor, top_k: int) -> Tensor:
    """The balance loss in transformers' convention (``load_balancing_loss_func``):

        loss_hf = E / T · Σ_i n_i · P_i = k · balance_loss

    transformers averages the one-hot choices over tokens for each of the k ranks and sums
    over the ranks, so it is k at perfect balance (moekit's is 1). Use it to compare a
    number with transformers' ``aux_loss``; its ``router_aux_loss_coef`` is
    ``balance_loss_coef / k`` for the same objective.
    """
    return top_k * balance_loss(scores_TE, selected_per_expert_E, top_k)


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(x)².

    Penalizes large logits, which make the float32 softmax round off; (log E)² at zero logits.
    """
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def cv_squared(values_E: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation, Var(v) / Mean(v)² (Shazeer et al. 2017, eq. 7).

    Uses the unbiased variance, as the paper's reference code does; 0 for one value.
    """
    values_E = values_E.float()
    if values_E.numel() <= 1:
        return values_E.sum() * 0.0
    return values_E.var() / (values_E.mean().square() + eps)


def router_entropy(scores_TE: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of the routing distribution."""
    if scores_TE.shape[0] == 0:
        return scores_TE.new_zeros(())
    probs_TE = scores_TE.float()
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-30))).sum(dim=-1).mean()
