"""Benchmarks of the MoE layer against its dense equivalent (DESIGN.md, "Performance contract").

Shape suffixes: T tokens, D d_model, F expert hidden size, E experts, K top_k, N = T·K rows.

The cost to beat is the *dense equivalent*: one expert-sized FFN (same activation, no bias)
applied to N = T·K rows that are given as an input requiring grad, since an MoE has to build
those rows and send their gradient back. Every figure is a ratio to it:

- time: each implementation alternates with the dense equivalent, one training step each per
  round (parameter gradients reset to None as ``zero_grad()`` does, forward, backward with a
  fixed random upstream gradient that is the same for every implementation), for ``rounds``
  rounds after a warm-up; the figure is the median of the per-round ratios. Each MoE
  implementation gets rounds of its own: inside one round, one implementation's allocations
  would slow the next one.
- memory: peak live bytes allocated during one forward+backward (``peak_activation_bytes``),
  parameters and parameter gradients excluded, the dense equivalent's N input rows included.

Notable details:

- The moekit layer runs in training mode with its default losses, so its forward also
  computes the balance loss and z-loss (their gradient is not part of the step).
- The transformers blocks (``MixtralSparseMoeBlock`` with the "eager" and "grouped_mm" experts
  implementations, ``SwitchTransformersSparseMLP``) are built from small configs and given the
  moekit layer's weights, so they route every token the same way.
- The allocator: the headline figures run under glibc malloc's defaults, which is what
  ``moekit train`` and a user's own script get. Beside them (``malloc="both"``, the default),
  every case runs again in a second process in which glibc keeps freed memory for reuse
  instead of handing every large buffer back to the kernel (see ``_reuse_freed_memory``), as
  PyTorch's caching allocator does on GPUs. That setting cannot be undone inside a process
  (glibc stops adapting its mmap threshold once it is set), hence the second process, which
  runs case by case between the default-allocator cases, so both see the same machine.

Run: ``moekit bench layer`` (``moekit bench layer --help`` for options).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from moekit.capacity import expert_capacity
from moekit.config import MoEConfig
from moekit.experts import DenseFFN
from moekit.layer import MoE

MOEKIT = "moekit"
HF_MIXTRAL_EAGER = "hf-mixtral-eager"
HF_MIXTRAL_GROUPED = "hf-mixtral-grouped_mm"
HF_SWITCH = "hf-switch"
HF_IMPLS = (HF_MIXTRAL_EAGER, HF_MIXTRAL_GROUPED, HF_SWITCH)
BUSY_WARNING = 0.15  # share of the CPUs other processes may keep busy before timings get noisy
MALLOC_MODES = ("both", "default", "reuse")  # which allocator settings to measure
DEFAULT_MALLOC, REUSE_MALLOC = "default", "reuse"
ALLOCATOR_LABELS = {
    DEFAULT_MALLOC: "glibc malloc defaults (what moekit train and your own scripts get)",
    REUSE_MALLOC: "glibc malloc keeping freed memory for reuse (mallopt, in a second process)",
}


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------


def _allocation_events(prof: torch.profiler.profile) -> list[tuple[int, int, int]]:
    """(time_ns, ptr, bytes) of every CPU allocation (bytes > 0) and free (bytes < 0), in order."""
    allocation = torch._C._profiler._EventType.Allocation
    events: list[tuple[int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == allocation:
            fields_ = node.extra_fields
            events.append((node.start_time_ns, fields_.allocation_id, fields_.ptr, fields_.alloc_size))
    # NOTE: allocation_id increases with every allocation and free, so it orders events that
    # share a timestamp.
    events.sort(key=lambda e: (e[0], e[1]))
    return [(t, ptr, size) for t, _, ptr, size in events]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's own start/stop log lines and its warning
    about blocks allocated before it started (which are deliberately not counted)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_activation_bytes(fn: Callable[[], Any], params: Iterable[Tensor] = ()) -> int:
    """Peak bytes of CPU memory live at once while ``fn()`` runs, counting only what it allocates.

    Memory that exists before the call (parameters, inputs) is not counted; neither is the
    ``.grad`` of any of ``params`` that is still live when ``fn`` returns (parameter gradients).
    Everything else allocated inside (activations saved for backward, temporaries inside ops,
    input gradients, outputs) counts while it is live. Measured from the allocation events of
    ``torch.profiler`` (``profile_memory=True``), so it sees every tensor allocation made by
    PyTorch on the calling thread, including buffers that never reach Python.
    """
    params = list(params)
    with (
        _quiet_stderr(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    grad_ptrs = {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
    events = _allocation_events(prof)
    # The parameter gradients are the allocations at those addresses that are never freed.
    last_alloc_at: dict[int, int] = {}
    for i, (_, ptr, size) in enumerate(events):
        last_alloc_at[ptr] = i if size > 0 else -1
    excluded = {i for ptr, i in last_alloc_at.items() if i >= 0 and ptr in grad_ptrs}
    live: dict[int, int] = {}
    total = peak = 0
    for i, (_, ptr, size) in enumerate(events):
        if size > 0:
            if i in excluded:
                continue
            live[ptr] = size
            total += size
            peak = max(peak, total)
        elif ptr in live:
            # NOTE: frees of blocks allocated before the call are ignored: their size is
            # unknown to this measurement, and they were not counted.
            total -= live.pop(ptr)
    return peak


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCase:
    key: str
    kind: str  # what is special about the case, e.g. "dropless top-2 SwiGLU"
    config: dict[str, Any]  # MoEConfig fields
    num_tokens: int
    metric: str  # "time" or "memory"
    target: float  # ratio the moekit layer must stay at or under
    hf_impls: tuple[str, ...] = ()
    beat: str | None = None  # an implementation moekit must also be faster than

    @property
    def moe_config(self) -> MoEConfig:
        return MoEConfig(**self.config)

    @property
    def title(self) -> str:
        c = self.config
        return f"{self.kind}, E={c['num_experts']} k={c['top_k']} d={c['d_model']} f={c['d_ff']} T={self.num_tokens}"

    @property
    def dense_rows(self) -> int:
        return self.num_tokens * self.config["top_k"]


LAYER_CASES: tuple[LayerCase, ...] = (
    LayerCase(
        "1",
        "dropless top-k SwiGLU",
        dict(num_experts=8, top_k=2, d_model=512, d_ff=1024, activation="swiglu"),
        num_tokens=4096,
        metric="time",
        target=1.05,
        hf_impls=(HF_MIXTRAL_EAGER, HF_MIXTRAL_GROUPED),
    ),
    LayerCase(
        "2",
        "fine-grained SwiGLU",
        dict(num_experts=64, top_k=8, d_model=512, d_ff=256, activation="swiglu"),
        num_tokens=4096,
        metric="time",
        target=1.20,
        hf_impls=(HF_MIXTRAL_EAGER, HF_MIXTRAL_GROUPED),
        beat=HF_MIXTRAL_GROUPED,
    ),
    LayerCase(
        "3",
        "fine-grained SwiGLU",
        dict(num_experts=64, top_k=6, d_model=256, d_ff=128, activation="swiglu"),
        num_tokens=8192,
        metric="time",
        target=1.20,
        hf_impls=(HF_MIXTRAL_EAGER, HF_MIXTRAL_GROUPED),
        beat=HF_MIXTRAL_GROUPED,
    ),
    LayerCase(
        "4",
        "Switch ReLU, capacity 1.25",
        dict(
            num_experts=64,
            top_k=1,
            d_model=512,
            d_ff=1024,
            activation="relu",
            router="switch",
            capacity_factor=1.25,
        ),
        num_tokens=4096,
        metric="time",
        target=1.15,
        hf_impls=(HF_SWITCH,),
    ),
    LayerCase(
        "5",
        "peak memory, SwiGLU",
        dict(num_experts=64, top_k=8, d_model=512, d_ff=256, activation="swiglu"),
        num_tokens=16384,
        metric="memory",
        target=1.30,
        hf_impls=(HF_MIXTRAL_GROUPED,),
    ),
)


def quick_case(case: LayerCase) -> LayerCase:
    """The same case at toy sizes (E and k kept), for a smoke test."""
    config = dict(case.config, d_model=64, d_ff=64 if case.config["d_ff"] <= 256 else 128)
    return replace(case, config=config, num_tokens=512 if case.metric == "memory" else 256)


def select_cases(keys: Sequence[str] | None, quick: bool) -> list[LayerCase]:
    by_key = {case.key: case for case in LAYER_CASES}
    if keys:
        unknown = [key for key in keys if key not in by_key]
        if unknown:
            raise ValueError(f"unknown case(s) {unknown}; choose from {sorted(by_key)}")
        cases = [by_key[key] for key in dict.fromkeys(keys)]
    else:
        cases = list(LAYER_CASES)
    return [quick_case(case) for case in cases] if quick else cases


# --------------------------------------------------------------------------------------------
# Subjects: one module, its input and its upstream gradient
# --------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """One training step of a module: reset gradients, forward, backward."""

    name: str
    module: nn.Module
    forward: Callable[[Tensor], Tensor]
    x: Tensor  # leaf input, requires grad
    grad_out: Tensor  # fixed upstream gradient, contiguous, y's shape

    def reset(self) -> None:
        self.module.zero_grad(set_to_none=True)
        self.x.grad = None

    def run(self) -> None:
        y = self.forward(self.x)
        y.backward(self.grad_out.view(y.shape))

    def step(self) -> None:
        self.reset()
        self.run()


def _hf_mixtral(moe: MoE, impl: str) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    c = moe.config
    # NOTE: transformers 5 picks the experts kernel from config._experts_implementation
    # ("eager": a loop over experts; "grouped_mm": torch grouped GEMM); the constructor's
    # ``experts_implementation`` keyword sets it.
    config = MixtralConfig(
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_local_experts=c.num_experts,
        num_experts_per_tok=c.top_k,
        hidden_act="silu",
        router_jitter_noise=0.0,
        experts_implementation=impl,
    )
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        # moekit w_in [E, D, 2F] = [gate | up]; transformers gate_up_proj [E, 2F, D], gate first.
        block.experts.gate_up_proj.copy_(moe.experts.w_in.transpose(1, 2))
        block.experts.down_proj.copy_(moe.experts.w_out.transpose(1, 2))
    return block


def _hf_switch(moe: MoE, num_tokens: int) -> nn.Module:
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    c = moe.config
    capacity = expert_capacity(num_tokens, c.num_experts, 1, c.capacity_factor, c.min_capacity)
    config = SwitchTransformersConfig(
        d_model=c.d_model,
        d_ff=c.d_ff,
        num_experts=c.num_experts,
        expert_capacity=capacity,
        dense_act_fn="relu",
        router_bias=False,
        router_jitter_noise=0.0,
        router_dtype="float32",
        dropout_rate=0.0,
    )
    block = SwitchTransformersSparseMLP(config)
    with torch.no_grad():
        block.router.classifier.weight.copy_(moe.router.weight)
        for e in range(c.num_experts):
            expert = block.experts[f"expert_{e}"]
            expert.wi.weight.copy_(moe.experts.w_in[e].t())
            expert.wo.weight.copy_(moe.experts.w_out[e].t())
    return block


def build_subjects(case: LayerCase, impls: Sequence[str], seed: int) -> tuple[Subject, dict[str, Subject]]:
    """The dense equivalent and each implementation, on the same weights and inputs."""
    torch.manual_seed(seed)
    config = case.moe_config
    d_model, num_tokens, num_rows = config.d_model, case.num_tokens, case.dense_rows
    moe = MoE(config).train()
    dense = DenseFFN(d_model, config.d_ff, config.activation).train()
    x_TD = torch.randn(num_tokens, d_model, requires_grad=True)
    grad_TD = torch.randn(num_tokens, d_model)
    x_rows_ND = torch.randn(num_rows, d_model, requires_grad=True)
    grad_ND = torch.randn(num_rows, d_model)
    dense_subject = Subject("dense", dense, dense, x_rows_ND, grad_ND)

    subjects: dict[str, Subject] = {}
    for impl in impls:
        if impl == MOEKIT:
            subjects[impl] = Subject(impl, moe, moe, x_TD, grad_TD)
        elif impl in (HF_MIXTRAL_EAGER, HF_MIXTRAL_GROUPED):
            block = _hf_mixtral(moe, "eager" if impl == HF_MIXTRAL_EAGER else "grouped_mm").train()
            subjects[impl] = Subject(impl, block, _batch_of_one(block, d_model), x_TD, grad_TD)
        elif impl == HF_SWITCH:
            block = _hf_switch(moe, num_tokens).train()
            subjects[impl] = Subject(impl, block, _batch_of_one(block, d_model), x_TD, grad_TD)
        else:
            raise ValueError(f"unknown implementation {impl!r}")
    return dense_subject, subjects


def _batch_of_one(block: nn.Module, d_model: int) -> Callable[[Tensor], Tensor]:
    """transformers blocks take [batch, seq, D]: the T tokens as one sequence."""
    return lambda x_TD: block(x_TD.view(1, -1, d_model))


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], None]) -> float:
    # NOTE: no garbage collection inside a timed step (autograd graphs are freed by
    # reference counting; a collection would only add noise).
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


@dataclass
class ImplResult:
    impl: str
    ratio: float  # median of the per-round ratios (time) or the peak ratio (memory)
    target: float | None = None
    beat: str | None = None
    passed: bool | None = None
    round_ratios: list[float] = field(default_factory=list)
    seconds: float | None = None  # median step time of the implementation
    dense_seconds: float | None = None  # median step time of the dense equivalent
    peak_bytes: int | None = None
    dense_peak_bytes: int | None = None
    max_abs_diff: float | None = None  # of the forward output against moekit's
    malloc_reuse: ImplResult | None = None  # the same measurement with malloc reuse, when taken

    def to_dict(self) -> dict[str, Any]:
        out = self.figures()
        if self.target is not None:
            out.update(target=self.target, beat=self.beat, passed=self.passed)
        if self.max_abs_diff is not None:
            out["max_abs_diff"] = self.max_abs_diff
        if self.malloc_reuse is not None:
            out["malloc_reuse"] = self.malloc_reuse.figures()
        return out

    def figures(self) -> dict[str, Any]:
        """The measurement alone (no verdict)."""
        out: dict[str, Any] = {"impl": self.impl, "ratio": round(self.ratio, 4)}
        if self.round_ratios:
            out["round_ratios"] = [round(r, 4) for r in self.round_ratios]
            out["seconds"] = self.seconds
            out["dense_seconds"] = self.dense_seconds
        if self.peak_bytes is not None:
            out["peak_bytes"] = self.peak_bytes
            out["dense_peak_bytes"] = self.dense_peak_bytes
        return out


@dataclass
class CaseResult:
    case: LayerCase
    results: list[ImplResult]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool | None:
        verdicts = [r.passed for r in self.results if r.passed is not None]
        return all(verdicts) if verdicts else None

    def to_dict(self) -> dict[str, Any]:
        case = self.case
        return {
            "id": case.key,
            "title": case.title,
            "metric": case.metric,
            "num_tokens": case.num_tokens,
            "dense_rows": case.dense_rows,
            "config": case.config,
            "target": case.target,
            "passed": self.passed,
            "results": [r.to_dict() for r in self.results],
            "notes": self.notes,
        }


def time_against_dense(
    subject: Subject, dense: Subject, rounds: int, warmup: int, tick: Callable[[], None]
) -> ImplResult:
    """Alternate one step of ``subject`` with one of ``dense``; median of the round ratios."""
    for _ in range(warmup):
        subject.step()
        dense.step()
        tick()
    gc.collect()
    ratios, impl_times, dense_times = [], [], []
    for r in range(rounds):
        # Alternate which goes first, so that drift within a round favours neither.
        if r % 2 == 0:
            t_dense, t_impl = _timed(dense.step), _timed(subject.step)
        else:
            t_impl, t_dense = _timed(subject.step), _timed(dense.step)
        ratios.append(t_impl / t_dense)
        impl_times.append(t_impl)
        dense_times.append(t_dense)
        tick()
    subject.reset()
    dense.reset()
    return ImplResult(
        subject.name,
        statistics.median(ratios),
        round_ratios=ratios,
        seconds=statistics.median(impl_times),
        dense_seconds=statistics.median(dense_times),
    )


def memory_against_dense(subject: Subject, dense: Subject, dense_peak: int) -> ImplResult:
    subject.step()  # warm-up: lazy initialization allocates nothing inside the measurement
    subject.reset()
    gc.collect()
    peak = peak_activation_bytes(subject.run, subject.module.parameters())
    subject.reset()
    return ImplResult(subject.name, peak / dense_peak, peak_bytes=peak, dense_peak_bytes=dense_peak)


def dense_peak_bytes(dense: Subject) -> int:
    """The dense equivalent's peak, its N input rows included (an MoE must build them)."""
    dense.step()
    dense.reset()
    gc.collect()
    peak = peak_activation_bytes(dense.run, dense.module.parameters())
    dense.reset()
    return peak + dense.x.numel() * dense.x.element_size()


