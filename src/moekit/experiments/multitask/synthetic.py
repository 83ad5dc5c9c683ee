"""The MMoE paper's synthetic benchmark (Ma et al., KDD 2018, §3.2) with controlled task correlation.

Shape suffixes: R replicas (one per seed × correlation), B batch, N test samples, D input
features, K tasks (2), M sine terms.

The generator (§3.2), with the constants the paper leaves open fixed as d=100, c=1, m=10,
α_j, β_j ~ N(0, 1), noise variance 0.01:
  1. u1, u2: orthonormal vectors in R^d (QR of a d × 2 Gaussian matrix, so exactly orthonormal)
  2. w1 = c·u1, w2 = c·(p·u1 + sqrt(1 − p²)·u2): cos(w1, w2) = p, the task correlation
  3. x ~ N(0, I_d)
  4. y_i = w_iᵀx + Σ_{j=1..m} sin(α_j w_iᵀx + β_j) + ε_i,  ε_i ~ N(0, 0.01), α and β shared by the tasks
The noise makes 0.01 the Bayes-optimal mean squared error.

Training (``run_synthetic``): every architecture trains all seeds × correlations at once as
one ``ReplicaStack``; all architectures train in one loop on the same fresh batch every step,
and are tested on the same test set, so comparisons between architectures are paired per seed.
A seed fixes u1, u2, α, β (shared across correlations) and each replica's initial weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from moekit.experiments.multitask.workers import run_parts
from moekit.models.multitask import (
    GateStatistics,
    MultiTaskConfig,
    ReplicaStack,
    build_multitask,
    gate_statistics,
    task_losses,
)

BAYES_LOSS = 0.01  # the noise variance: no model can beat it in expectation
SYNTHETIC_ARCHITECTURES = ("mmoe", "omoe", "shared_bottom")
GATE_PLOT_ARCHITECTURES = ("mmoe", "cgc", "ple")  # one gate per task: their statistics differ by task


@dataclass
class SyntheticTasks:
    """Two regression tasks per replica: task vectors w [R, 2, D], shared sine constants α, β [R, M]."""

    w_RKD: Tensor
    alpha_RM: Tensor
    beta_RM: Tensor
    noise_std: float = 0.1

    @property
    def num_replicas(self) -> int:
        return self.w_RKD.shape[0]

    def sample(self, num: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """x [R, num, D] ~ N(0, I) and the targets y [R, num, 2] of §3.2 step 4, every replica its own x."""
        num_replicas, _, d = self.w_RKD.shape
        x_RND = torch.randn(num_replicas, num, d, generator=generator)
        noise_RNK = torch.randn(num_replicas, num, 2, generator=generator)
        return x_RND, self.targets(x_RND, noise_RNK)

    def targets(self, x_RND: Tensor, noise_RNK: Tensor) -> Tensor:
        """y = clean targets + noise_std · noise (noise ~ N(0, 1)): [R, N, 2]."""
        return self.clean_targets(x_RND) + self.noise_std * noise_RNK

    def clean_targets(self, x_RND: Tensor) -> Tensor:
        """w_iᵀx + Σ_j sin(α_j w_iᵀx + β_j), without the noise: [R, N, 2]."""
        proj_RNK = torch.einsum("rnd,rkd->rnk", x_RND, self.w_RKD)
        phase_RNKM = proj_RNK.unsqueeze(-1) * self.alpha_RM[:, None, None, :] + self.beta_RM[:, None, None, :]
        return proj_RNK + torch.sin(phase_RNKM).sum(dim=-1)


class SeedStreams:
    """One random stream per seed: a seed's x and noise are the same whichever process, batch of
    replicas or architecture draws them, and shared by its replicas at every correlation."""

    def __init__(self, seeds: Sequence[int], data_seed: int, d: int = 100) -> None:
        self.d = d
        self.generators = [torch.Generator().manual_seed(data_seed * 1_000_003 + int(seed)) for seed in seeds]

    def draw(self, num: int, num_correlations: int) -> tuple[Tensor, Tensor]:
        """x [R, num, D], noise [R, num, 2] for replicas r = i_corr · S + i_seed."""
        x_SND = torch.stack([torch.randn(num, self.d, generator=g) for g in self.generators])
        noise_SNK = torch.stack([torch.randn(num, 2, generator=g) for g in self.generators])
        return x_SND.repeat(num_correlations, 1, 1), noise_SNK.repeat(num_correlations, 1, 1)


def orthonormal_pair(d: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """u1, u2: the Q factor of a d × 2 Gaussian matrix (exactly orthonormal up to rounding)."""
    q_D2, _ = torch.linalg.qr(torch.randn(d, 2, generator=generator, dtype=torch.float64))
    return q_D2[:, 0], q_D2[:, 1]


def task_vectors(u1: Tensor, u2: Tensor, correlation: float, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """w1 = c·u1, w2 = c·(p·u1 + sqrt(1 − p²)·u2), so that cos(w1, w2) = p (§3.2 step 2)."""
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation={correlation!r} is invalid: must be in [-1, 1]")
    return scale * u1, scale * (correlation * u1 + math.sqrt(1.0 - correlation**2) * u2)


def make_tasks(
    seeds: Sequence[int], correlations: Sequence[float], d: int = 100, scale: float = 1.0, num_sines: int = 10
) -> SyntheticTasks:
    """Replica r = i_corr · len(seeds) + i_seed; a seed fixes u1, u2, α, β for every correlation."""
    if len(seeds) == 0 or len(correlations) == 0:
        raise ValueError(f"need at least one seed and one correlation, got {list(seeds)} and {list(correlations)}")
    per_seed = {}
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        u1, u2 = orthonormal_pair(d, generator)
        alpha = torch.randn(num_sines, generator=generator)
        beta = torch.randn(num_sines, generator=generator)
        per_seed[seed] = (u1, u2, alpha, beta)
    w, alphas, betas = [], [], []
    for correlation in correlations:
        for seed in seeds:
            u1, u2, alpha, beta = per_seed[seed]
            w.append(torch.stack(task_vectors(u1, u2, float(correlation), scale)).float())
            alphas.append(alpha)
            betas.append(beta)
    return SyntheticTasks(torch.stack(w), torch.stack(alphas), torch.stack(betas))


@dataclass
class SyntheticSettings:
    seeds: tuple[int, ...] = tuple(range(48))
    correlations: tuple[float, ...] = (1.0, 0.9, 0.5)
    architectures: tuple[str, ...] = SYNTHETIC_ARCHITECTURES
    steps: int = 2500
    batch_size: int = 128
    lr: float = 5e-3  # Adam; cosine decay to lr_final_fraction · lr over the run
    lr_final_fraction: float = 0.1
    test_size: int = 2000
    data_seed: int = 12345  # the training and test streams (shared by all architectures)
    failed_threshold: float = 0.05  # a run whose final test loss exceeds this failed (5× the Bayes loss)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "test_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is invalid: must be > 0")
        for arch in self.architectures:
            if arch not in ("mmoe", "omoe", "shared_bottom", "cgc", "ple"):
                raise ValueError(f"architecture {arch!r} is invalid: use mmoe, omoe, shared_bottom, cgc or ple")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={list(self.seeds)} has duplicates")


@dataclass
class SyntheticResult:
    settings: SyntheticSettings
    test_loss: dict[str, Tensor]  # arch -> [C, S]: final test MSE averaged over the two tasks
    test_loss_per_task: dict[str, Tensor]  # arch -> [C, S, 2]
    gate_distance: dict[str, Tensor]  # arch -> [C, S]: mean total-variation distance of the tasks' gates
    train_curve: dict[str, list[float]] = field(default_factory=dict)  # arch -> mean train loss per log point
    curve_steps: list[int] = field(default_factory=list)
    seconds: float = 0.0
    num_parameters: dict[str, int] = field(default_factory=dict)
    gate_stats: dict[tuple[str, float], GateStatistics] = field(default_factory=dict)  # first seed's replica


def _lr_factor(step: int, steps: int, final_fraction: float) -> float:
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def _model_config() -> MultiTaskConfig:
    """The paper's models: 8 experts of 16 ReLU units, towers of 8, shared bottom of 113 units."""
    return MultiTaskConfig(d_in=100, task_kinds=("regression", "regression"))


