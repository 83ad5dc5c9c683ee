"""``moekit bench ep``: what expert parallelism costs on this machine, for 1, 2 and 4 ranks.

For each number of ranks R the command starts R processes itself (torch.multiprocessing,
gloo, one thread each), shards one MoE layer's experts over them and times training steps
(forward + backward) of that layer, each rank with its own ``--tokens`` tokens (the data-
parallel batch grows with R, every rank keeps E/R experts). Per layer and step it reports
the bytes one rank sends to the others through all-to-all, next to the formula of
docs/scaling.md, and where the time goes:

    routing     router, capacity, the local dispatch plan; backward: router and the
                backward of the local permutation
    all-to-all  inside the collectives (counts, rows, their backward), waiting included
    experts     grouped GEMMs of the rank's experts, forward and backward
    combine     the local permutations around the all-to-alls and the weighted sum

Backward times are split with identity autograd Functions that stamp the clock when the
backward reaches them. Figures are medians over steps of the mean over ranks; the step
ratio is to the 1-process step measured in the same run.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moekit.capacity import apply_capacity, expert_capacity
from moekit.config import MoEConfig
from moekit.distributed.expert_parallel import expert_parallel, set_all_to_all_observer
from moekit.layer import MoE

STAGES = ("routing", "all_to_all", "experts", "combine")


@dataclass
class EPCase:
    d_model: int = 256
    d_ff: int = 512
    num_experts: int = 8
    top_k: int = 2
    tokens: int = 2048  # per rank
    steps: int = 6  # timed steps, after 2 warm-up steps
    capacity_factor: float | None = None


@dataclass
class AllToAllMeter:
    """What this rank's all-to-alls cost, counted while installed as the all-to-all observer
    (``set_all_to_all_observer(meter)``)."""

    calls: int = 0
    bytes_sent: int = 0  # to the other ranks (rows a rank keeps for itself are not sent)
    seconds: float = 0.0  # wall time inside the collectives, waiting for slower ranks included

    def __call__(self, bytes_sent: int, seconds: float) -> None:
        self.calls += 1
        self.bytes_sent += bytes_sent
        self.seconds += seconds


@dataclass
class EPRow:
    ranks: int
    experts_per_rank: int
    tokens_per_rank: int
    sent_mb: float
    formula_mb: float
    routing_ms: float
    all_to_all_ms: float
    experts_ms: float
    combine_ms: float
    step_ms: float
    step_ratio: float  # to the 1-process step of the same run (nan when 1 was not run)


def formula_bytes(
    tokens: int, top_k: int, d_model: int, num_experts: int, ranks: int, bytes_per_value: int = 4
) -> float:
    """All-to-all bytes one rank sends per layer per training step, uniform routing, dropless.

    Four row exchanges (dispatch and combine, forward and backward) of T·k rows of D values,
    of which the fraction (R−1)/R leaves the rank, plus the expert counts (E/R int64 to each
    of the R−1 other ranks).
    """
    rows = 4 * tokens * top_k * d_model * bytes_per_value * (ranks - 1) / ranks
    return rows + 8 * (num_experts // ranks) * (ranks - 1)


class _Stamp(torch.autograd.Function):
    """Identity; its backward writes (clock, all-to-all seconds so far) under ``name``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stamps: dict, name: str, meter: AllToAllMeter) -> torch.Tensor:
        ctx.stamps, ctx.name, ctx.meter = stamps, name, meter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.stamps[ctx.name] = (time.perf_counter(), ctx.meter.seconds)
        return grad, None, None, None


def timed_step(layer: MoE, x_TD: torch.Tensor, upstream_TD: torch.Tensor, meter: AllToAllMeter) -> dict[str, float]:
    """One forward + backward of ``layer``'s stages, the same calls as MoE.forward's unfused
    path; returns seconds per stage, the step, and the bytes sent."""
    config, dispatcher, experts = layer.config, layer.dispatcher, layer.experts
    layer.zero_grad(set_to_none=True)
    stamps: dict[str, tuple[float, float]] = {}
    bytes_before = meter.bytes_sent
    x_TD = x_TD.detach().requires_grad_(True)
    num_tokens = x_TD.shape[0]

    t0, c0 = time.perf_counter(), meter.seconds
    x_in = _Stamp.apply(x_TD, stamps, "input", meter)
    capacity_factor = layer.active_capacity_factor
    routing = layer.route(x_in, capacity_factor)
    assignments = routing.assignments
    if capacity_factor is not None and routing.capacity is None:
        capacity = expert_capacity(num_tokens, config.num_experts, config.top_k, capacity_factor, config.min_capacity)
        assignments, _ = apply_capacity(assignments, num_tokens, config.num_experts, capacity, config.drop_priority)
    plan = dispatcher.plan(assignments, num_tokens)
    t1, c1 = time.perf_counter(), meter.seconds
    rows = _Stamp.apply(dispatcher.dispatch(x_in, plan), stamps, "experts_in", meter)
    t2, c2 = time.perf_counter(), meter.seconds
    out = experts(rows, *dispatcher.expert_groups(plan))
    t3, c3 = time.perf_counter(), meter.seconds
    out = _Stamp.apply(out, stamps, "experts_out", meter)
    y_TD = dispatcher.combine(out, assignments.weight_N, plan)
    t4, c4 = time.perf_counter(), meter.seconds
    (y_TD * upstream_TD).sum().backward()
    t5, c5 = time.perf_counter(), meter.seconds

    (s_out, k_out), (s_in, k_in), (s_x, k_x) = stamps["experts_out"], stamps["experts_in"], stamps["input"]
    combine_forward = (t2 - t1) - (c2 - c1) + (t4 - t3) - (c4 - c3)
    combine_backward = (s_out - t4) - (k_out - c4) + (t5 - s_x) - (c5 - k_x)
    return {
        "routing": (t1 - t0) - (c1 - c0) + (s_x - s_in) - (k_x - k_in),
        "all_to_all": c5 - c0,
        "experts": (t3 - t2) - (c3 - c2) + (s_in - s_out) - (k_in - k_out),
        "combine": combine_forward + combine_backward,
        "step": t5 - t0,
        "bytes": float(meter.bytes_sent - bytes_before),
    }