def _judge(result: ImplResult, case: LayerCase, by_impl: dict[str, ImplResult]) -> None:
    result.target = case.target
    result.passed = result.ratio <= case.target
    if case.beat is not None and case.beat in by_impl:
        result.beat = case.beat
        result.passed = result.passed and result.ratio < by_impl[case.beat].ratio


def output_differences(subjects: dict[str, Subject]) -> dict[str, float]:
    """Max |y - y_moekit| of each other implementation's forward: they share the weights, so
    they must compute the same function (a timing of something else would be meaningless)."""
    reference = subjects[MOEKIT]
    diffs: dict[str, float] = {}
    with torch.no_grad():
        y_ref = reference.forward(reference.x).reshape(reference.grad_out.shape)
        for impl, subject in subjects.items():
            if impl != MOEKIT:
                y = subject.forward(subject.x).reshape(y_ref.shape)
                diffs[impl] = float((y.float() - y_ref.float()).abs().max())
    return diffs


def cpu_busy_fraction(seconds: float = 0.5) -> float | None:
    """Fraction of all CPUs' time that was busy over ``seconds`` (Linux /proc/stat), or None.

    Taken before the benchmark starts: other processes on the machine make the timings noisy.
    """

    def read() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:9]]
        return sum(values), values[3] + values[4]  # all, idle + iowait

    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return 1.0 - (idle1 - idle0) / total if total > 0 else None


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def run_case(case: LayerCase, rounds: int, warmup: int, use_hf: bool, seed: int, progress: bool) -> CaseResult:
    from tqdm import tqdm

    notes: list[str] = []
    impls = [MOEKIT]
    if case.hf_impls:
        if not use_hf:
            notes.append("transformers comparison skipped (--no-hf)")
        elif transformers_version() is None:
            notes.append("transformers is not installed: its columns are skipped")
        else:
            impls += list(case.hf_impls)
    if case.beat is not None and case.beat not in impls:
        notes.append(f"not compared with {case.beat}: only the ratio target is checked")
    dense, subjects = build_subjects(case, impls, seed)
    diffs = output_differences(subjects)
    if any(diff > 1e-4 for diff in diffs.values()):
        notes.append(f"outputs differ from moekit's: max |diff| {diffs}")
    elif diffs:
        notes.append(f"transformers blocks compute moekit's output (max |diff| {max(diffs.values()):.1e})")
    results: dict[str, ImplResult] = {}
    if case.metric == "time":
        total = len(impls) * (warmup + rounds)
        with tqdm(total=total, desc=f"case {case.key}", file=sys.stderr, disable=not progress, leave=False) as bar:
            # NOTE: the transformers implementations run first, so the moekit verdict that
            # depends on them (``beat``) can be decided as soon as moekit is measured.
            for impl in impls[1:] + impls[:1]:
                bar.set_postfix_str(impl)
                results[impl] = time_against_dense(subjects[impl], dense, rounds, warmup, bar.update)
    else:
        with tqdm(
            total=len(impls) + 1, desc=f"case {case.key}", file=sys.stderr, disable=not progress, leave=False
        ) as bar:
            dense_peak = dense_peak_bytes(dense)
            bar.update()
            for impl in impls:
                bar.set_postfix_str(impl)
                results[impl] = memory_against_dense(subjects[impl], dense, dense_peak)
                bar.update()
    _judge(results[MOEKIT], case, results)
    for impl, diff in diffs.items():
        results[impl].max_abs_diff = diff
    return CaseResult(case, [results[impl] for impl in impls], notes)


