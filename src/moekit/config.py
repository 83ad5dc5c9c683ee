"""Validated configuration of one MoE layer.

Every field has a default and a reason; a bad value raises ``ValueError`` at construction,
naming the field, the value and what is allowed. Nothing is clamped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
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


class ConfigError(ValueError):
    """A config field holding a value it cannot take.

    The message reads ``Owner.field=value is invalid: allowed``; the parts stay as attributes so
    that a caller (the ``moekit`` command) can name the flag the user typed instead of the field.
    """

    def __init__(self, owner: str, field: str, value: Any, allowed: str) -> None:
        self.owner, self.field, self.value, self.allowed = owner, field, value, allowed
        super().__init__(f"{owner}.{field}={value!r} is invalid: {allowed}")


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool, not nan or ±inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError("MoEConfig", field, value, allowed)


# Routers that send every token to a fixed number of experts: their top_k is not a choice.
ROUTER_TOP_K = {"switch": 1, "gshard": 2}


@dataclass
class MoEConfig:
    """One MoE layer. Each field's ``metadata["help"]`` says what it is and why its default;
    ``moekit train`` derives one flag per field from it (see ``moekit.cli.train``)."""

    d_model: int = field(default=512, metadata={"help": "token width in and out (= the model's d_model)"})
    d_ff: int = field(default=1024, metadata={"help": "hidden size of one routed expert"})
    num_experts: int = field(default=8, metadata={"help": "routed experts per MoE layer"})
    top_k: int = field(default=2, metadata={
        "help": "experts per token; when not given, router switch sets 1 and gshard 2 (with_changes)"})
    router: str = field(default="topk", metadata={"help": "how tokens pick experts", "choices": ROUTERS})
    activation: str = field(default="swiglu", metadata={
        "help": "expert FFN: swiglu (Mixtral), gelu or relu (Switch, GShard)", "choices": ACTIVATIONS})

    # Capacity: C = max(min_capacity, ceil(capacity_factor * T * k / E)).
    capacity_factor: float | None = field(default=None, metadata={
        "help": "training capacity factor: C = max(min_capacity, ceil(factor * T * k / E)); none = dropless"})
    eval_capacity_factor: float | None = field(default=None, metadata={
        "help": "capacity factor in eval; none = dropless, so the output does not depend on the batch"})
    min_capacity: int = field(default=4, metadata={
        "help": "lower bound of C (DeepSpeed's default: keeps tiny batches from dropping everything)"})
    drop_priority: str = field(default="position", metadata={
        "help": "which tokens an over-full expert keeps: position (GShard/Switch), score (V-MoE BPR), random",
        "choices": DROP_PRIORITIES})
    # transformers' SwitchTransformersConfig.expert_capacity.
    expert_capacity: int | None = field(default=None, metadata={
        "help": "a fixed C per expert in training and eval, instead of the capacity factor; none = use the factor"})
    # Switch/Mesh-TF routing groups; transformers' Switch uses "sequence".
    routing_group: str = field(default="batch", metadata={
        "help": "tokens that share the capacity: batch (one forward) or sequence (each sequence on its own)",
        "choices": ROUTING_GROUPS})

    normalize_weights: bool = field(default=True, metadata={
        "help": "renormalize the top-k weights to sum to 1 (Mixtral)"})
    second_expert_policy: str = field(default="random", metadata={
        "help": "gshard: when the second expert is used (see routing.GShardRouter)", "choices": SECOND_EXPERT_POLICIES})
    second_expert_threshold: float = field(default=0.2, metadata={
        "help": "gshard threshold_random policy: threshold in (0, 1] (Mesh-TF's default 0.2)"})

    balance_loss_coef: float = field(default=1e-2, metadata={
        "help": "weight of the Switch balance loss (Switch Transformers' alpha)"})
    z_loss_coef: float = field(default=1e-3, metadata={"help": "weight of the router z-loss (ST-MoE's recommendation)"})
    importance_loss_coef: float = field(default=0.1, metadata={
        "help": "noisy_topk: importance loss weight (Shazeer et al. 2017 w_importance)"})
    load_loss_coef: float = field(default=0.1, metadata={
        "help": "noisy_topk: load loss weight (Shazeer et al. 2017 w_load)"})
    router_jitter: float = field(default=0.0, metadata={
        "help": "switch: multiplicative router input noise eps in [0, 1) (Switch used 1e-2)"})

    num_shared_experts: int = field(default=0, metadata={
        "help": "dense experts every token goes through (DeepSeekMoE)"})
    shared_expert_d_ff: int | None = field(default=None, metadata={
        "help": "hidden size of one shared expert; none = d_ff"})
    shared_expert_gate: bool = field(default=False, metadata={
        "help": "sigmoid gate on the shared experts' output (Qwen2-MoE)"})
    expert_dropout: float = field(default=0.0, metadata={
        "help": "dropout on the expert hidden layer, in [0, 1) (Switch fine-tuning)"})

    # aux_free (DeepSeek-V3) routing.
    routed_scaling_factor: float = field(default=1.0, metadata={
        "help": "topk and aux_free: multiplies the routed experts' combine weights (DeepSeek-V2; 1 = off)"})
    n_group: int = field(default=1, metadata={"help": "aux_free: expert groups for group-limited routing (1 = off)"})
    topk_group: int = field(default=1, metadata={"help": "aux_free: groups a token may route to"})
    bias_update_rate: float = field(default=1e-3, metadata={
        "help": "aux_free: gamma of the expert bias update (DeepSeek-V3 used 0.001)"})

    expert_impl: str = field(default="auto", metadata={
        "help": "auto: grouped GEMM when available, else the per-expert loop", "choices": EXPERT_IMPLS})
    check_finite: bool = field(default=True, metadata={
        "help": "raise on non-finite router logits (one host sync per forward)"})

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
            if not is_int(value) or value < 1:
                _fail(name, value, "must be an integer >= 1")
        for name in ("normalize_weights", "shared_expert_gate", "check_finite"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")
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
        if not is_int(self.min_capacity) or self.min_capacity < 0:
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
            if not is_finite_number(value) or value < 0:
                _fail(name, value, "must be a finite number >= 0")
        if self.router_jitter >= 1:
            _fail("router_jitter", self.router_jitter, "must be in [0, 1): x * U(1-eps, 1+eps)")
        if self.router_jitter > 0 and self.router != "switch":
            _fail("router_jitter", self.router_jitter, "input jitter applies to router='switch'")
        if not is_finite_number(self.second_expert_threshold) or not 0 < self.second_expert_threshold <= 1:
            _fail("second_expert_threshold", self.second_expert_threshold, "must be in (0, 1]")
        if not is_finite_number(self.expert_dropout) or not 0 <= self.expert_dropout < 1:
            _fail("expert_dropout", self.expert_dropout, "must be in [0, 1)")
        if not is_int(self.num_shared_experts) or self.num_shared_experts < 0:
            _fail("num_shared_experts", self.num_shared_experts, "must be an integer >= 0")
        if self.shared_expert_d_ff is not None and (
            not is_int(self.shared_expert_d_ff) or self.shared_expert_d_ff < 1
        ):
            _fail("shared_expert_d_ff", self.shared_expert_d_ff, "must be None or an integer >= 1")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            _fail("shared_expert_gate", True, "needs num_shared_experts >= 1")
        if not is_finite_number(self.routed_scaling_factor) or self.routed_scaling_factor <= 0:
            _fail("routed_scaling_factor", self.routed_scaling_factor, "must be a finite number > 0")
        if not is_int(self.n_group) or self.n_group < 1:
            _fail("n_group", self.n_group, "must be an integer >= 1")
        if self.num_experts % self.n_group != 0:
            _fail("n_group", self.n_group, f"must divide num_experts={self.num_experts}")
        if not is_int(self.topk_group) or not 1 <= self.topk_group <= self.n_group:
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

    def with_changes(self, **changes: Any) -> MoEConfig:
        """This config with ``changes`` applied and validated, following the router's rule:
        a router that routes every token to a fixed number of experts (``ROUTER_TOP_K``: switch 1,
        gshard 2) sets ``top_k`` to that number unless ``changes`` gives ``top_k`` itself (a
        given top_k that disagrees is then an error, not silently replaced)."""
        router = changes.get("router", self.router)
        if "top_k" not in changes and router in ROUTER_TOP_K:
            changes["top_k"] = ROUTER_TOP_K[router]
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MoEConfig:
        reject_unknown_fields(cls, values)
        return cls(**values)
