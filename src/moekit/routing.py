"""Routers: from tokens to the flat list of (token, expert, weight, rank) assignments.

Naming convention (one vocabulary everywhere, after Megatron-Core's TopKRouter):
  logits   x·W_r in float32, the gate's raw output, shape [T, E]
  scores   softmax (or sigmoid) of the logits: used for selection, aux losses and stats
  weights  the values a selected expert's output is multiplied by when combining
  assignments  the flat list of DESIGN.md: top-k routing makes T·k of them, expert choice E·C

Shape suffixes: T tokens, D d_model, E experts, K top_k, N assignments, C capacity,
G expert groups.

Every router does its math in float32 whatever the activation dtype, as torchtitan and
flaxformer do ("selective precision"): softmax and top-k in bf16 flip near-ties and make
the balance loss noisy.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.losses import cv_squared


class NonFiniteRouterLogitsError(FloatingPointError):
    """Raised when router logits hold NaN or inf (turn off with ``MoEConfig.check_finite=False``)."""


@dataclass
class Assignments:
    """The flat assignment list, in token-major order (token_idx_N is non-decreasing).

    weight_N is float32 and carries the gradient to the router; the other fields are
    integer indices or detached values.
    """

    token_idx_N: Tensor  # long
    expert_idx_N: Tensor  # long
    weight_N: Tensor  # float32, differentiable
    rank_N: Tensor  # long: 0 for a token's first choice, 1 for its second, ...
    score_N: Tensor  # float32, detached: router probability, for score priority

    def __len__(self) -> int:
        return self.token_idx_N.numel()

    def select(self, keep_N: Tensor) -> Assignments:
        """The assignments where keep_N is True, order preserved."""
        return Assignments(
            self.token_idx_N[keep_N],
            self.expert_idx_N[keep_N],
            self.weight_N[keep_N],
            self.rank_N[keep_N],
            self.score_N[keep_N],
        )


@dataclass
class RoutingResult:
    logits_TE: Tensor  # float32 gate output (z-loss input)
    scores_TE: Tensor  # float32 probabilities (balance loss, entropy)
    assignments: Assignments
    selected_per_expert_E: Tensor  # n_i of the balance loss: choices before any dropping
    router_losses: dict[str, Tensor] = field(default_factory=dict)  # unweighted extras
    capacity: int | None = None  # set when the router itself enforces a capacity (expert choice)


def topk_assignments(topk_ids_TK: Tensor, weights_TK: Tensor, scores_TE: Tensor) -> Assignments:
    """Flatten a [T, K] top-k selection into token-major assignments."""
    num_tokens, top_k = topk_ids_TK.shape
    device = topk_ids_TK.device
    if num_tokens == 1:  # decoding: the same indices in two ops instead of four
        token_idx_N = torch.zeros(top_k, dtype=torch.long, device=device)
        rank_N = torch.arange(top_k, device=device)
    else:
        token_idx_N = torch.arange(num_tokens, device=device).repeat_interleave(top_k)
        rank_N = torch.arange(top_k, device=device).repeat(num_tokens)
    return Assignments(
        token_idx_N=token_idx_N,
        expert_idx_N=topk_ids_TK.reshape(-1),
        weight_N=weights_TK.reshape(-1),
        rank_N=rank_N,
        score_N=scores_TE.detach().gather(1, topk_ids_TK).reshape(-1),
    )


def _selected_per_expert(topk_ids_TK: Tensor, num_experts: int) -> Tensor:
    return torch.bincount(topk_ids_TK.reshape(-1), minlength=num_experts).float()


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def float32_linear(x_TD: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear in float32: [T, out], also inside ``torch.autocast``, which would otherwise run
    the matmul in bf16/fp16 whatever its inputs' dtype (selective precision needs the router's
    logits computed in float32, not just stored in it)."""
    device_type = x_TD.device.type
    autocast_on = device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)
    with torch.autocast(device_type, enabled=False) if autocast_on else contextlib.nullcontext():
        return F.linear(x_TD.float(), weight.float(), bias.float() if bias is not None else None)