def _worker(rank: int, num_ranks: int, store: str, case: EPCase, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=num_ranks, timeout=datetime.timedelta(seconds=120)
    )
    try:
        torch.manual_seed(0)
        config = MoEConfig(
            d_model=case.d_model, d_ff=case.d_ff, num_experts=case.num_experts, top_k=case.top_k,
            capacity_factor=case.capacity_factor, balance_loss_coef=0.0, z_loss_coef=0.0,
        )
        layer = expert_parallel(MoE(config))
        generator = torch.Generator().manual_seed(1000 + rank)
        x_TD = torch.randn(case.tokens, case.d_model, generator=generator)
        upstream_TD = torch.randn(case.tokens, case.d_model, generator=generator)
        meter = AllToAllMeter()
        previous = set_all_to_all_observer(meter)
        records = []
        try:
            for step in range(2 + case.steps):
                dist.barrier()  # every rank starts the step together: waits are the step's own
                record = timed_step(layer, x_TD, upstream_TD, meter)
                if step >= 2:
                    records.append(record)
        finally:
            set_all_to_all_observer(previous)
        Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(records))
    finally:
        dist.destroy_process_group()


def run_ranks(case: EPCase, num_ranks: int, start_method: str = "spawn") -> list[list[dict[str, float]]]:
    """Per rank, the timed steps' records."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="moekit-bench-ep-") as tmp:
        mp.start_processes(
            _worker,
            args=(num_ranks, os.path.join(tmp, "store"), case, tmp),
            nprocs=num_ranks,
            join=True,
            start_method=start_method,
        )
        return [json.loads(Path(tmp, f"rank-{rank}.json").read_text()) for rank in range(num_ranks)]


def summarize(case: EPCase, num_ranks: int, records: list[list[dict[str, float]]]) -> EPRow:
    def median_of_rank_means(key: str) -> float:
        per_step = [statistics.fmean(rank[step][key] for rank in records) for step in range(len(records[0]))]
        return statistics.median(per_step)

    return EPRow(
        ranks=num_ranks,
        experts_per_rank=case.num_experts // num_ranks,
        tokens_per_rank=case.tokens,
        sent_mb=median_of_rank_means("bytes") / 1e6,
        formula_mb=formula_bytes(case.tokens, case.top_k, case.d_model, case.num_experts, num_ranks) / 1e6,
        routing_ms=1e3 * median_of_rank_means("routing"),
        all_to_all_ms=1e3 * median_of_rank_means("all_to_all"),
        experts_ms=1e3 * median_of_rank_means("experts"),
        combine_ms=1e3 * median_of_rank_means("combine"),
        step_ms=1e3 * median_of_rank_means("step"),
        step_ratio=math.nan,
    )


def bench_ep(case: EPCase, ranks: list[int], start_method: str = "spawn", progress: bool = True) -> list[EPRow]:
    from tqdm import tqdm

    for num_ranks in ranks:
        if case.num_experts % num_ranks != 0:
            raise ValueError(f"--experts {case.num_experts} is not divisible by {num_ranks} ranks (--ranks)")
    rows = []
    for num_ranks in tqdm(ranks, desc="bench ep", unit="config", disable=not progress, file=sys.stderr):
        rows.append(summarize(case, num_ranks, run_ranks(case, num_ranks, start_method)))
    baseline = next((row.step_ms for row in rows if row.ranks == 1), math.nan)
    for row in rows:
        row.step_ratio = row.step_ms / baseline
    return rows


def table(rows: list[EPRow]) -> str:
    header = (
        f"{'ranks':>5} {'experts/rank':>12} {'tokens/rank':>11} {'sent MB':>8} {'formula MB':>10} "
        f"{'routing':>8} {'all-to-all':>10} {'experts':>8} {'combine':>8} {'step ms':>8} {'step':>6}"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r.ranks:>5} {r.experts_per_rank:>12} {r.tokens_per_rank:>11} {r.sent_mb:>8.3f} {r.formula_mb:>10.3f} "
            f"{r.routing_ms:>8.1f} {r.all_to_all_ms:>10.1f} {r.experts_ms:>8.1f} {r.combine_ms:>8.1f} "
            f"{r.step_ms:>8.1f} {r.step_ratio:>5.2f}x"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# moekit bench ep
# ---------------------------------------------------------------------------------------
