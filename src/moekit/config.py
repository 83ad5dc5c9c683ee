"""Validated configuration of one MoE layer.

Every field has a default and a reason; a bad value raises ``ValueError`` at construction,
naming the field, the value and what is allowed. Nothing is clamped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ROUTERS = ("topk", "switch", "gshard", "noisy_topk", "expert_choice", "aux_free")
ACTIVATIONS = ("swiglu", "gelu", "relu", "clamped_swiglu")
GATED_ACTIVATIONS = ("swiglu", "clamped_swiglu")  # the first projection is [gate | up], width 2F
GROUP_SCORES = ("top2_sum", "max")
DROP_PRIORITIES = ("position", "score", "random")
SECOND_EXPERT_POLICIES = ("random", "threshold_random", "sample", "all")
EXPERT_IMPLS = ("auto", "grouped_mm", "loop")
ROUTING_GROUPS = ("batch", "sequence")


def reject_unknown_fields(cls: type, values: dict[str, Any]) -> None:
    """A config dict (e.g. a config.json) with fields the dataclass lacks is an error, not ignored."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} got unknown fields {unknown}; known fields: {sorted(known)}")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"MoEConfig.{field}={value!r} is invalid: {allowed}")


@dataclass
class MoEConfig:
    d_model: int = 512
    d_ff: int = 1024  # hidden size of one routed expert
    num_experts: int = 8
    top_k: int = 2  # experts per token; 1 with router="switch" is Switch routing
    router: str = "topk"  # one of ROUTERS
    activation: str = "swiglu"  # expert FFN: swiglu (Mixtral), gelu or relu (Switch, GShard)

    # Capacity: C = max(min_capacity, ceil(capacity_factor * T * k / E)).
    capacity_factor: float | None = None  # None = dropless training
    eval_capacity_factor: float | None = None  # None = dropless eval (output independent of batch)
    min_capacity: int = 4  # DeepSpeed's default; keeps tiny batches from dropping everything
    drop_priority: str = "position"  # position (GShard/Switch), score (V-MoE BPR), random
    # A fixed C per expert, in training and eval alike, instead of the formula (transformers'
    # SwitchTransformersConfig.expert_capacity); None = use capacity_factor.
    expert_capacity: int | None = None
    # Tokens that share the capacity: "batch" = all tokens of one forward; "sequence" = each
    # sequence of a [B, S, D] input on its own (Switch/Mesh-TF routing groups; transformers' Switch).
    routing_group: str = "batch"

    normalize_weights: bool = True  # renormalize the top-k weights to sum to 1 (Mixtral)
    second_expert_policy: str = "random"  # gshard only; see routing.GShardRouter
    second_expert_threshold: float = 0.2  # threshold_random policy (Mesh-TF's default 0.2)

    balance_loss_coef: float = 1e-2  # Switch Transformers' alpha
    z_loss_coef: float = 1e-3  # ST-MoE's recommended router z-loss weight
    importance_loss_coef: float = 0.1  # noisy_topk: Shazeer et al. 2017 w_importance
    load_loss_coef: float = 0.1  # noisy_topk: Shazeer et al. 2017 w_load
    router_jitter: float = 0.0  # switch: multiplicative input noise eps (Switch used 1e-2)

    num_shared_experts: int = 0  # dense experts every token goes through (DeepSeekMoE)
    shared_expert_d_ff: int | None = None  # hidden size of one shared expert; None = d_ff
    shared_expert_gate: bool = False  # sigmoid gate on the shared output (Qwen2-MoE)
    expert_dropout: float = 0.0  # dropout on the expert hidden layer (Switch fine-tuning)

    # aux_free (DeepSeek-V3) routing.
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' combine weights
    n_group: int = 1  # expert groups for group-limited routing (1 = off)
    topk_group: int = 1  # groups a token may route to
    bias_update_rate: float = 1e-3  # gamma of the bias update (DeepSeek-V3 used 0.001)

    expert_impl: str = "auto"  # auto: grouped GEMM when available, else per-expert loop
    check_finite: bool = True  # raise on non-finite router logits (one host sync per forward)

    # Terms some transformers families have (interop.patch_moe); all off by default.
    router_bias: bool = field(
        default=False, metadata={"help": "a learned per-expert bias added to the router logits (GPT-OSS)"}
    )
    expert_biases: bool = field(
        default=False,
        metadata={"help": "bias vectors on both projections of every routed expert (GPT-OSS)"},
    )
    swiglu_alpha: float = field(
        default=1.702,
        metadata={"help": "activation='clamped_swiglu': gate * sigmoid(alpha * gate) (GPT-OSS's 1.702)"},
    )
    swiglu_limit: float = field(
        default=7.0,
        metadata={"help": "activation='clamped_swiglu': gate clamped to <= limit, up to [-limit, limit]"},
    )
    group_score: str = field(
        default="top2_sum",
        metadata={
            "help": "group-limited routing: a group's score is the sum of its two best expert scores "
            "('top2_sum', DeepSeek-V3) or its best score ('max', DeepSeek-V2)"
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    @property
    def shared_d_ff(self) -> int:
        """Hidden size of all shared experts together (they run as one dense FFN)."""
        one = self.d_ff if self.shared_expert_d_ff is None else self.shared_expert_d_ff
        return self.num_shared_experts * one

    def validate(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "must be an integer >= 1")
        if self.router not in ROUTERS:
            _fail("router", self.router, f"must be one of {ROUTERS}")
        if self.activation not in ACTIVATIONS:
            _fail("activation", self.activation, f"must be one of {ACTIVATIONS}")
        if self.drop_priority not in DROP_PRIORITIES:
            _fail("drop_priority", self.drop_priority, f"must be one of {DROP_PRIORITIES}")
        if self.second_expert_policy not in SECOND_EXPERT_POLICIES:
            _fail(
                "second_expert_policy",
                self.second_expert_policy,
                f"must be one of {SECOND_EXPERT_POLICIES}",
            )
        if self.expert_impl not in EXPERT_IMPLS:
            _fail("expert_impl", self.expert_impl, f"must be one of {EXPERT_IMPLS}")
        if self.routing_group not in ROUTING_GROUPS:
            _fail("routing_group", self.routing_group, f"must be one of {ROUTING_GROUPS}")
        if self.expert_capacity is not None and (
            not isinstance(self.expert_capacity, int) or isinstance(self.expert_capacity, bool)
            or self.expert_capacity < 1
        ):
            _fail("expert_capacity", self.expert_capacity, "must be None or an integer >= 1")
        if self.router == "expert_choice" and (self.expert_capacity is not None or self.routing_group != "batch"):
            _fail("router", self.router, "expert choice sets its own capacity: use expert_capacity=None, "
                  "routing_group='batch'")
        if self.top_k > self.num_experts:
            _fail("top_k", self.top_k, f"must be <= num_experts={self.num_experts}")
        if self.router == "switch" and self.top_k != 1:
            _fail("top_k", self.top_k, "router='switch' routes each token to exactly 1 expert")
        if self.router == "gshard" and self.top_k != 2:
            _fail("top_k", self.top_k, "router='gshard' routes each token to exactly 2 experts")
        if self.router == "noisy_topk" and self.top_k >= self.num_experts:
            _fail(
                "top_k",
                self.top_k,
                f"router='noisy_topk' needs top_k < num_experts={self.num_experts} "
                "(its load estimate compares against the (k+1)-th expert)",
            )
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                _fail(name, value, "must be None (dropless) or a finite number > 0")
        if not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            _fail("min_capacity", self.min_capacity, "must be an integer >= 0")
        for name in (
            "balance_loss_coef",
            "z_loss_coef",
            "importance_loss_coef",
            "load_loss_coef",
            "router_jitter",
            "bias_update_rate",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                _fail(name, value, "must be a finite number >= 0")
        if self.router_jitter >= 1:
            _fail("router_jitter", self.router_jitter, "must be in [0, 1): x * U(1-eps, 1+eps)")
        if self.router_jitter > 0 and self.router != "switch":
            _fail("router_jitter", self.router_jitter, "input jitter applies to router='switch'")
        if not 0 < self.second_expert_threshold <= 1:
            _fail("second_expert_threshold", self.second_expert_threshold, "must be in (0, 1]")
        if not 0 <= self.expert_dropout < 1:
            _fail("expert_dropout", self.expert_dropout, "must be in [0, 1)")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            _fail("num_shared_experts", self.num_shared_experts, "must be an integer >= 0")
        if self.shared_expert_d_ff is not None and (
            not isinstance(self.shared_expert_d_ff, int) or self.shared_expert_d_ff < 1
        ):
            _fail("shared_expert_d_ff", self.shared_expert_d_ff, "must be None or an integer >= 1")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            _fail("shared_expert_gate", True, "needs num_shared_experts >= 1")
        if not math.isfinite(self.routed_scaling_factor) or self.routed_scaling_factor <= 0:
            _fail("routed_scaling_factor", self.routed_scaling_factor, "must be a number > 0")
        if not isinstance(self.n_group, int) or self.n_group < 1:
            _fail("n_group", self.n_group, "must be an integer >= 1")
        if self.num_experts % self.n_group != 0:
            _fail("n_group", self.n_group, f"must divide num_experts={self.num_experts}")
        if not isinstance(self.topk_group, int) or not 1 <= self.topk_group <= self.n_group:
            _fail("topk_group", self.topk_group, f"must be in [1, n_group={self.n_group}]")
        if self.n_group > 1:
            # The published group-limited routers: DeepSeek-V3's (sigmoid, top-2-sum group score)
            # and DeepSeek-V2's (softmax top-k, max group score).
            if not (self.router == "aux_free" or (self.router == "topk" and self.group_score == "max")):
                _fail(
                    "n_group",
                    self.n_group,
                    "group-limited routing applies to router='aux_free', or router='topk' with "
                    "group_score='max' (DeepSeek-V2)",
                )
            if self.topk_group * (self.num_experts // self.n_group) < self.top_k:
                _fail(
                    "topk_group",
                    self.topk_group,
                    f"topk_group * experts per group must be >= top_k={self.top_k}",
                )

        if self.group_score not in GROUP_SCORES:
            _fail("group_score", self.group_score, f"must be one of {GROUP_SCORES}")
        for name in ("swiglu_alpha", "swiglu_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                _fail(name, value, "must be a finite number > 0")
        for name in ("router_bias", "expert_biases"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be True or False")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MoEConfig:
        reject_unknown_fields(cls, values)
        return cls(**values)