def build_stack(architecture: str, seeds: Sequence[int], num_correlations: int) -> ReplicaStack:
    config = _model_config()
    models = []
    for _ in range(num_correlations):
        for seed in seeds:
            torch.manual_seed(int(seed))  # a seed's replicas start from the same weights at every correlation
            models.append(build_multitask(architecture, config))
    return ReplicaStack(models)


@torch.no_grad()
def _evaluate(stack: ReplicaStack, x_RND: Tensor, y_RNK: Tensor, chunk: int = 1000) -> tuple[Tensor, Tensor]:
    """Per-task test MSE [R, 2] and the tasks' mean gate total-variation distance [R]."""
    sq_err, distance = [], []
    for start in range(0, x_RND.shape[1], chunk):
        out = stack(x_RND[:, start : start + chunk])
        sq_err.append((out.predictions_TK - y_RNK[:, start : start + chunk]).square())
        if "task0" in out.gates and "task1" in out.gates:
            distance.append(0.5 * (out.gates["task0"] - out.gates["task1"]).abs().sum(dim=-1))
    mse_RK = torch.cat(sq_err, dim=1).mean(dim=1)
    dist_R = torch.cat(distance, dim=1).mean(dim=1) if distance else torch.zeros(x_RND.shape[0])
    return mse_RK, dist_R