# --------------------------------------------------------------------------------------------
# The process-wide allocator setting
# --------------------------------------------------------------------------------------------


def _reuse_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse; True when it took effect.

    By default glibc serves every block over its mmap threshold (at most 32 MB) with fresh
    pages from the kernel and unmaps it on free, so every large activation pays a page
    fault per 4 KiB page on first touch, in proportion to the bytes allocated rather than to
    the work done. Turning mmap off (M_MMAP_MAX = 0) and trimming off (M_TRIM_THRESHOLD) keeps
    freed blocks in the heap, as a caching allocator does. For the rest of the process: call
    it only in the benchmark's second process.
    """
    if not malloc_reuse_available():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        ok_trim = libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1))
        ok_mmap = libc.mallopt(m_mmap_max, ctypes.c_int(0))
    except (OSError, AttributeError):
        return False
    return bool(ok_trim and ok_mmap)


def malloc_reuse_available() -> bool:
    """Whether this system's C library is glibc with ``mallopt`` (changes nothing)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        return False


_reuse_took_effect = False  # set in the second process, by _start_reuse_process


def _start_reuse_process(threads: int) -> None:
    global _reuse_took_effect
    torch.set_num_threads(threads)  # as many as the first process uses
    _reuse_took_effect = _reuse_freed_memory()


