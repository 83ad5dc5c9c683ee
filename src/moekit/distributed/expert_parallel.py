"""Expert parallelism over ``torch.distributed``: experts sharded across the ranks of a group.

Shape suffixes: T tokens, D d_model, E experts (global), e experts of this rank (E/R),
N this rank's assignments (rows it sends), M rows this rank's experts receive, R ranks.

    expert_parallel(moe, group)     one MoE layer: rank r keeps experts [r·E/R, (r+1)·E/R)
    shard_experts(model, group)     every MoE layer of a model, replicated weights made equal
    sharded_parameters(model)       which parameters are expert shards, and where their rows sit
    set_all_to_all_observer(fn)     fn(bytes_sent, seconds) after every all-to-all (benchmarks)

Gradient averaging and clipping across ranks are in ``moekit.distributed.grads``; joining
the process group and collective errors in ``moekit.distributed.env``.

Data flow of one layer on each rank (the torchtitan / Megatron-Core all-to-all dispatcher):

    route locally → capacity per rank → local permute (LocalDispatcher, no communication)
      → all_to_all(counts)            how many rows each rank sends to each of my experts
      → all_to_all(rows)              variable split sizes, rank-major on arrival
      → regroup expert-major → GroupedExperts (the same grouped GEMM as one process)
      → back to rank-major → all_to_all(rows) back → LocalDispatcher.combine

Semantics:
- Dropless, each rank's output is the single-process layer applied to that rank's tokens.
  The all-to-all is an autograd Function whose backward is the reverse all-to-all, so an
  expert shard's gradient after ``backward()`` sums the contributions of every rank's loss:
  it is the single-process gradient of Σ_r loss_r over the global batch.
- Routers and shared experts are replicated. ``grads.average_gradients`` all-reduces their
  gradients to the mean over ranks (as DistributedDataParallel does) and divides the expert
  shards' gradients by R, so that every gradient is that of mean_r loss_r: with equal-sized
  shards and a token-mean loss, exactly the single-process gradient of the global batch.
- Capacity is counted per rank: a rank's T tokens give C = max(min_capacity,
  ceil(capacity_factor · T · k / E)) per expert (GShard's capacity per group, the group being
  a rank's batch), assignments beyond C are dropped before anything is sent, so an expert
  receives at most R·C rows. Whether a token is dropped depends only on its own rank's batch,
  which is what the single-process layer gives for that batch; a global capacity would need
  every rank's priorities before any drop, one more exchange per layer. The auxiliary losses
  are likewise per rank (GShard's per-group balance loss), averaged by the gradient mean.
- Experts with no rows, and ranks with no tokens, still take part in every collective.
- A collective that fails (a peer raised, was killed, or did not arrive within the process
  group's timeout) raises ``ExpertParallelError`` naming the collective and the ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.dispatch import DispatchPlan, LocalDispatcher
from moekit.distributed.env import collective_error, group_size_rank
from moekit.experts import GroupedExperts
from moekit.layer import MoE, moe_layers
from moekit.routing import Assignments

AllToAllObserver = Callable[[int, float], None]

_observer: AllToAllObserver | None = None


def set_all_to_all_observer(observer: AllToAllObserver | None) -> AllToAllObserver | None:
    """Call ``observer(bytes_sent, seconds)`` after every all-to-all of expert parallelism in
    this process (None: stop); returns the observer it replaces.

    bytes_sent: what this rank sent to the other ranks (rows it keeps for itself are not sent);
    seconds: wall time inside the collective, waiting for slower ranks included.
    NOTE: on CUDA an observer costs one device synchronization per all-to-all (the clock stops
    when the collective has finished, not when it was queued); without one, nothing is timed.
    """
    global _observer
    previous, _observer = _observer, observer
    return previous


def _bytes_to_others(x: Tensor, input_splits: list[int] | None, group) -> int:
    size, rank = group_size_rank(group)
    total = x.numel() * x.element_size()
    if input_splits is None:  # equal splits
        return total * (size - 1) // size
    row_bytes = total // max(1, x.shape[0])
    return (sum(input_splits) - input_splits[rank]) * row_bytes


def _all_to_all_single(
    out: Tensor, x: Tensor, output_splits: list[int] | None, input_splits: list[int] | None, group, what: str
) -> Tensor:
    observer = _observer
    started = time.perf_counter()
    try:
        dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    except RuntimeError as error:  # DistBackendError and gloo/NCCL timeouts are RuntimeErrors
        raise collective_error(what, group, error) from error
    if observer is not None:
        if out.is_cuda:
            torch.cuda.synchronize()
        observer(_bytes_to_others(x, input_splits, group), time.perf_counter() - started)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; its backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out_MD = x_ND.new_empty(sum(output_splits), *x_ND.shape[1:])
        return _all_to_all_single(out_MD, x_ND.contiguous(), output_splits, input_splits, group, "all-to-all of rows")

    @staticmethod
    def backward(ctx, grad_MD: Tensor):
        grad_ND = grad_MD.new_empty(sum(ctx.input_splits), *grad_MD.shape[1:])
        _all_to_all_single(
            grad_ND, grad_MD.contiguous(), ctx.input_splits, ctx.output_splits, ctx.group, "all-to-all of gradients"
        )
        return grad_ND, None, None, None


def all_to_all(x_ND: Tensor, output_splits: list[int], input_splits: list[int], group=None) -> Tensor:
    """Rows ``input_splits[r]`` of x go to rank r; ``output_splits[r]`` rows arrive from rank r."""
    return _AllToAll.apply(x_ND, output_splits, input_splits, group)


def expert_major_order(counts_RE: Tensor) -> Tensor:
    """Rows that arrive rank-major (for rank r, for expert e: counts[r, e] rows), listed
    expert-major (for e, for r): the index of the arrived row held by each expert-major row."""
    num_ranks, num_local = counts_RE.shape
    counts_flat = counts_RE.reshape(-1)
    starts_RE = (torch.cumsum(counts_flat, 0) - counts_flat).view(num_ranks, num_local)
    block_counts = counts_RE.t().reshape(-1)  # blocks in expert-major order
    block_starts = starts_RE.t().reshape(-1)
    total = int(counts_flat.sum())
    block_first_row = torch.cumsum(block_counts, 0) - block_counts
    offset_in_block = torch.arange(total, device=counts_RE.device) - block_first_row.repeat_interleave(
        block_counts, output_size=total
    )
    return block_starts.repeat_interleave(block_counts, output_size=total) + offset_in_block


@dataclass(frozen=True)
class ExpertParallelPlan:
    local: DispatchPlan  # this rank's assignments, sorted by (global) expert = by destination rank
    input_splits: list[int]  # rows sent to each rank
    output_splits: list[int]  # rows received from each rank
    expert_major_M: Tensor  # arrived (rank-major) row held by each expert-major row
    rank_major_M: Tensor  # inverse of expert_major_M
    group_ends_e: Tensor  # int32 cumulative row counts of this rank's experts: grouped_mm offs
    tokens_per_local_expert: tuple[int, ...]  # rows each local expert runs, from every rank

    @property
    def num_rows(self) -> int:
        return self.local.num_rows

    @property
    def tokens_per_expert_E(self) -> Tensor:
        """This rank's assignments per (global) expert: the layer's routing statistics."""
        return self.local.tokens_per_expert_E


class ExpertParallelDispatcher(LocalDispatcher):
    """The local permutation of ``LocalDispatcher``, plus all-to-alls to the experts' owners.

    Rank r of R owns experts [r·E/R, (r+1)·E/R); the local expert-sorted rows are therefore
    already grouped by destination rank. ``plan`` exchanges the counts (one all-to-all of E
    integers), ``dispatch`` and ``combine`` move the rows.
    """

    fusable = False

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(num_experts)
        self.group = group
        self.num_ranks, self.rank = group_size_rank(group)
        if num_experts % self.num_ranks != 0:
            raise ValueError(
                f"MoEConfig.num_experts={num_experts} is not divisible by the {self.num_ranks} ranks "
                "of the process group: expert parallelism gives every rank the same number of experts"
            )
        self.num_local_experts = num_experts // self.num_ranks

    def plan(self, assignments: Assignments, num_tokens: int) -> ExpertParallelPlan:
        local = super().plan(assignments, num_tokens)
        send_counts_RE = local.tokens_per_expert_E.view(self.num_ranks, self.num_local_experts)
        recv_counts_RE = torch.empty_like(send_counts_RE)
        _all_to_all_single(recv_counts_RE, send_counts_RE, None, None, self.group, "all-to-all of expert counts")
        # One host sync for every split size the row all-to-alls need.
        sizes = torch.cat([send_counts_RE.sum(1), recv_counts_RE.sum(1), recv_counts_RE.sum(0)]).tolist()
        num_ranks = self.num_ranks
        expert_major_M = expert_major_order(recv_counts_RE)
        rank_major_M = torch.empty_like(expert_major_M)
        rank_major_M[expert_major_M] = torch.arange(expert_major_M.numel(), device=expert_major_M.device)
        return ExpertParallelPlan(
            local=local,
            input_splits=sizes[:num_ranks],
            output_splits=sizes[num_ranks : 2 * num_ranks],
            expert_major_M=expert_major_M,
            rank_major_M=rank_major_M,
            group_ends_e=torch.cumsum(recv_counts_RE.sum(0), 0).to(torch.int32),
            tokens_per_local_expert=tuple(sizes[2 * num_ranks :]),
        )

    def dispatch(self, x_TD: Tensor, plan: ExpertParallelPlan) -> Tensor:  # type: ignore[override]
        """Rows for this rank's experts, from every rank, grouped by local expert: [M, D]."""
        x_rows_ND = super().dispatch(x_TD, plan.local)
        arrived_MD = all_to_all(x_rows_ND, plan.output_splits, plan.input_splits, self.group)
        return arrived_MD.index_select(0, plan.expert_major_M)

    def expert_groups(self, plan: ExpertParallelPlan) -> tuple[Tensor, tuple[int, ...]]:  # type: ignore[override]
        return plan.group_ends_e, plan.tokens_per_local_expert

    def combine(self, out_MD: Tensor, weight_N: Tensor, plan: ExpertParallelPlan) -> Tensor:  # type: ignore[override]
        """Expert outputs back to the ranks their tokens live on, then the local combine: [T, D]."""
        rank_major_MD = out_MD.index_select(0, plan.rank_major_M)
        out_ND = all_to_all(rank_major_MD, plan.input_splits, plan.output_splits, self.group)
        return super().combine(out_ND, weight_N, plan.local)


