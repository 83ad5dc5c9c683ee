"""Gradients of an expert-parallel model across ranks, and the few figures the ranks share.

    average_gradients(model)        after backward: the gradient of the mean of the ranks' losses
    clip_grad_norm_(model, ...)     gradient clipping by the norm over all ranks' shards
    all_reduce_router_load(model)   aux-loss-free routers count the load of every rank
    all_reduce_mean(values)         the mean over ranks of a few host numbers

Routers and shared experts (and every non-MoE weight) are replicated: their gradients are
all-reduced to the mean over ranks, as DistributedDataParallel does. An expert shard's
gradient after ``backward()`` already sums every rank's contribution (the all-to-all's
backward, ``moekit.distributed.expert_parallel``), so it is divided by R: with equal-sized
shards and a token-mean loss, every gradient is then exactly the single-process gradient of
the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.distributed.env import collective_error
from moekit.distributed.expert_parallel import sharded_parameters
from moekit.routing import AuxFreeRouter


def _split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    sharded = sharded_parameters(model)
    replicated, experts = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (experts if name in sharded else replicated).append(param)
    return replicated, experts


@torch.no_grad()
def average_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Make every gradient that of mean_r loss_r, the mean of the ranks' losses. Call after
    ``backward()`` and before clipping and ``optimizer.step()``.

    Replicated parameters (routers, shared experts, attention, embeddings, ...): all-reduce
    to the mean over ranks, in one flat buffer (DistributedDataParallel's averaging).
    Expert shards: divided by R, their all-to-all backward having already summed every
    rank's contribution. A missing gradient counts as zeros, so ranks always agree.
    """
    num_ranks = dist.get_world_size(group)
    replicated, experts = _split_parameters(model)
    for param in replicated + experts:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    if replicated:
        flat = torch.cat([param.grad.reshape(-1) for param in replicated])
        try:
            dist.all_reduce(flat, group=group)
        except RuntimeError as error:
            raise collective_error("all-reduce of replicated gradients", group, error) from error
        flat.div_(num_ranks)
        offset = 0
        for param in replicated:
            count = param.numel()
            param.grad.copy_(flat[offset : offset + count].view_as(param.grad))
            offset += count
    for param in experts:
        param.grad.div_(num_ranks)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None = None) -> Tensor:
    """Clip by the global gradient norm, every expert shard of every rank included; returns it.

    After ``average_gradients`` the replicated gradients are equal on every rank, so
    norm² = Σ replicated g² + Σ_ranks Σ shard g² (one all-reduce of a scalar).
    """
    replicated, experts = _split_parameters(model)
    grads = [p.grad for p in replicated if p.grad is not None]
    expert_grads = [p.grad for p in experts if p.grad is not None]
    device = next(model.parameters()).device
    replicated_sq = sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=device))
    expert_sq = sum((g.float().pow(2).sum() for g in expert_grads), torch.zeros((), device=device))
    try:
        dist.all_reduce(expert_sq, group=group)
    except RuntimeError as error:
        raise collective_error("all-reduce of the gradient norm", group, error) from error
    total_norm = (replicated_sq + expert_sq).sqrt()
    scale = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for grad in grads + expert_grads:
        grad.mul_(scale.to(grad.dtype))
    return total_norm


@torch.no_grad()
def all_reduce_router_load(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum the load counted by aux-loss-free routers over the ranks, so that the replicated
    expert biases receive the same update everywhere (call before ``update_expert_bias``)."""
    for module in model.modules():
        if isinstance(module, AuxFreeRouter):
            try:
                dist.all_reduce(module.load_since_update, group=group)
            except RuntimeError as error:
                raise collective_error("all-reduce of router load", group, error) from error


@torch.no_grad()
def all_reduce_mean(values: list[float], group: dist.ProcessGroup | None = None) -> list[float]:
    """The mean over ranks of a few host numbers (losses, step times), equal on every rank."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        tensor = tensor.cuda()
    try:
        dist.all_reduce(tensor, group=group)
    except RuntimeError as error:
        raise collective_error("all-reduce of step figures", group, error) from error
    return (tensor / dist.get_world_size(group)).tolist()