def _run_case_with_reuse(
    case: LayerCase, rounds: int, warmup: int, use_hf: bool, seed: int, progress: bool
) -> tuple[bool, CaseResult]:
    return _reuse_took_effect, run_case(case, rounds, warmup, use_hf, seed, progress)


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


# --------------------------------------------------------------------------------------------
# Driver and report
# --------------------------------------------------------------------------------------------


@dataclass
class LayerBenchReport:
    cases: list[CaseResult]
    rounds: int
    quick: bool
    malloc: str  # what was measured: "both", "default" or "reuse" (see MALLOC_MODES)
    seed: int
    cpu_busy_before: float | None = None
    cpu: str = field(default_factory=cpu_model_name)
    notes: list[str] = field(default_factory=list)

    @property
    def headline(self) -> str:
        """The allocator of the figures the verdicts judge: the default, unless only reuse ran."""
        return REUSE_MALLOC if self.malloc == REUSE_MALLOC else DEFAULT_MALLOC

    @property
    def has_reuse_column(self) -> bool:
        return any(r.malloc_reuse is not None for c in self.cases for r in c.results)

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.cases)

    def to_dict(self) -> dict[str, Any]:
        allocators = {"ratio": ALLOCATOR_LABELS[self.headline]}
        if self.has_reuse_column:
            allocators["malloc_reuse"] = ALLOCATOR_LABELS[REUSE_MALLOC]
        return {
            "bench": "layer",
            "quick": self.quick,
            "rounds": self.rounds,
            "seed": self.seed,
            "cpu": self.cpu,
            "malloc": self.malloc,
            "headline_allocator": self.headline,
            "allocators": allocators,  # what each figure of a result was measured under
            "cpu_busy_before": self.cpu_busy_before,
            "torch": torch.__version__,
            "transformers": transformers_version(),
            "threads": torch.get_num_threads(),
            "dtype": "float32",
            "device": "cpu",
            "passed": self.passed,
            "notes": self.notes,
            "cases": [c.to_dict() for c in self.cases],
        }

    def table(self) -> str:
        reuse_column = self.has_reuse_column
        ratio_header = "malloc reuse" if self.headline == REUSE_MALLOC else "default malloc"
        header = ("case", "implementation", ratio_header, *(("malloc reuse",) if reuse_column else ()),
                  "target", "status", "impl", "dense")
        rows: list[tuple[str, ...]] = []
        for case_result in self.cases:
            case = case_result.case
            unit = "x time" if case.metric == "time" else "x peak"
            for i, r in enumerate(case_result.results):
                if r.target is None:
                    target, status = "", ""
                else:
                    target = f"<= {r.target:.2f}x" + (f" and < {r.beat}" if r.beat else "")
                    status = "PASS" if r.passed else "MISS"
                if case.metric == "time":
                    impl_cost, dense_cost = f"{1e3 * r.seconds:.1f} ms", f"{1e3 * r.dense_seconds:.1f} ms"
                else:
                    impl_cost = f"{r.peak_bytes / 2**20:.0f} MiB"
                    dense_cost = f"{r.dense_peak_bytes / 2**20:.0f} MiB"
                label = f"{case.key}. {case.title}" if i == 0 else ""
                reuse = ()
                if reuse_column:
                    reuse = (f"{r.malloc_reuse.ratio:.2f}{unit}" if r.malloc_reuse is not None else "-",)
                rows.append((label, r.impl, f"{r.ratio:.2f}{unit}", *reuse, target, status, impl_cost, dense_cost))
        widths = [max(len(row[j]) for row in [header, *rows]) for j in range(len(header))]

        def fmt(row: tuple[str, ...]) -> str:
            return "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()

        lines = [
            f"moekit bench layer on {self.cpu}: float32, {torch.get_num_threads()} threads, {self.rounds} rounds, "
            "median of per-round ratios to the dense equivalent" + (" (--quick: toy sizes)" if self.quick else ""),
            f"{ratio_header}: {ALLOCATOR_LABELS[self.headline]}; target and status judge this column, "
            "impl and dense are its step times (or peaks)",
        ]
        if reuse_column:
            lines.append(f"malloc reuse: {ALLOCATOR_LABELS[REUSE_MALLOC]}")
        lines += ["", fmt(header), "  ".join("-" * w for w in widths)]
        lines += [fmt(row) for row in rows]
        for case_result in self.cases:
            for note in case_result.notes:
                lines.append(f"note (case {case_result.case.key}): {note}")
        lines += [f"note: {note}" for note in self.notes]
        if self.quick:
            lines.append("note: --quick runs toy sizes; the targets are for the full sizes (a smoke test only)")
        if self.cpu_busy_before is not None and self.cpu_busy_before > BUSY_WARNING:
            lines.append(
                f"note: other processes kept {100 * self.cpu_busy_before:.0f}% of the CPUs busy just before "
                "the run; timings are noisy (rerun on an idle machine, or raise --rounds)"
            )
        return "\n".join(lines)


