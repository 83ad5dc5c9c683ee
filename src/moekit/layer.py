"""The MoE layer: a drop-in replacement for a Transformer's feed-forward block.

Data flow (DESIGN.md), shape suffixes T tokens, D d_model, E experts, N assignments:

    x [..., D] → x_TD → router → assignments → capacity → dispatch plan
              → experts (grouped GEMM) → combine → (+ shared experts) → y [..., D]

Masked (padding) tokens are taken out before routing and get 0 from the layer, so they are
in no loss and no statistic. The weighted auxiliary losses and the routing statistics of
the most recent forward are kept on the layer (``last_aux_loss``, ``last_stats``) and read
by ``moekit.aux_loss(model)`` and ``moekit.routing_stats(model)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from moekit import matvec
from moekit.capacity import apply_capacity, expert_capacity, expert_choice_capacity
from moekit.config import MoEConfig
from moekit.dispatch import LocalDispatcher
from moekit.experts import GroupedExperts, ModuleExperts, SharedExperts, hidden_width
from moekit.fused import fused_experts
from moekit.losses import balance_loss, z_loss
from moekit.routing import (
    Assignments,
    AuxFreeRouter,
    ExpertChoiceRouter,
    NonFiniteRouterLogitsError,
    RoutingResult,
    TopKRouter,
    build_router,
)

__all__ = ["MoE", "NonFiniteRouterLogitsError", "aux_loss", "moe_layers", "routing_stats", "update_expert_bias"]
from moekit.stats import RawRoutingStats, RoutingStats


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    A user's ``y.sum().backward()`` sends an expanded zero-stride gradient, which CPU
    grouped_mm rejects; every path inside the layer then sees a dense gradient.
    """

    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


