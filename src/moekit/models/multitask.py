"""Multi-task mixtures of experts: MMoE, one-gate MoE, shared-bottom, CGC and PLE.

Shape suffixes: T samples, D input features, E experts, H expert hidden units, K tasks,
R replicas (independent copies trained as one model, see ``ReplicaStack``).

Notable features
- ``MMoE`` (Ma et al., KDD 2018, eq. 5-6): experts f_e shared by all tasks and one gate per
  task, y_k = h_k(Σ_e g^k(x)_e f_e(x)), g^k(x) = softmax(W_gk x). Each gate is a moekit
  ``TopKRouter``: softmax over all experts by default, or sparse top-k gating per task
  (``top_k``), where only the (sample, expert) pairs some task selected are computed, through
  moekit's grouped GEMM.
- ``OMoE``: the same with one gate shared by every task (the paper's eq. 4-5 baseline).
- ``SharedBottom`` (Caruana 1997): one hidden layer shared by all tasks.
- ``CGC`` / ``PLE`` (Tang et al., RecSys 2020, eq. 1-5): task-specific plus shared experts;
  task k's gate mixes its own and the shared experts; PLE stacks extraction levels, an upper
  level's task-k experts and gate take the previous level's task-k output, and every
  non-final level has a shared gate over all experts that feeds the next level's shared
  experts. CGC is PLE with one level.
- Per-task towers (one hidden ReLU layer), any number of tasks, regression or binary
  classification per task, per-task loss masks (``task_losses``).
- Per-task gate statistics over a dataset (MMoE Fig. 6, PLE Fig. 8); their plot is research
  code, in ``moekit.experiments.multitask.plots``.
- ``ReplicaStack``: many independently initialized copies of one model trained as one model
  whose parameters carry a leading replica axis (``torch.func.stack_module_state`` +
  ``vmap(functional_call)``); with an elementwise optimizer such as Adam, one step on the
  stack equals one step on each copy.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.experts import GroupedMatmul, activate
from moekit.routing import TopKRouter

TASK_KINDS = ("regression", "binary")
ARCHITECTURES = ("mmoe", "omoe", "shared_bottom", "cgc", "ple")


def _fail(field: str, value: object, allowed: str) -> None:
    raise ValueError(f"MultiTaskConfig.{field}={value!r} is invalid: {allowed}")


@dataclass
class MultiTaskConfig:
    d_in: int = 100  # input features
    task_kinds: tuple[str, ...] = ("regression", "regression")  # one per task: regression or binary
    task_names: tuple[str, ...] | None = None  # for tables and plots; None = task0, task1, ...
    num_experts: int = 8  # MMoE / OMoE: experts shared by all tasks (the MMoE paper used 8)
    expert_hidden: int = 16  # units of each expert's one ReLU layer (MMoE paper: 16)
    tower_hidden: int = 8  # units of each task tower's one ReLU layer (MMoE paper: 8)
    bottom_hidden: int = 113  # SharedBottom: units of the shared layer (parameter-matched to MMoE)
    top_k: int | None = None  # MMoE: None = softmax over all experts; k = sparse top-k gate per task
    num_task_experts: int = 1  # CGC / PLE: experts owned by each task
    num_shared_experts: int = 1  # CGC / PLE: experts shared by all tasks
    num_levels: int = 1  # PLE extraction levels; CGC is 1

    def __post_init__(self) -> None:
        self.task_kinds = tuple(self.task_kinds)
        if self.task_names is not None:
            self.task_names = tuple(self.task_names)
        for name in ("d_in", "num_experts", "expert_hidden", "tower_hidden", "bottom_hidden", "num_levels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "must be an integer >= 1")
        for name in ("num_task_experts", "num_shared_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(name, value, "must be an integer >= 0")
        if self.num_task_experts + self.num_shared_experts < 1:
            _fail("num_task_experts", self.num_task_experts, "CGC/PLE need at least one expert per gate")
        if len(self.task_kinds) < 1:
            _fail("task_kinds", self.task_kinds, "needs at least one task")
        for kind in self.task_kinds:
            if kind not in TASK_KINDS:
                _fail("task_kinds", self.task_kinds, f"every entry must be one of {TASK_KINDS}")
        if self.task_names is not None and len(self.task_names) != len(self.task_kinds):
            _fail("task_names", self.task_names, f"needs one name per task ({len(self.task_kinds)})")
        if self.top_k is not None and (
            not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 1 <= self.top_k <= self.num_experts
        ):
            _fail("top_k", self.top_k, f"must be None (dense softmax gate) or an integer in [1, {self.num_experts}]")

    @property
    def num_tasks(self) -> int:
        return len(self.task_kinds)

    @property
    def names(self) -> tuple[str, ...]:
        return self.task_names if self.task_names is not None else tuple(f"task{k}" for k in range(self.num_tasks))


class MultiTaskOutput(NamedTuple):
    predictions_TK: Tensor  # regression value or binary logit per task
    gates: dict[str, Tensor]  # gate name -> [T, E] combine weights (each row sums to one)


class ExpertLayer(nn.Module):
    """E experts of one ReLU layer each (the MMoE paper's experts).

    The weights are laid out as moekit's ``GroupedExperts`` holds its first projection,
    ``w_in`` [E, D, H], plus a bias ``b_in`` [E, H]. Dense use runs all experts as one
    matmul; ``forward_selected`` runs only the selected (sample, expert) pairs as one
    grouped GEMM over the expert groups (moekit's ``experts`` path).
    """

    def __init__(self, num_experts: int, d_in: int, d_hidden: int) -> None:
        super().__init__()
        self.num_experts, self.d_in, self.d_hidden = num_experts, d_in, d_hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, d_in, d_hidden))
        self.b_in = nn.Parameter(torch.empty(num_experts, d_hidden))
        # Per expert, nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(d_in)
        nn.init.uniform_(self.w_in, -bound, bound)
        nn.init.uniform_(self.b_in, -bound, bound)

    def forward(self, x_TD: Tensor) -> Tensor:
        """Every expert on every sample: [T, E, H]."""
        w_DX = self.w_in.permute(1, 0, 2).reshape(self.d_in, self.num_experts * self.d_hidden)
        h_TEH = (x_TD @ w_DX).reshape(x_TD.shape[0], self.num_experts, self.d_hidden) + self.b_in
        return activate(h_TEH, "relu")

    def forward_selected(self, x_TD: Tensor, routing_map_TE: Tensor) -> Tensor:
        """Only the pairs where routing_map is True are computed; the others are zero: [T, E, H]."""
        expert_idx_N, token_idx_N = routing_map_TE.t().nonzero(as_tuple=True)  # expert-major order
        counts_E = routing_map_TE.sum(dim=0)
        group_ends_E = counts_E.cumsum(0).to(torch.int32)
        rows_ND = x_TD[token_idx_N].contiguous()
        h_NH = GroupedMatmul.apply(rows_ND, self.w_in, group_ends_E, counts_E.tolist(), "auto")
        h_NH = activate(h_NH + self.b_in[expert_idx_N], "relu")
        out_TEH = x_TD.new_zeros(x_TD.shape[0], self.num_experts, self.d_hidden)
        return out_TEH.index_put((token_idx_N, expert_idx_N), h_NH)


class Gate(nn.Module):
    """A softmax gate over E experts, g(x) = softmax(W_g x) (MMoE eq. 6), as a moekit router.

    top_k=None: dense softmax over all experts. top_k=k: moekit's TopKRouter keeps each
    sample's k best experts with their weights renormalized to sum to one; the returned
    [T, E] weights are zero elsewhere.
    """

    def __init__(self, d_in: int, num_experts: int, top_k: int | None = None) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = TopKRouter(
            MoEConfig(d_model=d_in, d_ff=1, num_experts=num_experts, top_k=top_k or 1, normalize_weights=True)
        )

    def forward(self, x_TD: Tensor) -> Tensor:
        if self.top_k is None:
            return self.router.compute_logits(x_TD).softmax(dim=-1).to(x_TD.dtype)
        assignments = self.router.route(x_TD).assignments
        weights_TE = x_TD.new_zeros(x_TD.shape[0], self.router.num_experts)
        return weights_TE.index_put(
            (assignments.token_idx_N, assignments.expert_idx_N), assignments.weight_N.to(x_TD.dtype)
        )


class Tower(nn.Module):
    """A task's tower h_k: one ReLU layer, then one output (a value or a logit)."""

    def __init__(self, d_in: int, d_hidden: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(d_in, d_hidden)
        self.out = nn.Linear(d_hidden, 1)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.out(F.relu(self.hidden(x_TD))).squeeze(-1)


def _mix(gate_TE: Tensor, experts_TEH: Tensor) -> Tensor:
    """Σ_e g(x)_e f_e(x): [T, H]."""
    return torch.einsum("te,teh->th", gate_TE, experts_TEH)


class MultiTaskModel(nn.Module):
    def __init__(self, config: MultiTaskConfig) -> None:
        super().__init__()
        self.config = config

    def _towers(self, d_in: int) -> nn.ModuleList:
        return nn.ModuleList(Tower(d_in, self.config.tower_hidden) for _ in range(self.config.num_tasks))

    def task_gate_names(self) -> list[str]:
        """The gate each task's output is mixed by (in its last level), in task order."""
        return [f"task{k}" for k in range(self.config.num_tasks)]


class MMoE(MultiTaskModel):
    """Multi-gate mixture of experts (Ma et al. 2018): one gate per task over shared experts."""

    def __init__(self, config: MultiTaskConfig) -> None:
        super().__init__(config)
        self.experts = ExpertLayer(config.num_experts, config.d_in, config.expert_hidden)
        self.gates = nn.ModuleList(
            Gate(config.d_in, config.num_experts, config.top_k) for _ in range(config.num_tasks)
        )
        self.towers = self._towers(config.expert_hidden)

    def forward(self, x_TD: Tensor) -> MultiTaskOutput:
        gates_TE = [gate(x_TD) for gate in self.gates]
        if self.config.top_k is None:
            experts_TEH = self.experts(x_TD)
        else:
            routing_map_TE = torch.stack(gates_TE).ne(0).any(dim=0)
            experts_TEH = self.experts.forward_selected(x_TD, routing_map_TE)
        preds = [tower(_mix(g_TE, experts_TEH)) for tower, g_TE in zip(self.towers, gates_TE, strict=True)]
        return MultiTaskOutput(torch.stack(preds, dim=-1), {f"task{k}": g for k, g in enumerate(gates_TE)})


class OMoE(MultiTaskModel):
    """One-gate mixture of experts: the experts' mixture, by one gate, feeds every tower."""

    def __init__(self, config: MultiTaskConfig) -> None:
        super().__init__(config)
        self.experts = ExpertLayer(config.num_experts, config.d_in, config.expert_hidden)
        self.gate = Gate(config.d_in, config.num_experts)
        self.towers = self._towers(config.expert_hidden)

    def forward(self, x_TD: Tensor) -> MultiTaskOutput:
        gate_TE = self.gate(x_TD)
        mixed_TH = _mix(gate_TE, self.experts(x_TD))
        preds = [tower(mixed_TH) for tower in self.towers]
        return MultiTaskOutput(torch.stack(preds, dim=-1), {f"task{k}": gate_TE for k in range(len(preds))})


class SharedBottom(MultiTaskModel):
    """Shared-bottom multi-task network (Caruana 1997): one ReLU layer shared by all towers."""

    def __init__(self, config: MultiTaskConfig) -> None:
        super().__init__(config)
        self.bottom = nn.Linear(config.d_in, config.bottom_hidden)
        self.towers = self._towers(config.bottom_hidden)

    def forward(self, x_TD: Tensor) -> MultiTaskOutput:
        bottom_TH = F.relu(self.bottom(x_TD))
        return MultiTaskOutput(torch.stack([tower(bottom_TH) for tower in self.towers], dim=-1), {})

    def task_gate_names(self) -> list[str]:
        return []


class PLE(MultiTaskModel):
    """Progressive layered extraction (Tang et al. 2020); ``num_levels=1`` is CGC.

    Level j (eq. 1-5): task k's experts E_k^j and the shared experts E_s^j; task k's gate
    g^{k,j} = softmax(W^{k,j} · input_k) mixes [E_k^j(input_k), E_s^j(input_s)]; every non-final
    level also has a shared gate over all experts of the level, mixing them for the next
    level's shared input. At level 1 every input is x.
    """

    def __init__(self, config: MultiTaskConfig) -> None:
        super().__init__(config)
        num_tasks, task_e, shared_e = config.num_tasks, config.num_task_experts, config.num_shared_experts
        self.levels = nn.ModuleList()
        for level in range(config.num_levels):
            d_in = config.d_in if level == 0 else config.expert_hidden
            last = level == config.num_levels - 1
            modules = nn.ModuleDict()
            if task_e:
                modules["task_experts"] = nn.ModuleList(
                    ExpertLayer(task_e, d_in, config.expert_hidden) for _ in range(num_tasks)
                )
            if shared_e:
                modules["shared_experts"] = ExpertLayer(shared_e, d_in, config.expert_hidden)
            modules["task_gates"] = nn.ModuleList(Gate(d_in, task_e + shared_e) for _ in range(num_tasks))
            if not last:
                modules["shared_gate"] = Gate(d_in, num_tasks * task_e + shared_e)
            self.levels.append(modules)
        self.towers = self._towers(config.expert_hidden)

    def forward(self, x_TD: Tensor) -> MultiTaskOutput:
        num_tasks = self.config.num_tasks
        task_in = [x_TD] * num_tasks
        shared_in = x_TD
        gates: dict[str, Tensor] = {}
        last_level = len(self.levels) - 1
        for level, modules in enumerate(self.levels):
            shared_TEH = modules["shared_experts"](shared_in) if "shared_experts" in modules else None
            own_TEH = (
                [experts(task_in[k]) for k, experts in enumerate(modules["task_experts"])]
                if "task_experts" in modules
                else [None] * num_tasks
            )
            outputs = []
            for k, gate in enumerate(modules["task_gates"]):
                pool_TEH = torch.cat([t for t in (own_TEH[k], shared_TEH) if t is not None], dim=1)
                gate_TE = gate(task_in[k])
                gates[f"task{k}" if level == last_level else f"level{level}/task{k}"] = gate_TE
                outputs.append(_mix(gate_TE, pool_TEH))
            if "shared_gate" in modules:
                pool_TEH = torch.cat([t for t in (*own_TEH, shared_TEH) if t is not None], dim=1)
                gate_TE = modules["shared_gate"](shared_in)
                gates[f"level{level}/shared"] = gate_TE
                shared_in = _mix(gate_TE, pool_TEH)
            task_in = outputs
        preds = [tower(h_TH) for tower, h_TH in zip(self.towers, task_in, strict=True)]
        return MultiTaskOutput(torch.stack(preds, dim=-1), gates)


class CGC(PLE):
    """Customized gate control (Tang et al. 2020, §4.2): one PLE level."""

    def __init__(self, config: MultiTaskConfig) -> None:
        if config.num_levels != 1:
            _fail("num_levels", config.num_levels, "CGC has exactly one level (use PLE for more)")
        super().__init__(config)


def build_multitask(architecture: str, config: MultiTaskConfig) -> MultiTaskModel:
    classes = {"mmoe": MMoE, "omoe": OMoE, "shared_bottom": SharedBottom, "cgc": CGC, "ple": PLE}
    if architecture not in classes:
        raise ValueError(f"architecture={architecture!r} is invalid: use one of {ARCHITECTURES}")
    return classes[architecture](config)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def task_losses(
    predictions_TK: Tensor, targets_TK: Tensor, task_kinds: Sequence[str], mask_TK: Tensor | None = None
) -> Tensor:
    """Per-task mean loss over the samples that have the task's label: [K].

    Regression: squared error; binary: cross-entropy on the logit. A sample whose mask is
    False for task k adds nothing to task k's loss or gradient, whatever its target holds
    (NaN included). A task with no labelled sample in the batch has loss 0.
    """
    if predictions_TK.shape != targets_TK.shape or predictions_TK.shape[-1] != len(task_kinds):
        raise ValueError(
            f"predictions {tuple(predictions_TK.shape)} and targets {tuple(targets_TK.shape)} must both be "
            f"[..., {len(task_kinds)}] (one column per task)"
        )
    if mask_TK is None:
        mask_TK = torch.ones_like(targets_TK, dtype=torch.bool)
    elif mask_TK.shape != targets_TK.shape:
        raise ValueError(f"mask shape {tuple(mask_TK.shape)} must equal the targets' {tuple(targets_TK.shape)}")
    mask_TK = mask_TK.bool()
    # NOTE: masked targets are replaced before the loss, so a NaN there cannot reach a gradient.
    targets_TK = torch.where(mask_TK, targets_TK, torch.zeros_like(targets_TK))
    losses = []
    for k, kind in enumerate(task_kinds):
        pred, target = predictions_TK[..., k], targets_TK[..., k]
        if kind == "regression":
            per_sample = (pred - target).square()
        else:
            per_sample = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        mask = mask_TK[..., k]
        per_sample = torch.where(mask, per_sample, torch.zeros_like(per_sample))
        losses.append(per_sample.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1))
    return torch.stack(losses, dim=-1)


# --------------------------------------------------------------------------------------------
# Gate statistics
# --------------------------------------------------------------------------------------------


@dataclass
class GateStatistics:
    """Each task's gate weights over a dataset: mean and standard deviation per expert."""

    task_names: list[str]
    mean_KE: Tensor
    std_KE: Tensor

    def to_dict(self) -> dict:
        return {
            name: {"mean": self.mean_KE[k].tolist(), "std": self.std_KE[k].tolist()}
            for k, name in enumerate(self.task_names)
        }


@torch.no_grad()
def gate_statistics(model: MultiTaskModel, x_TD: Tensor, batch_size: int = 4096) -> GateStatistics:
    """Mean and spread of each task's gate weights over the samples x (MMoE Fig. 6, PLE Fig. 8)."""
    names = model.task_gate_names()
    if not names:
        raise ValueError(f"{type(model).__name__} has no gates")
    was_training = model.training
    model.eval()
    chunks = [model(x_TD[i : i + batch_size]).gates for i in range(0, x_TD.shape[0], batch_size)]
    model.train(was_training)
    weights_KTE = torch.stack([torch.cat([c[name] for c in chunks]) for name in names]).float()
    return GateStatistics(list(model.config.names), weights_KTE.mean(dim=1), weights_KTE.std(dim=1))


# --------------------------------------------------------------------------------------------
# Replica-stacked training
# --------------------------------------------------------------------------------------------


class ReplicaStack(nn.Module):
    """R copies of one model as one module: every parameter gets a leading replica axis [R, ...].

    ``forward(x_RTD)`` runs replica r on x[r] (``vmap`` of ``functional_call``). The replicas
    share nothing: with a loss that sums the replicas' own losses, replica r's gradient is
    the gradient of its own loss, and an elementwise optimizer (Adam, SGD) steps each replica
    exactly as it would step alone. Dense gates only (top-k gating has data-dependent shapes).
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(models) == 0:
            raise ValueError("ReplicaStack needs at least one model, got 0")
        if any(type(m) is not type(models[0]) for m in models):
            raise ValueError("ReplicaStack needs models of one class")
        if getattr(getattr(models[0], "config", None), "top_k", None) is not None:
            raise ValueError("ReplicaStack supports dense gates only (config.top_k=None)")
        params, buffers = torch.func.stack_module_state(list(models))
        self.num_replicas = len(models)
        self._names = list(params)
        self.stacked = nn.ParameterDict({name.replace(".", "__"): nn.Parameter(params[name]) for name in params})
        self._buffers_stacked = buffers
        base = copy.deepcopy(models[0]).to("meta")
        object.__setattr__(self, "_base", base)  # not a submodule: its weights are the stacked ones

    def train(self, mode: bool = True) -> ReplicaStack:
        self._base.train(mode)
        return super().train(mode)

    def stacked_params(self) -> dict[str, Tensor]:
        return {name: self.stacked[name.replace(".", "__")] for name in self._names}

    def forward(self, x_RTD: Tensor) -> MultiTaskOutput:
        base = self._base

        def call(params: dict[str, Tensor], buffers: dict[str, Tensor], x_TD: Tensor) -> MultiTaskOutput:
            return torch.func.functional_call(base, (params, buffers), (x_TD,))

        return torch.vmap(call)(self.stacked_params(), self._buffers_stacked, x_RTD)

    def replica(self, index: int) -> nn.Module:
        """A standalone copy of replica ``index`` with its current weights."""
        model = copy.deepcopy(self._base).to_empty(device=_device(self))
        state = {name: value[index].detach().clone() for name, value in self.stacked_params().items()}
        state.update({name: value[index].clone() for name, value in self._buffers_stacked.items()})
        model.load_state_dict(state)
        return model


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