def bench_layer(
    case_keys: Sequence[str] | None = None,
    rounds: int = 7,
    quick: bool = False,
    use_hf: bool = True,
    seed: int = 0,
    malloc: str = "both",
    progress: bool = True,
) -> LayerBenchReport:
    """Run the layer benchmark cases (all by default); see the module docstring for the method.

    ``malloc``: "both" measures every case under glibc's default allocator (the headline) and
    again with malloc reuse, in a second process; "default" only the first; "reuse" only the
    second. This process's allocator settings are never changed.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds} is invalid: must be >= 1")
    if malloc not in MALLOC_MODES:
        raise ValueError(f"malloc={malloc!r} is invalid: choose from {', '.join(MALLOC_MODES)}")
    notes: list[str] = []
    if malloc != DEFAULT_MALLOC and not malloc_reuse_available():
        if malloc == REUSE_MALLOC:
            raise ValueError("--malloc reuse needs glibc's mallopt (Linux with glibc); this system has none")
        notes.append("malloc reuse needs glibc's mallopt, which this system lacks: default allocator only")
        malloc = DEFAULT_MALLOC
    cases = select_cases(case_keys, quick)
    busy = cpu_busy_fraction(0.1 if quick else 0.5)
    warmup = 1 if quick else 2
    results: list[CaseResult] = []
    with contextlib.ExitStack() as stack:
        second_process = None
        if malloc != DEFAULT_MALLOC:
            second_process = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),  # a fresh allocator, not a copy of ours
                initializer=_start_reuse_process,
                initargs=(torch.get_num_threads(),),
            )
            stack.callback(second_process.shutdown, wait=True, cancel_futures=True)
        for case in cases:
            default = run_case(case, rounds, warmup, use_hf, seed, progress) if malloc != REUSE_MALLOC else None
            reuse = None
            if second_process is not None:
                took_effect, reuse = second_process.submit(
                    _run_case_with_reuse, case, rounds, warmup, use_hf, seed, progress
                ).result()
                if not took_effect:
                    if default is None:
                        raise ValueError("--malloc reuse: glibc's mallopt did not take effect in the second process")
                    notes.append("glibc's mallopt did not take effect in the second process: default allocator only")
                    second_process, reuse, malloc = None, None, DEFAULT_MALLOC
            if default is None:
                results.append(reuse)
                continue
            if reuse is not None:
                by_impl = {r.impl: r for r in reuse.results}
                for r in default.results:
                    r.malloc_reuse = by_impl.get(r.impl)
            results.append(default)
    return LayerBenchReport(results, rounds, quick, malloc, seed, busy, notes=notes)