class MoE(nn.Module):
    """Sparse Mixture-of-Experts feed-forward layer.

    ``MoE(config)`` builds grouped SwiGLU/GELU/ReLU experts; ``MoE(config, experts=[...])``
    routes to any modules mapping [n, d_model] to [n, d_model] (MoE layers included, for a
    hierarchical MoE). ``forward(x, token_mask=None)`` maps [..., d_model] to the same shape.
    """

    def __init__(self, config: MoEConfig, experts: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MoE expects a MoEConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.router = build_router(config)
        if experts is None:
            self.experts: GroupedExperts | ModuleExperts = GroupedExperts(config)
        else:
            if len(experts) != config.num_experts:
                raise ValueError(
                    f"MoE got {len(experts)} expert modules but MoEConfig.num_experts="
                    f"{config.num_experts}; they must be equal"
                )
            self.experts = ModuleExperts(experts)
        self.shared_experts = SharedExperts(config) if config.num_shared_experts > 0 else None
        self.dispatcher = LocalDispatcher(config.num_experts)
        # NOTE: the fused permute-experts-combine Function is the fast path; the unfused
        # one (plain autograd) is the readable spec and serves dropout and module experts.
        self.fused = True
        # Eval forwards of at most this many tokens (batch-1 decoding) run each assignment's
        # expert directly instead of sorting and grouping (GroupedExperts.forward_per_assignment).
        # NOTE: 1 keeps the output bitwise equal to the normal path (every expert gets one row
        # on both); above 1, an expert with two rows may run another GEMM kernel and round
        # differently in the last bit.
        self.decode_fast_path_tokens = 1
        self.last_aux_loss: Tensor | None = None
        self.last_aux_losses: dict[str, Tensor] = {}
        self.last_stats: RawRoutingStats | None = None

    def __getstate__(self) -> dict:
        # NOTE: the weighted aux losses of the last forward are nodes of that forward's autograd
        # graph, which deepcopy refuses ("Only Tensors created explicitly by the user (graph
        # leaves) support the deepcopy protocol"). A copy (EMA / SWA weights, a best-model
        # snapshot, pickling) starts without them, as a layer that has not run a training
        # forward; the original keeps them, so aux_loss(model) still backprops into its router.
        # The routing statistics are detached tensors and are copied.
        state = super().__getstate__()
        state["last_aux_loss"] = None
        state["last_aux_losses"] = {}
        return state

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"router={c.router}, experts={c.num_experts}, top_k={c.top_k}, "
            f"capacity_factor={c.capacity_factor}"
        )

    def route(self, x_TD: Tensor, capacity_factor: float | None) -> RoutingResult:
        """The router's assignments; expert choice gets its capacity C from the layer."""
        if isinstance(self.router, ExpertChoiceRouter):
            c = self.config
            capacity = expert_choice_capacity(x_TD.shape[0], c.num_experts, c.top_k, capacity_factor, c.min_capacity)
            return self.router.route(x_TD, capacity)
        return self.router.route(x_TD)

    @property
    def active_capacity_factor(self) -> float | None:
        return self.config.capacity_factor if self.training else self.config.eval_capacity_factor

    def _check_input(self, x: Tensor, token_mask: Tensor | None) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"MoE.forward expects a Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.config.d_model:
            raise ValueError(
                f"MoE input's last dimension is {x.shape[-1] if x.dim() else 'missing'} "
                f"but d_model={self.config.d_model}; x has shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"MoE input must be a floating-point tensor, got {x.dtype}")
        if token_mask is not None:
            if token_mask.dtype != torch.bool:
                raise TypeError(
                    f"token_mask must be a bool tensor (True = real token), got {token_mask.dtype}"
                )
            if tuple(token_mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"token_mask has shape {tuple(token_mask.shape)} but x's leading shape is "
                    f"{tuple(x.shape[:-1])}; they must be equal"
                )

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        self._check_input(x, token_mask)
        config = self.config
        x_TD = x.reshape(-1, config.d_model)
        valid_idx = None
        if token_mask is not None:
            valid_idx = token_mask.reshape(-1).nonzero().squeeze(1)
            x_TD = x_TD.index_select(0, valid_idx)
        num_tokens = x_TD.shape[0]

        capacity_factor = self.active_capacity_factor
        if valid_idx is None and num_tokens == 1 and self._one_call_decode_applies(x_TD, capacity_factor):
            return self._one_call_decode(x, x_TD)
        # Raises NonFiniteRouterLogitsError on NaN/inf logits (Router.checked_logits).
        routing = self.route(x_TD, capacity_factor)
        assignments = routing.assignments
        num_routed = len(assignments)
        if valid_idx is None and self._decode_fast_path(num_tokens, capacity_factor, routing):
            y_TD = self.experts.forward_per_assignment(
                x_TD, assignments.token_idx_N, assignments.expert_idx_N, assignments.weight_N
            ).to(x.dtype)
            if self.shared_experts is not None:
                y_TD = y_TD + self.shared_experts(x_TD)
            tokens_per_expert_E = torch.bincount(assignments.expert_idx_N, minlength=config.num_experts)
            self._record(routing, num_routed, tokens_per_expert_E, assignments.token_idx_N, num_tokens, None)
            # No gradient to make contiguous under no_grad/inference_mode: skip the Function call.
            if not torch.is_grad_enabled():
                return y_TD.reshape(x.shape)
            return _ContiguousGrad.apply(y_TD.reshape(x.shape))
        capacity = routing.capacity
        if routing.capacity is None and (capacity_factor is not None or config.expert_capacity is not None):
            group_idx_T = None
            group_tokens, num_groups = num_tokens, 1
            if config.routing_group == "sequence" and x.dim() >= 3:
                group_tokens = x.shape[-2]
                num_groups = math.prod(x.shape[:-2])
                token_idx_T = valid_idx if valid_idx is not None else torch.arange(num_tokens, device=x.device)
                group_idx_T = token_idx_T // group_tokens
            if config.expert_capacity is not None:
                capacity = config.expert_capacity
            else:
                capacity = expert_capacity(
                    group_tokens, config.num_experts, config.top_k, capacity_factor, config.min_capacity
                )
            assignments, _ = apply_capacity(
                assignments, num_tokens, config.num_experts, capacity, config.drop_priority, group_idx_T, num_groups
            )
        plan = self.dispatcher.plan(assignments, num_tokens)

        experts = self.experts
        use_fused = (
            self.fused
            and self.dispatcher.fusable
            and isinstance(experts, GroupedExperts)
            and experts.fusable
            and plan.num_rows > 0
            and not (self.training and config.expert_dropout > 0)
        )
        if use_fused:
            assert isinstance(experts, GroupedExperts)
            y_TD = fused_experts(
                x_TD, assignments.weight_N, experts.w_in, experts.w_out, plan,
                config.activation, experts.impl,
            )
        else:
            x_rows_ND = self.dispatcher.dispatch(x_TD, plan)
            out_ND = experts(x_rows_ND, *self.dispatcher.expert_groups(plan))
            y_TD = self.dispatcher.combine(out_ND, assignments.weight_N, plan)
        y_TD = y_TD.to(x.dtype)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)

        self._record(
            routing, num_routed, plan.tokens_per_expert_E, assignments.token_idx_N, num_tokens, capacity
        )

        if valid_idx is not None:
            y_all_TD = y_TD.new_zeros(token_mask.numel(), config.d_model)  # type: ignore[union-attr]
            y_TD = y_all_TD.index_copy(0, valid_idx, y_TD)
        return _ContiguousGrad.apply(y_TD.reshape(x.shape))

    def _one_call_decode_applies(self, x_TD: Tensor, capacity_factor: float | None) -> bool:
        """One decoded token and the plain softmax top-k router (TopKRouter without expert
        groups, its ``route`` and the layer's not replaced, e.g. by a routing replay or
        recorder), with in-memory grouped experts that moekit.matvec reads (the whole layer in
        one C call) or experts that take one token's assignments (``one_token_fast_path``:
        offloaded and quantized experts, after the router's C call)."""
        router, experts, config = self.router, self.experts, self.config
        # NOTE: decided by the config's shapes, not by how the experts are held, so that a model
        # and its offloaded or quantized copy route with the same code (bit-exact offloading).
        smallest = min(config.d_model * hidden_width(config, config.d_ff), config.d_ff * config.d_model)
        return (
            not self.training and self.decode_fast_path_tokens >= 1 and capacity_factor is None
            and config.expert_capacity is None and type(router) is TopKRouter and config.n_group == 1
            and config.top_k <= 64 and "route" not in self.__dict__ and "route" not in router.__dict__
            and self.dispatcher.fusable and smallest >= matvec.MIN_WEIGHT_ELEMENTS
            and (type(experts) is GroupedExperts or getattr(experts, "one_token_fast_path", False))
            and matvec.applies_router(x_TD, router.weight)
        )

    def _one_call_decode(self, x: Tensor, x_TD: Tensor) -> Tensor:
        """The layer for one decoded token through ``matvec.route_experts_ffn``: the router's
        formulas (TopKRouter.route) and the experts' (GroupedExperts.forward_per_assignment) in
        C, without the ~25 small torch ops per layer that cost more than the router's math;
        the routing and statistics are recorded as the other paths record them. Other experts
        take the C call's choices (an offloaded model routes exactly as its in-memory twin)."""
        router, experts, config = self.router, self.experts, self.config
        stacked = self.stacked_experts(x_TD)
        w_in, w_out, b_in, b_out = stacked if stacked is not None else (None, None, None, None)
        routed = matvec.route_experts_ffn(
            x_TD, router.weight, router.bias, router.gate_in_activation_dtype and x_TD.dtype == torch.bfloat16,
            config.check_finite, config.top_k, config.normalize_weights, config.routed_scaling_factor,
            w_in, w_out, config.activation, config.swiglu_alpha, config.swiglu_limit, b_in, b_out,
        )
        if routed is None:
            raise NonFiniteRouterLogitsError(
                "router logits contain NaN or inf: check the layer input and router weights "
                "(MoEConfig.check_finite=False skips this check)"
            )
        if stacked is not None:
            assert routed.y_1D is not None
            y_TD = routed.y_1D
        else:
            assert isinstance(experts, GroupedExperts) or getattr(experts, "one_token_fast_path", False)
            y_TD = experts.forward_per_assignment(  # type: ignore[operator]
                x_TD, torch.zeros(config.top_k, dtype=torch.long), routed.expert_idx_K, routed.weight_K
            )
        self.record_routed_token(routed, stacked is not None)
        y_TD = y_TD.to(x.dtype)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.reshape(x.shape)

    def stacked_experts(self, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None:
        """The experts' stacked weights (w_in, w_out, b_in, b_out) when they run inside
        ``route_experts_ffn`` / ``lm_decode``: in-memory grouped experts, or experts held
        elsewhere that expose every expert at once (``stacked_weights``: an offloaded layer
        whose budget holds them all), that moekit.matvec reads, with contiguous biases of the
        weights' dtype; None otherwise."""
        experts = self.experts
        stacked_weights = getattr(experts, "stacked_weights", None)
        if type(experts) is not GroupedExperts and stacked_weights is None:
            return None
        stacked = stacked_weights() if stacked_weights is not None else None
        if stacked is None:
            return None
        w_in, w_out, b_in, b_out = stacked
        if not matvec.applies_experts(x_TD, w_in, w_out) or not all(
            b is None or (b.is_contiguous() and b.dtype == w_in.dtype) for b in (b_in, b_out)
        ):
            return None
        return stacked

    def record_routed_token(self, routed: matvec.RoutedToken, ran_stacked: bool) -> None:
        """Record one decoded token's routing from the C router (``route_experts_ffn`` or
        ``lm_decode``) as the layer's other paths record theirs (``last_stats``); when the
        experts ran on their stacked weights (``ran_stacked``), tell experts that count their
        uses (``record_use``: an offloaded layer's cache) which ones ran."""
        record_use = getattr(self.experts, "record_use", None)
        if ran_stacked and record_use is not None:
            record_use(routed.expert_idx_K.tolist())
        top_k = self.config.top_k
        token_idx_N = torch.zeros(top_k, dtype=torch.long)
        assignments = Assignments(
            token_idx_N, routed.expert_idx_K, routed.weight_K, torch.arange(top_k),
            routed.scores_1E[0].index_select(0, routed.expert_idx_K),
        )
        routing = RoutingResult(routed.logits_1E, routed.scores_1E, assignments, routed.counts_E.float())
        self._record(routing, top_k, routed.counts_E, token_idx_N, 1, None)

    def _decode_fast_path(self, num_tokens: int, capacity_factor: float | None, routing: RoutingResult) -> bool:
        """Eval, few tokens, dropless, local grouped experts, no token mask: nothing to sort or drop.

        Experts modules other than ``GroupedExperts`` take the path for one token when they set
        ``one_token_fast_path`` (moekit.inference's quantized and offloaded experts: their
        ``forward_per_assignment`` makes the same expert calls and combine as their generic path
        or in-memory counterpart, so the same sums)."""
        experts = self.experts
        per_assignment = isinstance(experts, GroupedExperts) or (
            num_tokens == 1 and getattr(experts, "one_token_fast_path", False)
        )
        return (
            per_assignment
            and not self.training
            and 0 < num_tokens <= self.decode_fast_path_tokens
            and capacity_factor is None
            and self.config.expert_capacity is None
            and routing.capacity is None
            and self.dispatcher.fusable
        )

    def _record(
        self,
        routing: RoutingResult,
        num_routed: int,
        tokens_per_expert_E: Tensor,
        kept_token_idx_N: Tensor,
        num_tokens: int,
        capacity: int | None,
    ) -> None:
        config = self.config
        losses: dict[str, Tensor] = {}
        if self.training:
            if config.balance_loss_coef > 0 and config.router != "expert_choice":
                losses["balance"] = config.balance_loss_coef * balance_loss(
                    routing.scores_TE, routing.selected_per_expert_E, config.top_k
                )
            if config.z_loss_coef > 0:
                losses["z"] = config.z_loss_coef * z_loss(routing.logits_TE)
            if "importance" in routing.router_losses and config.importance_loss_coef > 0:
                losses["importance"] = config.importance_loss_coef * routing.router_losses["importance"]
            if "load" in routing.router_losses and config.load_loss_coef > 0:
                losses["load"] = config.load_loss_coef * routing.router_losses["load"]
        self.last_aux_losses = losses
        self.last_aux_loss = sum(losses.values()) if losses else None  # type: ignore[assignment]
        with torch.no_grad():
            self.last_stats = RawRoutingStats(
                num_tokens=num_tokens,
                num_routed=num_routed,
                tokens_per_expert_E=tokens_per_expert_E.detach(),
                kept_token_idx_N=kept_token_idx_N.detach(),
                scores_TE=routing.scores_TE.detach(),
                capacity=capacity,
            )


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE layer inside ``model`` (itself and nested ones), with qualified names."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoE)]


@contextlib.contextmanager
def observe_routing(model: nn.Module, on_route: Callable[[str, RoutingResult, int], None]) -> Iterator[None]:
    """Within the block, every ``MoE.route`` of ``model``'s MoE layers (nested ones included)
    also calls ``on_route(layer name, result, tokens)``; the layers are restored on exit, even
    on an error. It wraps ``route`` on the layer instances, so the class and other models are
    untouched and the forward itself does no extra work outside the block."""
    def wrap(name: str, layer: MoE) -> Callable[[Tensor, float | None], RoutingResult]:
        original = layer.route  # the bound class method, or an outer block's wrapper

        def route(x_TD: Tensor, capacity_factor: float | None) -> RoutingResult:
            result = original(x_TD, capacity_factor)
            on_route(name, result, x_TD.shape[0])
            return result

        return route

    with wrapped_routes(model, wrap):
        yield


@contextlib.contextmanager
def wrapped_routes(
    model: nn.Module, wrap: Callable[[str, MoE], Callable[[Tensor, float | None], RoutingResult]]
) -> Iterator[list[tuple[str, MoE]]]:
    """Within the block, ``route`` of every MoE layer of ``model`` is ``wrap(name, layer)``, an
    instance attribute that may call the layer's ``route`` as it was (read before it is set);
    on exit each layer gets back exactly what it had, so blocks nest (a recording inside a
    replay records the replayed choices)."""
    layers = moe_layers(model)
    previous: list[tuple[MoE, Callable | None]] = []
    try:
        for name, layer in layers:
            previous.append((layer, layer.__dict__.get("route")))
            layer.route = wrap(name, layer)  # type: ignore[method-assign]  # an instance attribute
        yield layers
    finally:
        for layer, before in reversed(previous):
            if before is None:
                del layer.route  # the class method is visible again
            else:
                layer.route = before  # type: ignore[method-assign]


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the coefficient-weighted auxiliary losses of every MoE layer in ``model``
    (nested ones included) from its most recent forward; a 0-dim tensor, 0 when none."""
    total: Tensor | None = None
    for _, layer in moe_layers(model):
        if layer.last_aux_loss is not None:
            total = layer.last_aux_loss if total is None else total + layer.last_aux_loss
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


def update_expert_bias(model: nn.Module) -> None:
    """Apply the aux-loss-free bias update of every ``router='aux_free'`` layer; call once
    per optimizer step (after ``optimizer.step()``)."""
    for module in model.modules():
        if isinstance(module, AuxFreeRouter):
            module.update_bias()


def routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """Per MoE layer in ``model`` (qualified name → stats) from its most recent forward:
    tokens per expert, dropped fractions, router entropy, load CV and imbalance, empty
    experts. Layers that have not run yet are left out."""
    return {
        name: layer.last_stats.summarize()
        for name, layer in moe_layers(model)
        if layer.last_stats is not None
    }
