"""Process groups for expert parallelism: joining torchrun's group, collective failures as errors.

    init_distributed()          join the group torchrun describes (gloo on CPU, NCCL with CUDA),
                                with a collective timeout so that a dead peer surfaces as an error
    barrier(what)               dist.barrier that raises ExpertParallelError
    collective_error(...)       the ExpertParallelError for a failed collective, naming it and the ranks

A collective that fails (a peer raised, was killed, or did not arrive within the process
group's timeout) raises ``ExpertParallelError`` naming the collective and the ranks; nothing
waits forever.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0  # collective timeout of init_distributed: a dead peer surfaces within it


class ExpertParallelError(RuntimeError):
    """A collective of expert parallelism failed: a peer rank crashed, was killed or hung."""


def group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def collective_error(what: str, group: dist.ProcessGroup | None, error: Exception) -> ExpertParallelError:
    size, rank = group_size_rank(group)
    return ExpertParallelError(
        f"{what} failed on rank {rank} of {size}: another rank raised, was killed, or did not reach "
        f"this collective within the process group's timeout ({type(error).__name__}: {error})"
    )


def barrier(what: str, group: dist.ProcessGroup | None = None) -> None:
    """``dist.barrier`` that fails with ExpertParallelError; nothing to wait for outside a group."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier(group=group)
        except RuntimeError as error:
            raise collective_error(what, group, error) from error


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    gloo on CPU, NCCL when CUDA is available (each rank then uses GPU LOCAL_RANK); every
    collective fails after ``timeout_s`` instead of hanging on a dead peer. Returns
    (rank, world size); (0, 1) and no process group when not launched by torchrun.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
