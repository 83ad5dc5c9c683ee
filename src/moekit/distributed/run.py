"""What the trainer does differently when launched on several ranks with expert parallelism.

    torchrun --nproc_per_node 4 -m moekit train --expert-parallel 4 --out runs/ep4

Every MoE layer's experts are sharded over the ranks (``moekit.distributed.expert_parallel``); every other
weight is data-parallel: each rank draws its own batches (data seed + rank), gradients are
averaged after each backward (``average_gradients``), clipping uses the norm over all
shards, and aux-loss-free routers pool their load counts so the replicated biases stay
equal. The losses and step times that drive logging, the time budget and the schedule are
means over the ranks, so every rank takes the same decisions (same number of steps, same
evaluation points): a rank that stopped alone would leave the others waiting in an
all-to-all. Only rank 0 writes the run directory (config, metrics, plots, results) and
shows the progress bar; checkpoints are sharded (``moekit.distributed.checkpoint``). The
expert-load statistics in the logs and plots are rank 0's routing of its own batches.
Evaluation runs the same validation batches on every rank (the all-to-alls need every rank
in every forward), so every rank reports the same validation loss.

A single process uses ``DistributedRun.single()``, under which every method is the plain
single-process behaviour.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moekit.distributed import checkpoint as distributed_checkpoint
from moekit.distributed import env, grads
from moekit.distributed import expert_parallel as parallel


@dataclass
class DistributedRun:
    rank: int = 0
    num_ranks: int = 1
    owns_group: bool = False  # the process group was created here, and is destroyed by close()

    @classmethod
    def single(cls) -> DistributedRun:
        return cls()

    @classmethod
    def setup(
        cls, expert_parallel: int, timeout_s: float = env.DEFAULT_TIMEOUT_S, backend: str = "gloo"
    ) -> DistributedRun:
        """Join torchrun's process group when ``expert_parallel`` > 1 (it must equal WORLD_SIZE):
        ``backend`` nccl when the model trains on CUDA, gloo on the CPU."""
        if not isinstance(expert_parallel, int) or expert_parallel < 1:
            raise ValueError(f"expert_parallel={expert_parallel!r} is invalid: must be an integer >= 1")
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size != expert_parallel:
            raise ValueError(
                f"--expert-parallel {expert_parallel} needs exactly {expert_parallel} processes, but WORLD_SIZE="
                f"{world_size}: launch with torchrun --nproc_per_node {expert_parallel} -m moekit train "
                f"--expert-parallel {expert_parallel} (every rank holds 1/{expert_parallel} of the experts)"
            )
        if expert_parallel == 1:
            return cls.single()
        owns_group = not torch.distributed.is_initialized()
        rank, num_ranks = env.init_distributed(timeout_s, backend=backend)
        return cls(rank, num_ranks, owns_group)

    @property
    def local_rank(self) -> int:
        """This process's index on its machine (torchrun's LOCAL_RANK): its CUDA device."""
        return int(os.environ.get("LOCAL_RANK", self.rank))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.num_ranks > 1

    def barrier(self) -> None:
        if self.distributed:
            env.barrier("barrier of the training ranks")

    def shard(self, model: nn.Module) -> nn.Module:
        if self.distributed:
            parallel.shard_experts(model)
        return model

    def data_seed(self, seed: int) -> int:
        return seed + self.rank

    def reduce_gradients(self, model: nn.Module) -> None:
        if self.distributed:
            grads.average_gradients(model)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> None:
        if self.distributed:
            grads.clip_grad_norm_(model, max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def pool_router_load(self, model: nn.Module) -> None:
        if self.distributed:
            grads.all_reduce_router_load(model)

    def mean(self, values: list[float]) -> list[float]:
        return grads.all_reduce_mean(values) if self.distributed else values

    def save_checkpoint(
        self, run_dir: Path, model: nn.Module, state: dict, save_single: Callable[[Path, nn.Module, dict], Path]
    ) -> Path:
        if not self.distributed:
            return save_single(run_dir, model, state)
        return distributed_checkpoint.save_sharded_checkpoint(run_dir, model, state)

    def is_sharded_checkpoint(self, checkpoint: Path) -> bool:
        return distributed_checkpoint.read_layout(checkpoint)[0] > 1

    def load_weights(self, model: nn.Module, checkpoint: Path, load_single: Callable[[nn.Module, Path], None]) -> None:
        if not self.distributed and not self.is_sharded_checkpoint(checkpoint):
            load_single(model, checkpoint / distributed_checkpoint.WEIGHTS_FILE)
            return
        distributed_checkpoint.load_weights(model, checkpoint)

    def load_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path, load_single: Callable[[Path], dict]
    ) -> dict:
        if not self.distributed and not self.is_sharded_checkpoint(checkpoint):
            return load_single(checkpoint / distributed_checkpoint.SINGLE_STATE_FILE)
        return distributed_checkpoint.load_training_state(checkpoint, model, optimizer, load_single)

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
