"""``moekit bench offload``: generation from an expert store at memory budgets below the model,
against the same model all in memory.

One moekit LM with random weights, built from a config (``bench_lm_config``): its routed
experts take at least 4x the CPU's last-level cache (read from sysfs) and at most ~2 GB, so
that decode streams experts from memory, and the store from disk. It is packed into a
temporary expert store three times: in its own dtype, int8 and int4 (``moekit pack
--experts-dtype``). Rows, all in this process and with the same weights:

- ``in memory``: the plain LM (every expert resident, its weights in huge pages as ``moekit
  sample`` places them), the reference of every ratio;
- ``store B%``: ``moekit.inference.load(store, memory_budget)`` with budget = non-expert bytes +
  B% of the expert bytes (default 100, 50, 25);
- ``int8 B%`` / ``int4 B%``: the int8 / int4 store at B% of the same-dtype expert bytes (the
  issue's 51% and 25%: where the quantized experts fit, see the ``fit`` column).

Each row generates greedily, batch 1, through one loop (``timed_generate``): prefill tokens/s
(the prompt's forward and the first token) and decode tokens/s (every later token, KV cache).
A **cold** run empties the row's expert cache and evicts the store's files from the page cache
(``posix_fadvise(DONTNEED)``) first, so experts come from storage; a **warm** run follows it
with the cache as the cold run left it. Rounds rotate the order of the rows; figures are
medians over rounds, ratios medians of per-round ratios to the in-memory row of that round.

Checks, in one untimed pass before the rounds (cold, as the timed runs):
- the logits of every step equal the in-memory model's bit for bit (quantized rows: the
  in-memory model with the same quantized experts, ``plain_lm_from_store`` of that store);
- peak resident bytes: RSS + the page-cache bytes of the store's files (``mincore``), sampled
  every few ms during the run, less the same figure just before it (the other rows' models
  live in this process too), plus the row's non-expert bytes; against budget x 1.05;
- the routing of the run is recorded, and the cache-policy simulator replays it (token by
  token, prompt then decoded tokens) with LRU, LFU and Belady's optimal policy at the row's
  capacity (its fewest slots per layer), beside the hit rate the run's cache had. The weights
  are random: the routing has no locality of a trained model, and the output says so.

The storage read bandwidth is measured on the store's expert files (a sequential read with
``O_DIRECT``, or buffered after evicting them from the page cache) and printed beside the figures.

Run: ``moekit bench offload`` (``--help`` for options; ``--quick`` is a smoke test).
"""

from __future__ import annotations