def group_limited_mask(selection_TE: Tensor, config: MoEConfig) -> Tensor:
    """Which experts a token may pick under group-limited routing: bool [T, E].

    The E experts form ``n_group`` contiguous groups; a group's score is the sum of its two
    best selection scores (``group_score='top2_sum'``, DeepSeek-V3 §2.1.2) or its best one
    (``'max'``, DeepSeek-V2 §2.1.2 device-limited routing); a token keeps its ``topk_group``
    best groups.
    """
    num_tokens = selection_TE.shape[0]
    per_group = config.num_experts // config.n_group
    grouped_TGe = selection_TE.view(num_tokens, config.n_group, per_group)
    if config.group_score == "max":
        group_scores_TG = grouped_TGe.max(dim=-1).values
    else:
        group_scores_TG = grouped_TGe.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    group_ids_TG = group_scores_TG.topk(config.topk_group, dim=-1).indices
    group_mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
    group_mask_TG.scatter_(1, group_ids_TG, True)
    return group_mask_TG.repeat_interleave(per_group, dim=1)


class Router(nn.Module):
    """Base router: one learned (num_experts, d_model) projection named ``weight``."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        # GPT-OSS's router has a per-expert logit bias (a learned parameter, unlike the
        # aux-free router's selection-only ``expert_bias`` buffer).
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default: logits start O(1), scores near uniform.
        bound = 1.0 / math.sqrt(self.config.d_model)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    # True: the gate's matmul runs in the activation dtype and its logits are then made float32,
    # as the routers of transformers' Mixtral, Qwen-MoE, OLMoE and GPT-OSS do; set by
    # ``moekit.interop.patch_moe`` so a patched bf16 model routes exactly as the original.
    gate_in_activation_dtype = False

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        if self.gate_in_activation_dtype:
            bias_E = self.bias.to(x_TD.dtype) if self.bias is not None else None
            return F.linear(x_TD, self.weight.to(x_TD.dtype), bias_E).float()
        # NOTE: the gate runs in float32 even for bf16 activations and under autocast
        # (selective precision).
        return float32_linear(x_TD, self.weight, self.bias)

    def checked_logits(self, x_TD: Tensor) -> Tensor:
        """``compute_logits``, checked for NaN and inf when ``MoEConfig.check_finite``.

        NOTE: checked here, before any noise is drawn or any distribution sees the logits, so
        that a NaN input raises NonFiniteRouterLogitsError whatever the router (not, say, the
        normal CDF's argument validation of noisy top-k). It is the layer's one host sync for
        the check.
        """
        logits_TE = self.compute_logits(x_TD)
        # NOTE: one float64 sum instead of isfinite + all (a [T, E] mask and its reduction): NaN
        # and ±inf propagate into the sum (inf - inf is NaN), and float64 cannot overflow on the
        # sum of float32 values, so the sum is finite exactly when every logit is.
        if self.config.check_finite and not bool(torch.isfinite(logits_TE.sum(dtype=torch.float64))):
            raise NonFiniteRouterLogitsError(
                "router logits contain NaN or inf: check the layer input and router weights "
                "(MoEConfig.check_finite=False skips this check)"
            )
        return logits_TE

    def route(self, x_TD: Tensor) -> RoutingResult:
        raise NotImplementedError


class TopKRouter(Router):
    """Mixtral / Qwen-MoE: softmax over all experts, keep the top k, optionally renormalize.

    With ``n_group > 1`` the top k come from the token's ``topk_group`` best expert groups
    (DeepSeek-V2's group-limited greedy routing, groups scored by ``group_score``); the
    weights are multiplied by ``routed_scaling_factor`` (DeepSeek-V2; 1 elsewhere).
    """

    def route(self, x_TD: Tensor) -> RoutingResult:
        config = self.config
        logits_TE = self.checked_logits(x_TD)
        scores_TE = logits_TE.softmax(dim=-1)
        selection_TE = scores_TE
        if config.n_group > 1:
            selection_TE = scores_TE.masked_fill(~group_limited_mask(scores_TE.detach(), config), float("-inf"))
        weights_TK, topk_ids_TK = selection_TE.topk(self.top_k, dim=-1)
        if config.normalize_weights:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if config.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * config.routed_scaling_factor
        return RoutingResult(
            logits_TE,
            scores_TE,
            topk_assignments(topk_ids_TK, weights_TK, scores_TE),
            _selected_per_expert(topk_ids_TK, self.num_experts),
        )


class SwitchRouter(Router):
    """Switch Transformers top-1 (Fedus et al. 2021).

    The weight is the unrenormalized softmax probability, so the router gets a gradient
    through it (with top-1, a renormalized weight would be the constant 1). In training
    the router's input, and only the router's, is multiplied by U(1-eps, 1+eps) noise
    (Switch §2.4, "jitter").
    """

    def route(self, x_TD: Tensor) -> RoutingResult:
        router_in_TD = x_TD.float()
        jitter = self.config.router_jitter
        if self.training and jitter > 0:
            noise_TD = torch.empty_like(router_in_TD).uniform_(1.0 - jitter, 1.0 + jitter)
            router_in_TD = router_in_TD * noise_TD
        logits_TE = self.checked_logits(router_in_TD)
        scores_TE = logits_TE.softmax(dim=-1)
        weights_TK, topk_ids_TK = scores_TE.topk(1, dim=-1)
        return RoutingResult(
            logits_TE,
            scores_TE,
            topk_assignments(topk_ids_TK, weights_TK, scores_TE),
            _selected_per_expert(topk_ids_TK, self.num_experts),
        )


class GShardRouter(Router):
    """GShard top-2 (Lepikhin et al. 2020) with the three forms of second-expert routing.

    The two weights are always renormalized: g1, g2 = g1/(g1+g2), g2/(g1+g2). In training,
    ``second_expert_policy`` decides whether the second assignment exists:
      "random"            GShard Algorithm 1: keep it when 2·g2 > u, u ~ U(0, 1)
      "threshold_random"  Mesh-TF: keep it when u < g2 / second_expert_threshold
      "sample"            DeepSpeed: the second expert is Gumbel-sampled among the rest in
                          proportion to its probability, and always kept
      "all"               always keep the argmax second expert
    A first expert is never dropped by the policy (only by capacity). In eval, every
    policy is "all": no randomness at inference.
    """

    def route(self, x_TD: Tensor) -> RoutingResult:
        logits_TE = self.checked_logits(x_TD)
        scores_TE = logits_TE.softmax(dim=-1)
        policy = self.config.second_expert_policy if self.training else "all"
        if policy == "sample":
            first_ids_T = scores_TE.argmax(dim=-1)
            # Gumbel-max: argmax(log p + g) samples the second expert with probability p_e.
            gumbel_TE = -torch.empty_like(logits_TE).exponential_().log()
            perturbed_TE = logits_TE.detach() + gumbel_TE
            perturbed_TE.scatter_(1, first_ids_T[:, None], float("-inf"))
            second_ids_T = perturbed_TE.argmax(dim=-1)
            topk_ids_TK = torch.stack([first_ids_T, second_ids_T], dim=1)
            weights_TK = scores_TE.gather(1, topk_ids_TK)
        else:
            weights_TK, topk_ids_TK = scores_TE.topk(2, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        assignments = topk_assignments(topk_ids_TK, weights_TK, scores_TE)
        if policy in ("random", "threshold_random"):
            second_weight_T = weights_TK[:, 1].detach()
            uniform_T = torch.rand_like(second_weight_T)
            if policy == "random":
                keep_second_T = 2.0 * second_weight_T > uniform_T
            else:
                keep_second_T = uniform_T < second_weight_T / self.config.second_expert_threshold
            keep_TK = torch.stack([torch.ones_like(keep_second_T), keep_second_T], dim=1)
            assignments = assignments.select(keep_TK.reshape(-1))
        return RoutingResult(
            logits_TE, scores_TE, assignments, _selected_per_expert(topk_ids_TK, self.num_experts)
        )


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017, §2.1 and Appendix A).

    H(x) = x·W_g + ε·softplus(x·W_noise), ε ~ N(0, 1) in training only; the weights are a
    softmax over the k kept values of H. Besides the shared losses it reports
    ``importance`` = CV²(Σ_x G(x)) (eq. 6-7) and ``load`` = CV²(Σ_x P(x, ·)) (eq. 8-10),
    where P(x, i) = Φ((x·W_g)_i - kth_excluding(H(x), k, i)) / softplus((x·W_noise)_i)) is
    the smooth probability that expert i is still selected under a new draw of noise.
    """

    NOISE_EPSILON = 1e-2  # floor on the noise std, as in the paper's reference code

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        # The paper initializes the noise projection to zero: noise std starts at softplus(0).
        self.noise_weight = nn.Parameter(torch.zeros(config.num_experts, config.d_model))

    def route(self, x_TD: Tensor) -> RoutingResult:
        clean_logits_TE = self.checked_logits(x_TD)
        noise_std_TE = F.softplus(float32_linear(x_TD, self.noise_weight))
        noise_std_TE = noise_std_TE + self.NOISE_EPSILON
        if self.training:
            noisy_logits_TE = clean_logits_TE + torch.randn_like(clean_logits_TE) * noise_std_TE
        else:
            noisy_logits_TE = clean_logits_TE
        k = self.top_k
        top_values_TK1, top_ids_TK1 = noisy_logits_TE.topk(k + 1, dim=-1)
        topk_ids_TK = top_ids_TK1[:, :k]
        weights_TK = top_values_TK1[:, :k].softmax(dim=-1)
        scores_TE = noisy_logits_TE.softmax(dim=-1)

        router_losses: dict[str, Tensor] = {}
        if self.training:
            gates_TE = torch.zeros_like(clean_logits_TE).scatter(1, topk_ids_TK, weights_TK)
            router_losses["importance"] = cv_squared(gates_TE.sum(dim=0))
            threshold_if_in_T1 = top_values_TK1[:, k : k + 1]
            threshold_if_out_T1 = top_values_TK1[:, k - 1 : k]
            is_in_TE = noisy_logits_TE > threshold_if_in_T1
            # validate_args=False: with check_finite off, a NaN propagates like in every other
            # router instead of failing the distribution's argument check.
            normal = torch.distributions.Normal(0.0, 1.0, validate_args=False)
            prob_if_in_TE = normal.cdf((clean_logits_TE - threshold_if_in_T1) / noise_std_TE)
            prob_if_out_TE = normal.cdf((clean_logits_TE - threshold_if_out_T1) / noise_std_TE)
            load_E = torch.where(is_in_TE, prob_if_in_TE, prob_if_out_TE).sum(dim=0)
            router_losses["load"] = cv_squared(load_E)
        return RoutingResult(
            clean_logits_TE,
            scores_TE,
            topk_assignments(topk_ids_TK, weights_TK, scores_TE),
            _selected_per_expert(topk_ids_TK, self.num_experts),
            router_losses,
        )


class ExpertChoiceRouter(Router):
    """Expert choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

    Scores are a softmax over experts; expert e takes the C tokens with the highest
    score for e, C = max(min_capacity, ceil(capacity_factor · T · k / E)) (at most T), so
    every expert gets exactly C tokens and a token may get 0 to E experts; top_k is the
    average number of experts per token. The layer computes C (``expert_choice_capacity``)
    and passes it in: capacity is its stage, not the router's.

    NOTE: not causal. Whether a token is chosen depends on every other token in the
    batch, future positions included, so autoregressive decoding differs from training.
    """

    def route(self, x_TD: Tensor, capacity: int) -> RoutingResult:  # type: ignore[override]
        logits_TE = self.checked_logits(x_TD)
        scores_TE = logits_TE.softmax(dim=-1)
        num_tokens = x_TD.shape[0]
        capacity = min(capacity, num_tokens)
        weights_CE, token_ids_CE = scores_TE.topk(capacity, dim=0)
        device = x_TD.device
        token_idx_N = token_ids_CE.reshape(-1)
        by_token_N = torch.argsort(token_idx_N, stable=True)
        expert_idx_N = torch.arange(self.num_experts, device=device).repeat(capacity)
        rank_N = torch.arange(capacity, device=device).repeat_interleave(self.num_experts)
        weight_N = weights_CE.reshape(-1)
        assignments = Assignments(
            token_idx_N[by_token_N],
            expert_idx_N[by_token_N],
            weight_N[by_token_N],
            rank_N[by_token_N],
            weight_N.detach()[by_token_N],
        )
        selected_E = torch.full((self.num_experts,), float(capacity), device=device)
        return RoutingResult(logits_TE, scores_TE, assignments, selected_E, capacity=capacity)


class AuxFreeRouter(Router):
    """Auxiliary-loss-free balancing (DeepSeek-V3, Wang et al. 2024).

    Scores are sigmoids. A per-expert bias b_i is added to the scores for *selection only*;
    the combine weights are the unbiased scores of the selected experts, normalized to sum
    to 1 (``normalize_weights``) and multiplied by ``routed_scaling_factor``. After every
    optimizer step, ``update_bias()`` moves b_i by ``bias_update_rate`` toward equal load:
    b_i += γ · sign(mean load - load_i), the load counted over the forwards since the last
    update (so gradient accumulation is covered). It is never called inside forward.

    Group-limited routing (DeepSeek-V3 §2.1.2 / node-limited routing): experts are split into
    ``n_group`` groups, a group's score is the sum of its two best biased scores, and a token
    picks its top-k experts within its ``topk_group`` best groups.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        self.register_buffer("load_since_update", torch.zeros(config.num_experts), persistent=False)

    def route(self, x_TD: Tensor) -> RoutingResult:
        config = self.config
        logits_TE = self.checked_logits(x_TD)
        scores_TE = logits_TE.sigmoid()
        selection_TE = scores_TE.detach() + self.expert_bias.float()
        if config.n_group > 1:
            selection_TE = selection_TE.masked_fill(~group_limited_mask(selection_TE, config), float("-inf"))
        topk_ids_TK = selection_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, topk_ids_TK)
        if config.normalize_weights:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * config.routed_scaling_factor
        selected_E = _selected_per_expert(topk_ids_TK, self.num_experts)
        if self.training:
            self.load_since_update += selected_E
        # The balance loss and entropy read normalized sigmoid scores (DeepSeek-V3 eq. 19).
        normalized_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
        return RoutingResult(
            logits_TE,
            normalized_TE,
            topk_assignments(topk_ids_TK, weights_TK, scores_TE),
            selected_E,
        )

    @torch.no_grad()
    def update_bias(self) -> None:
        """b_i += γ·sign(mean load − load_i); call once per optimizer step."""
        load_E = self.load_since_update
        if load_E.sum() > 0:
            self.expert_bias += self.config.bias_update_rate * torch.sign(load_E.mean() - load_E)
        load_E.zero_()


ROUTER_CLASSES: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "switch": SwitchRouter,
    "gshard": GShardRouter,
    "noisy_topk": NoisyTopKRouter,
    "expert_choice": ExpertChoiceRouter,
    "aux_free": AuxFreeRouter,
}


def build_router(config: MoEConfig) -> Router:
    return ROUTER_CLASSES[config.router](config)