# ---------------------------------------------------------------------------------------
# Sharding a layer / a model
# ---------------------------------------------------------------------------------------


def _broadcast_from_first(tensors: list[Tensor], group: dist.ProcessGroup | None) -> None:
    source = dist.get_global_rank(group, 0) if group is not None else 0
    try:
        for tensor in tensors:
            dist.broadcast(tensor.data, src=source, group=group)
    except RuntimeError as error:
        raise collective_error("broadcast of replicated weights", group, error) from error


def expert_parallel(moe: MoE, group: dist.ProcessGroup | None = None) -> MoE:
    """Shard ``moe``'s experts across the ranks of ``group`` (default: the whole world), in place.

    Rank r of R keeps experts r·E/R to (r+1)·E/R − 1: ``experts.w_in`` becomes [E/R, D, H] and
    ``experts.w_out`` [E/R, F, D] under the same parameter names. Every other weight of the
    layer stays replicated. The layer's weights and buffers are first broadcast from the
    group's first rank, so all ranks shard the same layer. Returns ``moe``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "expert_parallel needs an initialized torch.distributed process group "
            "(torchrun + moekit.distributed.env.init_distributed, or torch.distributed.init_process_group)"
        )
    if not isinstance(moe, MoE):
        raise TypeError(f"expert_parallel expects a moekit.MoE layer, got {type(moe).__name__}")
    if isinstance(moe.dispatcher, ExpertParallelDispatcher):
        raise ValueError("expert_parallel: this MoE layer's experts are already sharded")
    experts = moe.experts
    if not isinstance(experts, GroupedExperts):
        raise TypeError(
            f"expert_parallel shards GroupedExperts (3-D expert weights), got {type(experts).__name__}; "
            "build the layer with MoE(config) rather than MoE(config, experts=[...])"
        )
    dispatcher = ExpertParallelDispatcher(moe.config.num_experts, group)  # raises when E % R != 0
    _broadcast_from_first([*moe.parameters(), *moe.buffers()], group)
    per_rank = dispatcher.num_local_experts
    first = dispatcher.rank * per_rank
    for name in ("w_in", "w_out"):
        full = getattr(experts, name)
        shard = nn.Parameter(full.data[first : first + per_rank].clone(), requires_grad=full.requires_grad)
        setattr(experts, name, shard)
    experts.num_experts = per_rank
    moe.dispatcher = dispatcher
    return moe


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """``expert_parallel`` on every MoE layer of ``model``, after broadcasting all of the
    model's weights and buffers from the group's first rank (replicas start equal)."""
    _broadcast_from_first([*model.parameters(), *model.buffers()], group)
    layers = [layer for _, layer in moe_layers(model)]
    if not layers:
        raise ValueError(f"shard_experts: {type(model).__name__} has no MoE layer to shard")
    for layer in layers:
        expert_parallel(layer, group)
    return model


@dataclass(frozen=True)
class ExpertShard:
    """Where a sharded parameter's rows sit in the full tensor: [rank·rows, (rank+1)·rows)."""

    rank: int
    num_ranks: int
    full_rows: int  # the number of experts E: the full tensor's first dimension


def sharded_parameters(model: nn.Module) -> dict[str, ExpertShard]:
    """The expert-parallel parameters of ``model`` by qualified name (empty when none)."""
    shards = {}
    for layer_name, layer in moe_layers(model):
        dispatcher = layer.dispatcher
        if isinstance(dispatcher, ExpertParallelDispatcher):
            prefix = f"{layer_name}.experts." if layer_name else "experts."
            shard = ExpertShard(dispatcher.rank, dispatcher.num_ranks, layer.config.num_experts)
            for name, _ in layer.experts.named_parameters():
                shards[prefix + name] = shard
    return shards





