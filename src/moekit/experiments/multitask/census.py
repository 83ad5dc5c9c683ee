"""The MMoE paper's Census-Income benchmark (Ma et al., KDD 2018, §5.2, task group 1).

Shape suffixes: R replicas, B batch, N samples, D features, K tasks (income, marital).

Every architecture trains all its seeds at once as one ``ReplicaStack`` (the single-task
baseline: one replica per seed and task, each trained on its task alone). All architectures
see the same minibatch order per seed. After every epoch each replica is scored on the
validation half; a replica's reported test AUC is the one at its epoch of best mean
validation AUC over the tasks (early stopping on validation, as the paper selects models).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from moekit.experiments.multitask.census_data import TASK_NAMES, CensusData
from moekit.experiments.multitask.workers import run_parts
from moekit.models.multitask import (
    GateStatistics,
    MultiTaskConfig,
    ReplicaStack,
    build_multitask,
    gate_statistics,
    task_losses,
)

CENSUS_ARCHITECTURES = ("mmoe", "omoe", "shared_bottom", "ple", "single_task")
# The paper's Table 2 (group 1, test AUC): MMoE income 0.9359, marital 0.9927; shared-bottom 0.9295 / 0.9921.
PAPER_AUC = {"mmoe": (0.9359, 0.9927), "shared_bottom": (0.9295, 0.9921)}


def roc_auc(scores_N: Tensor, labels_N: Tensor) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic, ties counted one half:
    AUC = (Σ ranks of positives − P(P+1)/2) / (P·Q), ranks averaged over ties."""
    labels_N = labels_N.bool()
    num_pos = int(labels_N.sum())
    num_neg = labels_N.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"AUC needs both classes, got {num_pos} positives and {num_neg} negatives")
    scores = scores_N.double()
    order = scores.argsort()
    sorted_scores = scores[order]
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average_rank = ends - (counts.double() - 1) / 2  # 1-based ranks, averaged over each tie group
    ranks = torch.empty_like(scores)
    ranks[order] = average_rank[inverse]
    return float((ranks[labels_N].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


@dataclass
class CensusSettings:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    architectures: tuple[str, ...] = CENSUS_ARCHITECTURES
    epochs: int = 4
    batch_size: int = 1024
    lr: float = 2e-3  # Adam
    num_experts: int = 8
    expert_hidden: int = 16
    tower_hidden: int = 8
    ple_task_experts: int = 3  # PLE: 2 levels of 3 experts per task + 2 shared (8 experts per level)
    ple_shared_experts: int = 2

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "num_experts", "expert_hidden", "tower_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")
        for arch in self.architectures:
            if arch not in CENSUS_ARCHITECTURES:
                raise ValueError(f"architecture {arch!r} is invalid: use one of {CENSUS_ARCHITECTURES}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={list(self.seeds)} must be distinct and at least one")


def census_model_config(architecture: str, num_features: int, settings: CensusSettings) -> MultiTaskConfig:
    """Equal expert capacity: MMoE/OMoE 8×16 units, shared-bottom 128, PLE 2 levels of 8×16."""
    kinds = ("binary",) if architecture == "single_task" else ("binary", "binary")
    return MultiTaskConfig(
        d_in=num_features,
        task_kinds=kinds,
        task_names=None if architecture == "single_task" else TASK_NAMES,
        num_experts=settings.num_experts,
        expert_hidden=settings.expert_hidden,
        tower_hidden=settings.tower_hidden,
        bottom_hidden=settings.num_experts * settings.expert_hidden,
        num_task_experts=settings.ple_task_experts,
        num_shared_experts=settings.ple_shared_experts,
        num_levels=2 if architecture == "ple" else 1,
    )


@dataclass
class CensusResult:
    settings: CensusSettings
    test_auc: dict[str, Tensor]  # arch -> [S, 2] at each replica's best validation epoch
    val_auc: dict[str, Tensor]  # arch -> [S, 2]
    best_epoch: dict[str, list[int]]
    seconds: float = 0.0
    num_parameters: dict[str, int] = field(default_factory=dict)
    gate_stats: dict[str, GateStatistics] = field(default_factory=dict)  # first seed, test set, last epoch


def _build(architecture: str, data: CensusData, settings: CensusSettings) -> ReplicaStack:
    config = census_model_config(architecture, data.num_features, settings)
    base_arch = "shared_bottom" if architecture == "single_task" else architecture
    tasks = len(TASK_NAMES) if architecture == "single_task" else 1
    models = []
    for _ in range(tasks):  # single-task: replicas [task 0 seeds..., task 1 seeds...]
        for seed in settings.seeds:
            torch.manual_seed(int(seed))
            models.append(build_multitask(base_arch, config))
    return ReplicaStack(models)


@torch.no_grad()
def _scores(stack: ReplicaStack, x_ND: Tensor, chunk: int = 8192) -> Tensor:
    """Logits of every replica on the same samples: [R, N, K]."""
    stack.eval()
    outs = [
        stack(x_ND[i : i + chunk].expand(stack.num_replicas, -1, -1)).predictions_TK
        for i in range(0, x_ND.shape[0], chunk)
    ]
    stack.train()
    return torch.cat(outs, dim=1)


def _auc_per_seed(arch: str, logits_RNK: Tensor, y_NK: Tensor, num_seeds: int) -> Tensor:
    """[S, 2] AUCs (income, marital)."""
    auc = torch.zeros(num_seeds, len(TASK_NAMES))
    for s in range(num_seeds):
        for k in range(len(TASK_NAMES)):
            if arch == "single_task":
                scores = logits_RNK[k * num_seeds + s, :, 0]
            else:
                scores = logits_RNK[s, :, k]
            auc[s, k] = roc_auc(scores, y_NK[:, k])
    return auc


def _train_architectures(
    data: CensusData, settings: CensusSettings, architectures: list[str], ticks: Any = None, threads: int = 0
) -> dict:
    """Train ``architectures`` (each one replica-stacked model over the seeds); AUCs after every epoch."""
    if threads:
        torch.set_num_threads(threads)
    num_seeds = len(settings.seeds)
    stacks = {arch: _build(arch, data, settings) for arch in architectures}
    optimizers = {arch: torch.optim.Adam(stack.parameters(), lr=settings.lr) for arch, stack in stacks.items()}
    num_train = data.x_train.shape[0]
    steps_per_epoch = math.ceil(num_train / settings.batch_size)
    history: dict[str, Any] = {"val": {arch: [] for arch in stacks}, "test": {arch: [] for arch in stacks}}
    for epoch in range(settings.epochs):
        # NOTE: the order depends on seed and epoch alone: every architecture sees the same batches.
        generators = [torch.Generator().manual_seed(1000 * seed + epoch) for seed in settings.seeds]
        order_SN = torch.stack([torch.randperm(num_train, generator=g) for g in generators])
        for step in range(steps_per_epoch):
            idx_SB = order_SN[:, step * settings.batch_size : (step + 1) * settings.batch_size]
            x_SBD, y_SBK = data.x_train[idx_SB], data.y_train[idx_SB]
            for arch, stack in stacks.items():
                if arch == "single_task":
                    x_RBD = x_SBD.repeat(len(TASK_NAMES), 1, 1)
                    y_RBK = torch.cat([y_SBK[..., k : k + 1] for k in range(len(TASK_NAMES))])
                    kinds: tuple[str, ...] = ("binary",)
                else:
                    x_RBD, y_RBK, kinds = x_SBD, y_SBK, ("binary", "binary")
                out = stack(x_RBD)
                loss = task_losses(out.predictions_TK, y_RBK, kinds).sum()
                optimizers[arch].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[arch].step()
            if ticks is not None and (step + 1) % 10 == 0:
                ticks.put(10)
        for arch, stack in stacks.items():
            history["val"][arch].append(_auc_per_seed(arch, _scores(stack, data.x_val), data.y_val, num_seeds))
            history["test"][arch].append(_auc_per_seed(arch, _scores(stack, data.x_test), data.y_test, num_seeds))
    history["num_parameters"] = {
        arch: sum(p.numel() for p in stack.parameters()) // stack.num_replicas for arch, stack in stacks.items()
    }
    history["gate_stats"] = {
        arch: gate_statistics(stacks[arch].replica(0), data.x_test) for arch in stacks if arch in ("mmoe", "ple")
    }
    return history


# Relative cost of one step, for splitting the architectures over worker processes.
_COST = {"mmoe": 1.0, "omoe": 1.0, "shared_bottom": 1.0, "ple": 1.2, "single_task": 2.0}


def run_census(data: CensusData, settings: CensusSettings, progress: bool = True, workers: int = 1) -> CensusResult:
    """Train and test every architecture; ``workers`` processes (one thread each) split the architectures."""
    settings.validate()
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} is invalid: must be an integer >= 1")
    started = time.perf_counter()
    architectures = list(settings.architectures)
    workers = min(workers, len(architectures))
    groups: list[list[str]] = [[] for _ in range(workers)]
    for arch in sorted(architectures, key=lambda a: -_COST[a]):  # greedy: the cheapest group takes the next
        min(groups, key=lambda g: sum(_COST[a] for a in g)).append(arch)
    steps = settings.epochs * math.ceil(data.x_train.shape[0] / settings.batch_size)
    bar = tqdm(total=steps * workers, desc="multitask census", unit="step", disable=not progress, dynamic_ncols=True)
    parts = run_parts(
        _train_architectures, [(data, settings, architectures)] if workers == 1 else
        [(data, settings, group) for group in groups], bar,
    )
    bar.close()
    merged: dict[str, Any] = {key: {} for key in ("val", "test", "num_parameters", "gate_stats")}
    for part in parts:
        for key in merged:
            merged[key].update(part[key])
    test_auc, val_auc, best_epoch = {}, {}, {}
    for arch in architectures:
        val_ESK = torch.stack(merged["val"][arch])
        test_ESK = torch.stack(merged["test"][arch])
        if arch == "single_task":  # each task's model stops at its own best epoch
            best_SK = val_ESK.argmax(dim=0)
        else:
            best_SK = val_ESK.mean(dim=-1).argmax(dim=0).unsqueeze(-1).expand(-1, len(TASK_NAMES))
        val_auc[arch] = val_ESK.gather(0, best_SK.unsqueeze(0)).squeeze(0)
        test_auc[arch] = test_ESK.gather(0, best_SK.unsqueeze(0)).squeeze(0)
        best_epoch[arch] = (best_SK[:, 0] + 1).tolist()
    return CensusResult(
        settings,
        test_auc,
        val_auc,
        best_epoch,
        time.perf_counter() - started,
        merged["num_parameters"],
        merged["gate_stats"],
    )