def _train_part(settings: SyntheticSettings, seeds: list[int], ticks: Any = None, threads: int = 0) -> dict:
    """Train every architecture on the replicas of ``seeds`` × all correlations; test them."""
    if threads:
        torch.set_num_threads(threads)
    correlations = list(settings.correlations)
    num_corr = len(correlations)
    tasks = make_tasks(seeds, correlations)
    x_test, noise_test = SeedStreams(seeds, settings.data_seed + 1).draw(settings.test_size, num_corr)
    y_test = tasks.targets(x_test, noise_test)
    train_streams = SeedStreams(seeds, settings.data_seed)
    kinds = ("regression", "regression")
    stacks = {arch: build_stack(arch, seeds, num_corr) for arch in settings.architectures}
    optimizers = {arch: torch.optim.Adam(stack.parameters(), lr=settings.lr) for arch, stack in stacks.items()}
    log_every = max(1, settings.steps // 30)
    curves: dict[str, list[float]] = {arch: [] for arch in stacks}
    running = {arch: 0.0 for arch in stacks}
    for step in range(settings.steps):
        lr = settings.lr * _lr_factor(step, settings.steps, settings.lr_final_fraction)
        x_RBD, noise_RBK = train_streams.draw(settings.batch_size, num_corr)
        y_RBK = tasks.targets(x_RBD, noise_RBK)
        for arch, stack in stacks.items():
            for group in optimizers[arch].param_groups:
                group["lr"] = lr
            out = stack(x_RBD)
            # Each replica's loss is its own tasks' mean; the sum keeps replicas independent.
            loss = task_losses(out.predictions_TK, y_RBK, kinds).mean(dim=-1).sum()
            optimizers[arch].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[arch].step()
            running[arch] += loss.item() / stack.num_replicas
        if (step + 1) % log_every == 0:
            for arch in stacks:
                curves[arch].append(running[arch] / log_every)
                running[arch] = 0.0
        if ticks is not None and (step + 1) % 10 == 0:
            ticks.put(10)
    shape = (num_corr, len(seeds))
    part: dict[str, Any] = {"test_loss_per_task": {}, "gate_distance": {}, "curves": curves, "gate_stats": {}}
    part["num_parameters"] = {
        arch: sum(p.numel() for p in stack.parameters()) // stack.num_replicas for arch, stack in stacks.items()
    }
    for arch, stack in stacks.items():
        mse_RK, dist_R = _evaluate(stack, x_test, y_test)
        part["test_loss_per_task"][arch] = mse_RK.view(*shape, 2)
        part["gate_distance"][arch] = dist_R.view(shape)
        if arch in GATE_PLOT_ARCHITECTURES and seeds[0] == settings.seeds[0]:
            for c, correlation in enumerate(correlations):
                replica = c * len(seeds)
                part["gate_stats"][(arch, correlation)] = gate_statistics(stack.replica(replica), x_test[replica])
    return part


def run_synthetic(settings: SyntheticSettings, progress: bool = True, workers: int = 1) -> SyntheticResult:
    """Train and test all architectures; ``workers`` processes (one thread each) split the seeds.

    The results do not depend on ``workers``: every seed has its own data stream and its
    replicas' initial weights are drawn from the seed alone.
    """
    settings.validate()
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} is invalid: must be an integer >= 1")
    started = time.perf_counter()
    seeds = list(settings.seeds)
    workers = min(workers, len(seeds))
    chunks = [seeds[i::workers] for i in range(workers)]
    chunks = [sorted(chunk, key=seeds.index) for chunk in chunks]
    bar = tqdm(total=settings.steps * workers, desc="multitask synthetic", unit="step", disable=not progress,
               dynamic_ncols=True)
    parts = run_parts(_train_part, [(settings, chunk) for chunk in chunks], bar)
    bar.close()
    # reassemble the seeds in their order: chunk j holds seeds[j::workers]
    order = [seed for chunk in chunks for seed in chunk]
    back = torch.tensor([order.index(seed) for seed in seeds])
    per_task = {
        arch: torch.cat([p["test_loss_per_task"][arch] for p in parts], dim=1)[:, back] for arch in parts[0]["curves"]
    }
    gate_distance = {arch: torch.cat([p["gate_distance"][arch] for p in parts], dim=1)[:, back] for arch in per_task}
    weights = [len(chunk) / len(seeds) for chunk in chunks]
    curves = {
        arch: [sum(w * p["curves"][arch][i] for w, p in zip(weights, parts, strict=True))
               for i in range(len(parts[0]["curves"][arch]))]
        for arch in per_task
    }
    log_every = max(1, settings.steps // 30)
    gate_stats = {key: value for p in parts for key, value in p["gate_stats"].items()}
    return SyntheticResult(
        settings,
        {arch: loss.mean(dim=-1) for arch, loss in per_task.items()},
        per_task,
        gate_distance,
        curves,
        [log_every * (i + 1) for i in range(len(next(iter(curves.values()))))],
        time.perf_counter() - started,
        parts[0]["num_parameters"],
        gate_stats,
    )