import contextlib
import errno
import math
import mmap
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.config import MoEConfig
from moekit.experiments.bench.generate import last_level_cache_bytes
from moekit.experiments.bench.layer import cpu_busy_fraction, cpu_model_name
from moekit.hugepages import place_in_huge_pages
from moekit.inference.generate import SamplingConfig, timed_generate
from moekit.inference.offload import load, plain_lm_from_store, plan_memory, preload_experts
from moekit.inference.policy_sim import simulate_trace
from moekit.inference.residency import resident_bytes
from moekit.inference.store import ExpertStore, write_store
from moekit.inference.trace import RoutingTrace, record_routing, replay_routing
from moekit.models.lm import KVCache, LMConfig, MoETransformerLM

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_BUDGETS = (100.0, 50.0, 25.0)  # % of the same-dtype expert bytes
DEFAULT_QUANT_BUDGETS = {"int8": 51.0, "int4": 25.0}  # the issue's: where int8 / int4 experts fit
LLC_MULTIPLE = 4  # experts at least this many times the last-level cache
MAX_EXPERT_BYTES = 2 * 10**9
RESIDENCY_SLACK = 0.05
SAMPLE_INTERVAL_S = 0.005
BANDWIDTH_READ_BYTES = 1 << 30  # at most this much of the expert files is read for the bandwidth
BANDWIDTH_CHUNK = 8 << 20


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def bench_lm_config(quick: bool, dtype: torch.dtype, llc_bytes: int | None, layers: int | None = None) -> LMConfig:
    """The benchmark's model: d_model = d_ff = 1024, 16 experts top-2 (SwiGLU), as many layers as
    make the experts 4x the last-level cache (at least 10, ~1 GB in bf16), at most ~2 GB of
    experts. ``quick``: d = 128, 8 experts, 2 layers. d and d_ff are multiples of 128 (int4)."""
    if quick:
        d_model, d_ff, experts, vocab, default_layers = 128, 128, 8, 256, 2
    else:
        d_model, d_ff, experts, vocab, default_layers = 1024, 1024, 16, 8192, 10
    per_layer = experts * 3 * d_model * d_ff * dtype.itemsize  # SwiGLU: w_in [D, 2F], w_out [F, D]
    if layers is None:
        layers = default_layers
        if not quick and llc_bytes:
            layers = max(layers, math.ceil(LLC_MULTIPLE * llc_bytes / per_layer))
            layers = min(layers, max(1, MAX_EXPERT_BYTES // per_layer))
    moe = MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=experts, top_k=2)
    return LMConfig(vocab_size=vocab, seq_len=2048, n_layer=layers, n_head=d_model // 64 if not quick else 2,
                    d_model=d_model, moe=moe, tie_embeddings=False)


# --------------------------------------------------------------------------------------------
# Storage bandwidth and residency
# --------------------------------------------------------------------------------------------


def storage_read_bandwidth(paths: Sequence[Path], limit_bytes: int = BANDWIDTH_READ_BYTES) -> tuple[float, str]:
    """GB/s (1e9 bytes) of one sequential read of ``paths`` (up to ``limit_bytes``), and how:
    ``O_DIRECT`` where the filesystem takes it, else buffered after evicting the files from
    the page cache (and evicting them again after)."""
    buffer = mmap.mmap(-1, BANDWIDTH_CHUNK)  # page-aligned: O_DIRECT needs it
    view = memoryview(buffer)
    total, seconds, methods = 0, 0.0, set()
    try:
        for path in paths:
            fd, method = -1, "buffered after posix_fadvise(DONTNEED)"
            if hasattr(os, "O_DIRECT"):
                try:
                    fd, method = os.open(path, os.O_RDONLY | os.O_DIRECT), "O_DIRECT"
                except OSError as error:
                    if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
            if fd < 0:
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            try:
                size = min(os.fstat(fd).st_size, limit_bytes - total)
                offset = 0
                start = time.perf_counter()
                while offset < size:
                    try:
                        count = os.preadv(fd, [view], offset)
                    except OSError as error:
                        if error.errno != errno.EINVAL or method != "O_DIRECT":
                            raise
                        os.close(fd)  # the filesystem opened O_DIRECT but refuses direct reads
                        fd, method = os.open(path, os.O_RDONLY), "buffered after posix_fadvise(DONTNEED)"
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        continue
                    if count <= 0:
                        break
                    offset += count
                seconds += time.perf_counter() - start
                total += offset
                methods.add(method)
                if method != "O_DIRECT":
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            if total >= limit_bytes:
                break
    finally:
        view.release()
        buffer.close()
    return (total / seconds / 1e9 if seconds > 0 else float("inf")), " and ".join(sorted(methods))


class ResidencySampler:
    """Peak of RSS + the page-cache bytes of ``files``, sampled in a thread while in the block."""

    def __init__(self, files: Sequence[Path], interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.files = list(files)
        self.interval_s = interval_s
        self.peak = 0
        self.samples = 0
        self.note: str | None = None
        self._done = threading.Event()

    def sample(self) -> int:
        residency = resident_bytes(self.files)
        self.note = residency.note
        self.peak = max(self.peak, residency.total_bytes)
        self.samples += 1
        return residency.total_bytes

    def _loop(self) -> None:
        while not self._done.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> ResidencySampler:
        self.baseline = self.sample()
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.sample()


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str  # "in memory", "store 50%", "int8 51%"
    experts_dtype: str  # same, int8, int4
    budget_percent: float | None  # of the same-dtype expert bytes; None: in memory
    model: Any = None
    store: ExpertStore | None = None
    memory_budget: int | None = None
    non_expert_bytes: int = 0
    cache_bytes: int = 0
    slots: dict[int, int] = field(default_factory=dict)
    fits_all: bool = True
    store_expert_percent: float | None = None  # the row's store's expert bytes, % of the same-dtype ones
    prefill: list[float] = field(default_factory=list)  # tokens/s per round (cold)
    decode: list[float] = field(default_factory=list)
    warm_prefill: list[float] = field(default_factory=list)
    warm_decode: list[float] = field(default_factory=list)
    decode_ratio: list[float] = field(default_factory=list)  # per round, to in memory
    warm_decode_ratio: list[float] = field(default_factory=list)
    identical: bool | None = None
    compared_to: str = ""
    peak_resident_bytes: int | None = None
    resident_limit_bytes: int | None = None
    residency_note: str | None = None
    cache: dict[str, Any] = field(default_factory=dict)  # the cold run's counters
    warm_hit_rate: float | None = None
    simulated: dict[str, float] = field(default_factory=dict)  # policy -> hit rate
    preload_s: list[float] = field(default_factory=list)  # per round: reading every expert (fits_all rows)

    @property
    def offloaded(self) -> bool:
        return self.store is not None

    def to_dict(self) -> dict[str, Any]:
        median = _median_or_none
        return {
            "name": self.name, "experts_dtype": self.experts_dtype, "budget_percent": self.budget_percent,
            "memory_budget_bytes": self.memory_budget, "non_expert_bytes": self.non_expert_bytes,
            "cache_bytes": self.cache_bytes, "slots_per_layer": {str(k): v for k, v in self.slots.items()},
            "all_experts_fit": self.fits_all, "store_expert_percent": self.store_expert_percent,
            "cold": {"prefill_tokens_per_s": median(self.prefill), "decode_tokens_per_s": median(self.decode),
                     "decode_vs_in_memory": median(self.decode_ratio),
                     "prefill_tokens_per_s_rounds": self.prefill, "decode_tokens_per_s_rounds": self.decode},
            "warm": {"prefill_tokens_per_s": median(self.warm_prefill), "decode_tokens_per_s": median(self.warm_decode),
                     "decode_vs_in_memory": median(self.warm_decode_ratio)} if self.offloaded else None,
            "logits_bit_identical": self.identical, "compared_to": self.compared_to,
            "peak_resident_bytes": self.peak_resident_bytes, "resident_limit_bytes": self.resident_limit_bytes,
            "resident_within_limit": None if self.peak_resident_bytes is None
            else self.peak_resident_bytes <= self.resident_limit_bytes,
            "residency_note": self.residency_note,
            "expert_cache": self.cache, "warm_hit_rate": self.warm_hit_rate,
            "simulated_hit_rate": self.simulated,
            "preload_s": median(self.preload_s), "preload_s_rounds": self.preload_s,
        }


def _median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def parse_budget_percent(text: str, flag: str) -> float:
    """A budget as a percentage of the same-dtype expert bytes: "50", "50%", "12.5"; in (0, 100]."""
    value = text.strip().removesuffix("%").strip()
    try:
        percent = float(value)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a budget: give a percentage of the expert bytes, "
                         "e.g. 100,50,25 or 51%") from None
    if not math.isfinite(percent) or not 0 < percent <= 100:
        raise ValueError(f"{flag}: {text!r} is invalid: a budget is a percentage of the expert bytes in (0, 100]")
    return percent


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


def _step(model: MoETransformerLM, keep: list[Tensor] | None, forced: list[int]):
    """The model's step for ``timed_generate``, whose greedy choice is then the next token of
    ``forced``: the model computes every step as in generation, but the tokens fed back are a
    fixed random sequence (the same for every row), not the model's own argmax.

    NOTE: greedy decoding of a model with random weights soon repeats one token, and a repeated
    token routes to the same experts every step: the cache would hit far more often than on any
    real text (a first version of this benchmark measured 87% hits at a 25% budget). Random
    tokens give routing without locality, the cache's hard case."""
    upcoming = iter(forced)

    def step(ids_BS: Tensor, cache: KVCache | None) -> tuple[Tensor, KVCache]:
        cache = KVCache(model.config.n_layer) if cache is None else cache
        with torch.no_grad():
            logits_BSV, _ = model(ids_BS, cache=cache, logits_to_keep=1)
        logits_BV = logits_BSV[:, -1]
        if keep is not None:
            keep.append(logits_BV.clone())
        choice_BV = torch.full_like(logits_BV, float("-inf"))
        choice_BV[:, next(upcoming)] = 0.0
        return choice_BV, cache

    return step


def _cold(row: Row, preload: bool = True) -> None:
    """Empty the row's expert cache and evict its store's files from the page cache; a row
    whose budget holds every expert then reads them all, as ``load`` does for it (timed apart:
    ``preload_s``), unless ``preload`` is False (the caller does it)."""
    if row.offloaded:
        row.model.expert_cache.clear()
        row.model.expert_cache.reset_counters()
        row.store.drop_from_page_cache()
        if row.fits_all and preload:
            started = time.perf_counter()
            preload_experts(row.model)
            row.preload_s.append(time.perf_counter() - started)
            row.model.expert_cache.reset_counters()


def run_row(
    row: Row,
    prompt: list[int],
    new_tokens: int,
    keep: list[Tensor] | None = None,
    routing: RoutingTrace | None = None,
    trace_start: int = 0,
):
    """Prefill ``prompt``, then decode ``new_tokens`` tokens, fed the fixed random sequence
    ``forced_tokens`` (``_step``); with ``routing``, every MoE layer routes as that trace says
    from position ``trace_start`` on (``replay_routing``: a trained model's choices)."""
    forced = forced_tokens(prompt, new_tokens, row.model.config.vocab_size)
    replay = replay_routing(row.model, routing, start=trace_start) if routing is not None else contextlib.nullcontext()
    with replay:
        return timed_generate(_step(row.model, keep, forced), prompt, new_tokens, SamplingConfig(greedy=True))


def forced_tokens(prompt: list[int], new_tokens: int, vocab_size: int) -> list[int]:
    """The decode's tokens: uniform over the vocabulary, seeded by the prompt (so the same for
    every row and round)."""
    generator = torch.Generator().manual_seed(sum(prompt) * 7919 + len(prompt))
    return torch.randint(0, vocab_size, (new_tokens,), generator=generator).tolist()


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class OffloadBenchReport:
    cpu: str
    threads: int
    cpu_busy_before: float | None
    dtype: str
    config: dict[str, Any]
    llc_bytes: int | None
    expert_bytes: int
    non_expert_bytes: int
    experts_vs_llc: float | None
    storage_gbps: float
    storage_method: str
    prompt_tokens: int
    new_tokens: int
    rounds: int
    rows: list[Row]
    trace_note: str
    cache_policy: str = "lru"

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu, "threads": self.threads, "cpu_busy_before": self.cpu_busy_before, "dtype": self.dtype,
            "model": self.config, "llc_bytes": self.llc_bytes, "expert_bytes": self.expert_bytes,
            "non_expert_bytes": self.non_expert_bytes, "experts_vs_llc": self.experts_vs_llc,
            "storage_read_gbps": self.storage_gbps, "storage_read_method": self.storage_method,
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens, "rounds": self.rounds,
            "all_bit_identical": all(row.identical for row in self.rows if row.identical is not None),
            "trace_note": self.trace_note, "cache_policy": self.cache_policy,
            "rows": [row.to_dict() for row in self.rows],
        }

    def table(self) -> str:
        mb = 1e6 if self.expert_bytes >= 10**8 else 1e3  # kB for the --quick model
        unit = "MB" if mb == 1e6 else "kB"
        llc = f"{self.llc_bytes / 2**20:.0f} MiB" if self.llc_bytes else "unknown"
        ratio = f"{self.experts_vs_llc:.1f}x the LLC" if self.experts_vs_llc else "LLC unknown"
        small = self.experts_vs_llc is not None and self.experts_vs_llc < LLC_MULTIPLE
        lines = [
            *([f"NOTE: the experts are {self.experts_vs_llc:.1f}x the last-level cache, under {LLC_MULTIPLE}x: "
               "decode may run from the CPU cache (a --quick or --layers model)"] if small else []),
            f"moekit bench offload: {self.cpu}, {self.threads} threads"
            + (f", CPU {self.cpu_busy_before:.0%} busy before" if self.cpu_busy_before is not None else ""),
            f"model: {self.config['n_layer']} layers, d={self.config['d_model']}, {self.config['moe']['num_experts']} "
            f"experts top-{self.config['moe']['top_k']}, {self.dtype}; experts {self.expert_bytes / mb:,.0f} {unit} "
            f"({ratio}: {llc}), non-expert {self.non_expert_bytes / mb:,.1f} {unit}",
            f"storage read bandwidth: {self.storage_gbps:.2f} GB/s ({self.storage_method}, the store's expert files); "
            f"expert cache policy: {self.cache_policy}",
            f"batch 1, prompt {self.prompt_tokens} random tokens, {self.new_tokens} new fed random tokens (not the "
            f"argmax: a random model's greedy output repeats one token and routes without variety); "
            f"medians of {self.rounds} rounds; cold = expert cache emptied and store files evicted from the page "
            "cache before the run, warm = the cache the cold run left",
            "",
            f"{'row':<14} {'budget ' + unit:>10} {'fit':>4} {'prefill/s':>10} {'decode/s':>9} {'x mem':>6} "
            f"{'warm dec/s':>10} {'x mem':>6} {'exact':>6} {'peak ' + unit:>9} {'limit ' + unit:>9} "
            f"{'hit':>6} {'LRU sim':>7} {'LFU sim':>7} {'Belady':>7}",
        ]

        def fmt(value: float | None, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        for row in self.rows:
            warm_dec = _median_or_none(row.warm_decode) if row.offloaded else None
            exact = "-" if row.identical is None else ("yes" if row.identical else "NO")
            hit = row.cache.get("hit_rate") if row.cache else None
            lines.append(
                f"{row.name:<14} {fmt(row.memory_budget and row.memory_budget / mb, ',.0f'):>10} "
                f"{('yes' if row.fits_all else 'no') if row.offloaded else '-':>4} "
                f"{fmt(_median_or_none(row.prefill), ',.1f'):>10} {fmt(_median_or_none(row.decode), ',.2f'):>9} "
                f"{fmt(_median_or_none(row.decode_ratio), '.2f'):>6} {fmt(warm_dec, ',.2f'):>10} "
                f"{fmt(_median_or_none(row.warm_decode_ratio), '.2f'):>6} {exact:>6} "
                f"{fmt(row.peak_resident_bytes and row.peak_resident_bytes / mb, ',.0f'):>9} "
                f"{fmt(row.resident_limit_bytes and row.resident_limit_bytes / mb, ',.0f'):>9} "
                f"{fmt(hit, '.1%'):>6} {fmt(row.simulated.get('lru'), '.1%'):>7} "
                f"{fmt(row.simulated.get('lfu'), '.1%'):>7} {fmt(row.simulated.get('belady'), '.1%'):>7}"
            )
        quantized = [row for row in self.rows if row.offloaded and row.experts_dtype != "same"]
        fits = {row.experts_dtype: row.store_expert_percent for row in quantized}
        preloaded = [f"{row.name} {_median_or_none(row.preload_s):.2f} s" for row in self.rows if row.preload_s]
        lines += [
            "",
            *([f"fit yes: every expert read before the run, as moekit.inference.load does when the budget holds them "
               f"all (median seconds, cold page cache: {', '.join(preloaded)}); their cold runs start from that"]
              if preloaded else []),
            *([", ".join(f"{name} experts take {percent:.1f}% of the same-dtype expert bytes" for name, percent
                         in fits.items()) + " (fit: yes at a budget at or above that)"] if fits else []),
            "x mem: decode tokens/s as a ratio to the in-memory row (same dtype) of the same round; exact: every "
            "step's logits equal the in-memory model's bit for bit (int8/int4: the in-memory model with the same "
            "quantized experts); peak: RSS + the store's page-cache bytes during the cold run, over its start, plus "
            "the non-expert bytes; limit: budget x 1.05; hit: the cold run's expert-cache hit rate (its policy above); "
            "LRU / LFU sim, Belady: the policy simulator on the run's routing trace at the row's slots per layer.",
            self.trace_note,
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def bench_offload(
    dtype: str = "bfloat16",
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    quant_budgets: dict[str, float] | None = None,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    rounds: int = 3,
    quick: bool = False,
    seed: int = 0,
    layers: int | None = None,
    directory: str | Path | None = None,
    log=None,
    routing_trace: str | Path | None = None,
    cache_policy: str = "lru",
) -> OffloadBenchReport:
    """Build, pack, check and time (see the module docstring). ``directory``: where the
    temporary stores go (default the system's temporary directory); removed at the end.
    ``routing_trace``: a recorded trace (``moekit trace record``) whose choices every row's MoE
    layers replay (``replay_routing``), so the caches see that model's locality: round r of
    every row starts at trace position r · (prompt + new tokens), the check pass at 0."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: use {' or '.join(DTYPES)}")
    for name, value in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens), ("rounds", rounds)):
        if value < 1:
            raise ValueError(f"{name}={value} is invalid: must be >= 1")
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens} is invalid: decode needs at least 2 new tokens")
    quant_budgets = dict(DEFAULT_QUANT_BUDGETS if quant_budgets is None else quant_budgets)
    log = log or (lambda message: None)
    torch_dtype = DTYPES[dtype]
    busy = cpu_busy_fraction()
    llc = last_level_cache_bytes()
    config = bench_lm_config(quick, torch_dtype, llc, layers)
    if prompt_tokens + new_tokens > config.seq_len:
        raise ValueError(f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the model's "
                         f"{config.seq_len} positions")
    routing = RoutingTrace.load(routing_trace) if routing_trace is not None else None  # TraceError: a ValueError
    torch.manual_seed(seed)
    log(f"building the model ({config.n_layer} layers, d={config.d_model}, {dtype})")
    plain = MoETransformerLM(config).to(torch_dtype).eval()
    # NOTE: in huge pages, as moekit sample places a run's weights and load() an offloaded
    # model's (resident weights and expert slots): every row streams its weights from them.
    place_in_huge_pages(plain)
    if routing is not None:
        with replay_routing(plain, routing):  # refuses a trace this model cannot follow, by layer, before packing
            pass
    prompt = torch.randint(0, config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(seed + 1))
    prompt_ids = prompt.tolist()
    root = Path(tempfile.mkdtemp(prefix="moekit-bench-offload-", dir=directory))
    try:
        stores = {}
        for experts_dtype in ("same", *quant_budgets):
            log(f"packing the {experts_dtype} store into {root}")
            stores[experts_dtype] = ExpertStore(
                write_store(root / experts_dtype, config, plain.state_dict().items(), experts_dtype=experts_dtype)
            )
        same_plan = plan_memory(stores["same"], None)
        expert_bytes, non_expert = same_plan.expert_bytes, same_plan.non_expert_bytes
        gbps, method = storage_read_bandwidth(stores["same"].expert_files)

        rows = [Row("in memory", "same", None, model=plain, non_expert_bytes=non_expert)]
        for experts_dtype, percents in (("same", budgets), *((s, [p]) for s, p in quant_budgets.items())):
            for percent in percents:
                store = stores[experts_dtype]
                budget = non_expert + int(expert_bytes * percent / 100)
                label = "store" if experts_dtype == "same" else experts_dtype
                # BudgetError (a ValueError) names the minimum
                model = load(store, memory_budget=budget, cache_policy=cache_policy)
                plan = model.memory_plan
                rows.append(Row(
                    f"{label} {percent:g}%", experts_dtype, percent, model=model, store=store, memory_budget=budget,
                    non_expert_bytes=plan.non_expert_bytes, cache_bytes=plan.cache_bytes, slots=dict(plan.slots),
                    fits_all=all(plan.slots[layer] == plan.num_experts[layer] for layer in plan.slots),
                    store_expert_percent=100 * plan.expert_bytes / expert_bytes,
                ))

        _check_pass(rows, stores, prompt_ids, new_tokens, log, routing)
        _timed_rounds(rows, prompt_ids, new_tokens, rounds, log, routing)
        threads = torch.get_num_threads()
        return OffloadBenchReport(
            cpu=cpu_model_name(), threads=threads, cpu_busy_before=busy, dtype=dtype, config=config.to_dict(),
            llc_bytes=llc, expert_bytes=expert_bytes, non_expert_bytes=non_expert,
            experts_vs_llc=expert_bytes / llc if llc else None, storage_gbps=gbps, storage_method=method,
            prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds, rows=rows,
            trace_note=_trace_note(routing, routing_trace), cache_policy=cache_policy,
        )
    finally:
        for store in locals().get("stores", {}).values():
            store.close()
        shutil.rmtree(root, ignore_errors=True)


def _trace_note(routing: RoutingTrace | None, path: str | Path | None) -> str:
    if routing is None:
        return ("The routing comes from this model's random weights (untrained): it has none of a trained "
                "model's locality, so the hit rates here say nothing about a trained model's (--routing-trace "
                "replays a recorded one).")
    meta = routing.metadata
    trained = "a trained model" if routing.trained else "an UNTRAINED model"
    return (f"The routing is replayed from {path} ({trained}: {meta.get('model', '?')}, "
            f"{meta.get('source', '?')}; {routing.num_tokens:,} tokens of {meta.get('text', '?')}): model layer i "
            f"takes trace layer i mod {len(routing.layers)}; the weights are random, the choices the trace's.")


def _check_pass(
    rows: list[Row], stores: dict[str, ExpertStore], prompt: list[int], new_tokens: int, log,
    routing: RoutingTrace | None = None,
) -> None:
    """One cold run of every row: bit-exactness, peak residency, the routing trace and the simulator."""
    log("checking logits, residency and cache policies (untimed)")
    reference: list[Tensor] = []
    with contextlib.ExitStack() as blocks:
        if routing is not None:  # outside the recording, which then records the replayed choices
            blocks.enter_context(replay_routing(rows[0].model, routing))
        recorder = blocks.enter_context(record_routing(rows[0].model))
        run_row(rows[0], prompt, new_tokens, keep=reference)
    source = "replayed trace (bench offload)" if routing is not None else "random weights (bench offload)"
    trace = recorder.trace(source=source, trained=routing is not None and routing.trained, model="bench offload",
                           text="random prompt")
    quantized_reference: dict[str, list[Tensor]] = {}
    for experts_dtype, store in stores.items():
        if experts_dtype == "same":
            continue
        in_memory = plain_lm_from_store(store)
        logits: list[Tensor] = []
        run_row(Row("quantized in memory", experts_dtype, None, model=in_memory), prompt, new_tokens, keep=logits,
                routing=routing)
        quantized_reference[experts_dtype] = logits
        del in_memory
    for row in rows[1:]:
        want = reference if row.experts_dtype == "same" else quantized_reference[row.experts_dtype]
        row.compared_to = "in memory" if row.experts_dtype == "same" else f"in memory with {row.experts_dtype} experts"
        _cold(row, preload=False)
        got: list[Tensor] = []
        with ResidencySampler(row.store.files) as sampler:
            if row.fits_all:  # counted: the preloaded experts are resident bytes of the run
                preload_experts(row.model)
            run_row(row, prompt, new_tokens, keep=got, routing=routing)
        row.identical = len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want, strict=False))
        row.peak_resident_bytes = row.non_expert_bytes + max(0, sampler.peak - sampler.baseline)
        row.resident_limit_bytes = int(row.memory_budget * (1 + RESIDENCY_SLACK))
        row.residency_note = sampler.note
        capacity = min(row.slots.values())
        row.simulated = {r.policy: r.hit_rate for r in simulate_trace(trace, capacity, ("lru", "lfu", "belady"))}
        log(f"  {row.name}: logits {'identical' if row.identical else 'DIFFER'}, peak resident "
            f"{row.peak_resident_bytes / 1e6:,.2f} MB of {row.resident_limit_bytes / 1e6:,.2f} MB allowed")


def _timed_rounds(
    rows: list[Row], prompt: list[int], new_tokens: int, rounds: int, log, routing: RoutingTrace | None = None
) -> None:
    for round_index in range(rounds):
        log(f"round {round_index + 1} of {rounds}")
        start = round_index * (len(prompt) + new_tokens)  # each round a new stretch of the trace
        shift = round_index % len(rows)
        order = rows[shift:] + rows[:shift]
        cold_decode: dict[str, float] = {}
        warm_decode: dict[str, float] = {}
        for row in order:
            _cold(row)
            result = run_row(row, prompt, new_tokens, routing=routing, trace_start=start)
            row.prefill.append(result.prefill_tokens_per_s)
            row.decode.append(result.decode_tokens_per_s)
            cold_decode[row.name] = result.decode_tokens_per_s
            if row.offloaded:
                stats = row.model.expert_cache.stats()
                row.cache = stats.to_dict()
                row.model.expert_cache.reset_counters()
                warm = run_row(row, prompt, new_tokens, routing=routing, trace_start=start)
                row.warm_prefill.append(warm.prefill_tokens_per_s)
                row.warm_decode.append(warm.decode_tokens_per_s)
                warm_decode[row.name] = warm.decode_tokens_per_s
                row.warm_hit_rate = row.model.expert_cache.stats().hit_rate
        reference = cold_decode[rows[0].name]
        for row in rows:
            row.decode_ratio.append(cold_decode[row.name] / reference)
            if row.offloaded:
                row.warm_decode_ratio.append(warm_decode[row.name] / reference)
