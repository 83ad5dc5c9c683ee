"""Budgeted loading: a moekit LM whose routed experts come from an expert store through a
byte-budget cache.

    model = moekit.inference.load("stores/mixtral", memory_budget="4GiB")
    logits_BSV, _ = model(idx_BS)
    model.expert_cache.stats()          # hits, misses, evictions, bytes read

Everything but the routed experts (attention, norms, embeddings, routers, shared experts) is
resident; every MoE layer's ``experts`` module is an ``OffloadedExperts`` that fetches expert
weights through one ``ExpertCache`` holding at most the budget's remaining bytes. Nothing in
``moekit.layer`` changes: the layer's unfused path hands the experts module its rows grouped
by expert (``forward(x_ND, group_ends_E, counts)``), and its dispatcher (a ``StoreDispatcher``)
tells the experts module which experts the last token uses.

The budget: ``memory_budget`` counts the weights held in memory, the resident ones plus the
cached experts (activations and the KV cache are not in it). Its minimum is the resident
bytes plus top_k experts per MoE layer: a decode token's k experts of a layer are in use at
once. A prefill needs more experts of a layer than that, and processes them in waves of at
most the layer's slots, each expert fetched once per layer per forward; so a prefill never
needs a larger budget than decoding. The order of a layer's experts in a forward keeps the
decode working set: the cached ones run first (hits evict nothing), the last token's experts
run last (they stay cached for the next decode step), and a wave leaves a slot to each cached
expert of the last token still to come, so no miss evicts it before its turn.

Bit-exactness: each expert's rows go through the same ops (``ExpertWeights.apply``) on
identically laid-out tensors (views into page-aligned blob buffers) at every budget, and the
combine is the same embedding_bag reduction; the waves change only when weights are read,
never the arithmetic. The reference is ``load(store, memory_budget=None)`` (every expert
cached once read, nothing evicted). The plain LM (``plain_lm_from_store``) reduces with the
same embedding_bag in its fused and decode paths, and its grouped GEMM on CPU rounds as the
per-expert matmul does: its logits are bit-identical too (tests/test_offload.py checks both).

Shape suffixes: N rows (grouped by expert), n one expert's rows, D d_model, H the first
projection's width, F expert hidden size, E experts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit import matvec
from moekit.config import MoEConfig
from moekit.dispatch import DispatchPlan, LocalDispatcher
from moekit.experts import GroupedExperts, activate, combine_assignments
from moekit.fused import combine_dtype
from moekit.hugepages import huge_page_empty, place_in_huge_pages
from moekit.inference.cache import ExpertCache
from moekit.inference.quant import SCHEMES, QuantizedExpert, QuantizedExperts, experts_one_token
from moekit.inference.store import ExpertStore, StoreError, meta_lm, model_layout
from moekit.layer import MoE
from moekit.models.lm import MoETransformerLM

GIB = 1 << 30
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


class BudgetError(ValueError):
    """A memory budget below what the store needs; the message names the minimum."""


def parse_size(text: str | int) -> int:
    """Bytes from ``"4GiB"``, ``"512MiB"``, ``"1.5GB"``, ``"1e9"`` is not accepted, plain ``"4096"``.

    Binary units (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (KB, MB, GB, TB) powers
    of 1000, case-insensitive; the result must be a whole number of bytes >= 1.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 1:
            raise ValueError(f"{text} is not a size: must be >= 1 byte")
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size: use a number of bytes or a number with a unit "
                         "(KiB, MiB, GiB, TiB or KB, MB, GB, TB), e.g. 4GiB, 512MiB, 1.5GB")
    try:
        value = Decimal(match.group(1)) * _SIZE_UNITS[unit]
    except InvalidOperation as error:  # unreachable with the pattern; kept for clarity
        raise ValueError(f"{text!r} is not a size") from error
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes")
    if value < 1:
        raise ValueError(f"{text!r} is not a size: must be >= 1 byte")
    return int(value)


def format_size(num_bytes: int) -> str:
    return f"{num_bytes:,} bytes ({num_bytes / GIB:.3f} GiB)"


# --------------------------------------------------------------------------------------------
# The budget
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """How a memory budget is spent: the resident weights, then expert slots per MoE layer."""

    memory_budget: int | None  # None: unlimited (every expert may be cached)
    non_expert_bytes: int  # the resident weights, in the dtype they are held in
    minimum_bytes: int  # non_expert_bytes + top_k slots per MoE layer
    slot_bytes: dict[int, int]  # layer -> bytes one cached expert holds
    slots: dict[int, int]  # layer -> experts cached at most
    num_experts: dict[int, int]  # layer -> E

    @property
    def cache_bytes(self) -> int:
        return sum(self.slots[layer] * self.slot_bytes[layer] for layer in self.slots)

    @property
    def holds_every_expert(self) -> bool:
        return all(self.slots[layer] >= self.num_experts[layer] for layer in self.slots)

    @property
    def expert_bytes(self) -> int:
        """Every expert cached at once."""
        return sum(self.slot_bytes[layer] * self.num_experts[layer] for layer in self.slots)

    def to_dict(self) -> dict:
        return {
            "memory_budget": self.memory_budget,
            "non_expert_bytes": self.non_expert_bytes,
            "minimum_bytes": self.minimum_bytes,
            "expert_bytes": self.expert_bytes,
            "cache_bytes": self.cache_bytes,
            "slots_per_layer": {str(layer): count for layer, count in self.slots.items()},
        }


def _held_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


def plan_memory(store: ExpertStore, memory_budget: int | str | None, dtype: torch.dtype | None = None) -> MemoryPlan:
    """Split ``memory_budget`` into the resident weights and expert slots per layer.

    Each MoE layer gets top_k slots (the minimum), then the remaining bytes go one slot at a
    time to the layers in turn, until they are spent or every expert has a slot. A budget
    below the minimum is a ``BudgetError`` naming the minimum in bytes and GiB.
    """
    budget = None if memory_budget is None else parse_size(memory_budget)
    non_expert = sum(
        _numel(shape) * _held_dtype(stored, dtype).itemsize for shape, stored in store.resident_specs.values()
    )
    slot_bytes, num_experts = {}, {}
    for (layer, _), blob in sorted(store.blobs.items()):
        quantized = store.experts_dtype in SCHEMES  # held as stored, at any dtype
        if quantized or dtype is None or all(_held_dtype(t.dtype, dtype) == t.dtype for t in blob.tensors):
            held = blob.padded_length  # the blob's own buffer: tensors are views into it
        else:
            held = sum(_numel(t.shape) * _held_dtype(t.dtype, dtype).itemsize for t in blob.tensors)
        slot_bytes[layer] = max(slot_bytes.get(layer, 0), held)
        num_experts[layer] = num_experts.get(layer, 0) + 1
    top_k = store.config.moe.top_k
    minimum = non_expert + sum(top_k * size for size in slot_bytes.values())
    if budget is None:
        slots = dict(num_experts)
    else:
        if budget < minimum:
            raise BudgetError(
                f"memory budget {format_size(budget)} is below this store's minimum {format_size(minimum)}: "
                f"the non-expert weights {format_size(non_expert)} plus top_k={top_k} experts of each of its "
                f"{len(slot_bytes)} MoE layers"
            )
        slots = dict.fromkeys(slot_bytes, top_k)
        left = budget - minimum
        growing = True
        while growing:
            growing = False
            for layer in slot_bytes:
                if slots[layer] < num_experts[layer] and slot_bytes[layer] <= left:
                    slots[layer] += 1
                    left -= slot_bytes[layer]
                    growing = True
    return MemoryPlan(budget, non_expert, minimum, slot_bytes, slots, num_experts)


def minimum_budget(store: str | Path | ExpertStore, dtype: torch.dtype | None = None) -> int:
    """The smallest ``memory_budget`` that ``load`` accepts for ``store``."""
    opened = store if isinstance(store, ExpertStore) else ExpertStore(store, verify=False)
    return plan_memory(opened, None, dtype).minimum_bytes


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# --------------------------------------------------------------------------------------------
# The experts module
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's weights as cached: w_in [D, H], w_out [F, D], optional biases b_in [H], b_out [D];
    ``buffer``: the slot buffer they are views into (read into again once the expert is evicted),
    None when they live in memory of their own (converted to another dtype)."""

    w_in_DH: Tensor
    w_out_FD: Tensor
    b_in_H: Tensor | None = None
    b_out_D: Tensor | None = None
    buffer: Any = None

    def apply(self, x_nD: Tensor, out_nD: Tensor, config: MoEConfig, one_token: bool = False) -> None:
        """out = FFN(x) for this expert's rows, written into ``out_nD``: the same ops as
        ``GroupedExperts``' per-expert loop (the spec). In a one-token forward (decoding) the
        products go through ``moekit.matvec``, as the in-memory layer's decode fast path's do:
        the same sums."""
        multiply = matvec.vecmat if one_token else torch.matmul
        h_nH = multiply(x_nD, self.w_in_DH)
        if self.b_in_H is not None:
            h_nH = h_nH + self.b_in_H
        act_nF = activate(h_nH, config.activation, config.swiglu_alpha, config.swiglu_limit)
        out_nD.copy_(multiply(act_nF, self.w_out_FD))
        if self.b_out_D is not None:
            out_nD += self.b_out_D


class OffloadedExperts(nn.Module):
    """The routed experts of one MoE layer, fetched through an ``ExpertCache``.

    Inference only (no gradients, no expert dropout). ``forward(x_ND, group_ends_E, counts)``
    has ``GroupedExperts``' contract: rows grouped by expert, ``counts[e]`` rows for expert e.
    """

    def __init__(self, config: MoEConfig, layer: int, cache: ExpertCache, quantized: bool = False) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.layer = layer
        self.cache = cache
        self.protect: frozenset[int] = frozenset()  # the last token's experts, set by StoreDispatcher
        self.one_token = False  # whether the forward is one token's, set by StoreDispatcher
        # The MoE layer's decode fast path (forward_per_assignment) for one token, as the
        # in-memory GroupedExperts and QuantizedExperts take it (with their combine).
        self.one_token_fast_path = True
        self.quantized = quantized

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.num_experts}, slots={self.cache.slots[self.layer]}"

    def stacked_weights(self) -> tuple[Tensor, Tensor, None, None] | None:
        """The layer's experts as stacked [E, D, H] / [E, F, D] views while every one is cached
        in one preloaded buffer (``preload_experts``), else None: moekit's one-call decode then
        reads them as ``GroupedExperts``' (``MoE.stacked_experts``); ``record_use`` counts
        the hits."""
        stacked = self.cache.stacked.get(self.layer)
        if stacked is None or self.quantized or self.training:
            return None
        return stacked[0], stacked[1], None, None

    def record_use(self, experts: Sequence[int]) -> None:
        """A decoded token ran ``experts`` on the stacked views: counted as ``acquire`` counts
        hits, and kept as the decode working set the next prefill protects."""
        self.protect = frozenset(experts)
        self.cache.record_hits(self.layer, experts)

    def processing_order(self, needed: Sequence[int]) -> list[int]:
        """Cached experts first (hits evict nothing), then the missing ones, the last token's
        experts (``protect``) at the end of each so that they stay cached for the next step."""
        cached = set(self.cache.cached(self.layer))
        return sorted(needed, key=lambda e: (e in self.protect, e not in cached, e))

    def next_wave(self, remaining: Sequence[int]) -> list[int]:
        """The next experts to hold at once: as many as the layer's slots, less one slot for
        each cached expert of the last token still to come (so that no miss evicts it before
        its turn), and at least one."""
        slots = self.cache.slots[self.layer]
        reserved = {e for e in remaining if e in self.protect and self.cache.is_cached(self.layer, e)}
        wave: list[int] = []
        for expert in remaining:
            held_back = len(reserved - set(wave) - {expert})
            if wave and len(wave) + 1 + held_back > slots:
                break
            wave.append(expert)
            if len(wave) == slots:
                break
        return wave

    @torch.no_grad()
    def forward(self, x_ND: Tensor, group_ends_E: Tensor, counts: Sequence[int]) -> Tensor:
        if self.training:
            raise RuntimeError("OffloadedExperts runs inference only: call model.eval() first")
        starts, start = [], 0
        for count in counts:
            starts.append(start)
            start += count
        out_ND = x_ND.new_empty(x_ND.shape[0], self.config.d_model)
        remaining = self.processing_order([e for e, count in enumerate(counts) if count])
        while remaining:
            wave = self.next_wave(remaining)
            remaining = remaining[len(wave) :]
            self._run_wave(wave, starts, counts, x_ND, out_ND)
        return out_ND

    @torch.no_grad()
    def forward_per_assignment(
        self, x_TD: Tensor, token_idx_N: Tensor, expert_idx_N: Tensor, weight_N: Tensor
    ) -> Tensor:
        """One token's output, float32 [1, D]: ``GroupedExperts.forward_per_assignment``'s ops
        (one kernel call per projection for the token's k experts, the same combine) on the
        cached experts' weights; quantized experts: ``QuantizedExperts.forward_per_assignment``'s.
        The k experts are acquired at once (a layer has at least k slots) and are the decode
        working set the next step protects."""
        if self.training:
            raise RuntimeError("OffloadedExperts runs inference only: call model.eval() first")
        if x_TD.shape[0] != 1:
            raise ValueError(f"OffloadedExperts.forward_per_assignment takes one token, got {x_TD.shape[0]}")
        experts = expert_idx_N.tolist()
        config = self.config
        self.protect = frozenset(experts)
        weights = self.cache.acquire(self.layer, experts)
        try:
            if self.quantized:
                return experts_one_token([w.expert for w in weights], x_TD, token_idx_N, weight_N)
            w_in = [w.w_in_DH for w in weights]
            w_out = [w.w_out_FD for w in weights]
            if matvec.applies_matrices(x_TD, w_in, w_out):
                # The in-memory layer's one C call (GroupedExperts.forward_per_assignment) on the
                # cached experts' own matrices: the same sums.
                b_in = None if weights[0].b_in_H is None else [w.b_in_H for w in weights]
                b_out = None if weights[0].b_out_D is None else [w.b_out_D for w in weights]
                return matvec.experts_ffn(x_TD, w_in, w_out, experts, weight_N, config.activation,
                                          config.swiglu_alpha, config.swiglu_limit, b_in, b_out)
            out_kD = x_TD.new_empty(len(experts), config.d_model)
            for row, expert_weights in enumerate(weights):
                expert_weights.apply(x_TD, out_kD[row : row + 1], config, one_token=True)
        finally:
            self.cache.release(self.layer, experts)
        return combine_assignments(out_kD, token_idx_N, weight_N, 1, fusable=True)

    def _run_wave(
        self, wave: list[int], starts: list[int], counts: Sequence[int], x_ND: Tensor, out_ND: Tensor
    ) -> None:
        # NOTE: a function of its own so that its references to the wave's weights end with it:
        # an expert the next wave evicts is then freed at once, not held until the loop rebinds
        # a variable (which would hold a wave of experts beyond the budget).
        weights = self.cache.acquire(self.layer, wave, self.protect, [counts[expert] for expert in wave])
        try:
            for expert, expert_weights in zip(wave, weights, strict=True):
                rows = slice(starts[expert], starts[expert] + counts[expert])
                expert_weights.apply(x_ND[rows], out_ND[rows], self.config, self.one_token)
        finally:
            self.cache.release(self.layer, wave)


class StoreDispatcher(LocalDispatcher):
    """The local dispatcher, which also tells the experts module the last token's experts."""

    def __init__(self, num_experts: int, experts: OffloadedExperts, quantized: bool = False) -> None:
        super().__init__(num_experts)
        self.experts = experts
        self.quantized = quantized

    def expert_groups(self, plan: DispatchPlan) -> tuple[Tensor, tuple[int, ...]]:
        last_rows = (plan.token_of_row_N == plan.num_tokens - 1).nonzero().squeeze(1)
        experts_of_rows = torch.searchsorted(plan.group_ends_E.long(), last_rows, right=True)
        self.experts.protect = frozenset(experts_of_rows.tolist())
        self.experts.one_token = plan.num_tokens == 1
        return super().expert_groups(plan)

    def combine(self, out_ND: Tensor, weight_N: Tensor, plan: DispatchPlan) -> Tensor:
        """y[token] = Σ weight · expert_out over the token's assignments, in float32, with the
        reduction of the plain layer's fused path and decode fast path (embedding_bag over a
        token's bag of rows), so that the sums round as the plain LM's do.

        Quantized experts: the reduction of the in-memory model that ``quantize_experts`` makes
        (its ``QuantizedExperts`` take the layer's generic path, the local dispatcher's
        index_add), so that the sums round as that model's do."""
        if self.quantized:
            return super().combine(out_ND, weight_N, plan)
        dtype = combine_dtype(out_ND.dtype)
        return F.embedding_bag(
            plan.row_of_assignment_N, out_ND.to(dtype), plan.bag_offsets_T, mode="sum",
            per_sample_weights=weight_N.to(dtype),
        )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedExpertWeights:
    """One int8/int4 expert as cached: a ``QuantizedExpert`` whose tensors are views into its
    slot buffer (``buffer``)."""

    expert: QuantizedExpert
    buffer: Any = None

    def apply(self, x_nD: Tensor, out_nD: Tensor, config: MoEConfig, one_token: bool = False) -> None:
        """out = FFN(x) for this expert's rows: the call ``QuantizedExperts`` (``quantize_experts``) makes."""
        out_nD.copy_(self.expert(x_nD))


def slot_buffer(nbytes: int) -> memoryview:
    """A page-aligned buffer for one cached expert, in transparent huge pages where the kernel
    has them (the decode streams the expert's weights from it: docs/bench_generate.md)."""
    return memoryview(huge_page_empty((nbytes,), torch.uint8).numpy())


def _expert_loader(store: ExpertStore, dtype: torch.dtype | None, slot_bytes: dict[int, int]):
    """The cache's ``load``: reads (layer, expert) into the evicted expert's buffer (``spare``)
    or, while the layer's slots fill up, a new one of the layer's slot size (a fresh read
    buffer for layers ``slot_bytes`` does not name)."""

    def load_expert(layer: int, expert: int, spare: Any = None) -> tuple[ExpertWeights | QuantizedExpertWeights, int]:
        def read_buffer() -> Any:
            reused = getattr(spare, "buffer", None)
            if reused is not None:
                return reused
            return slot_buffer(slot_bytes[layer]) if layer in slot_bytes else None

        if store.experts_dtype in SCHEMES:
            # NOTE: quantized experts are held as stored whatever ``dtype`` is: the kernels take
            # bf16 scales with activations of any float dtype.
            buffer = read_buffer()
            quantized, nbytes = store.expert(layer, expert, buffer)
            return QuantizedExpertWeights(quantized, buffer), nbytes
        blob = store.blob(layer, expert)
        if dtype is not None and any(t.dtype.is_floating_point and t.dtype != dtype for t in blob.tensors):
            # Held converted, in memory of their own: the read buffer goes after the conversion.
            tensors, _ = store.expert_tensors(layer, expert)
            tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
            nbytes, buffer = sum(t.numel() * t.element_size() for t in tensors.values()), None
        else:
            buffer = read_buffer()
            tensors, nbytes = store.expert_tensors(layer, expert, buffer)
        weights = ExpertWeights(tensors["w_in"], tensors["w_out"], tensors.get("b_in"), tensors.get("b_out"), buffer)
        return weights, nbytes

    return load_expert


def _skeleton_with_resident(store: ExpertStore, dtype: torch.dtype | None) -> MoETransformerLM:
    """The LM built on the meta device, its resident weights read from the store (one tensor
    at a time), its expert weights still on the meta device."""
    model = meta_lm(store.config)
    loaded = set()
    for name, tensor in store.resident_tensors():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if tensor.is_floating_point() and dtype is not None:
            tensor = tensor.to(dtype)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        elif attr in module._buffers:
            module._buffers[attr] = tensor
        else:
            raise StoreError(f"{store.path}: resident tensor {name} is not a weight of the model")
        loaded.add(name)
    if store.config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    missing = sorted(set(model_layout(store.config).resident_shapes) - loaded)
    if missing:
        raise StoreError(f"{store.path}: resident weights missing: {missing[:5]}")
    return model


def load(
    store: str | Path | ExpertStore,
    memory_budget: int | str | None = None,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    preload: bool | None = None,
    cache_policy: str = "lru",
) -> MoETransformerLM:
    """A moekit LM (in eval mode) whose routed experts are read from ``store`` through a cache.

    ``memory_budget``: bytes (or a size such as ``"4GiB"``) for the resident weights plus the
    cached experts; None caches every expert once read. ``dtype``: hold floating weights in
    this dtype (None: as stored). ``verify``: check CRC-32s (the resident file at load, each
    blob the first time it is read). ``preload``: read every expert now (the budget must hold
    them all); None (the default) preloads exactly when a budget is given and holds every
    expert: the model is then an in-memory model after its load, as a user who gave that much
    memory expects, instead of reading its experts one miss at a time while it decodes.
    ``cache_policy``: ``lru`` or ``lfu`` (``ExpertCache``).

    The model carries ``expert_cache`` (counters: ``model.expert_cache.stats()``),
    ``expert_store`` and ``memory_plan``.
    """
    opened = store if isinstance(store, ExpertStore) else ExpertStore(store, verify=verify)
    plan = plan_memory(opened, memory_budget, dtype)
    cache = ExpertCache(plan.slots, plan.slot_bytes, _expert_loader(opened, dtype, plan.slot_bytes), cache_policy)
    model = _skeleton_with_resident(opened, dtype)
    for block in model.blocks:
        moe = block.ffn
        if not isinstance(moe, MoE):
            continue
        if not isinstance(moe.experts, GroupedExperts):
            raise StoreError(f"{opened.path}: layer {block.attn.layer_idx} has no grouped experts to offload")
        quantized = opened.experts_dtype in SCHEMES
        experts = OffloadedExperts(moe.config, block.attn.layer_idx, cache, quantized)
        moe.experts = experts
        moe.dispatcher = StoreDispatcher(moe.config.num_experts, experts, quantized)
    # The resident weights in huge pages, as moekit sample places a run's (moekit.hugepages):
    # the decode streams them every token. The cached experts' slot buffers are (slot_buffer).
    place_in_huge_pages(model)
    model.expert_cache = cache
    model.expert_store = opened
    model.memory_plan = plan
    model.eval()
    if preload is None:
        preload = memory_budget is not None and plan.holds_every_expert
    if preload:
        preload_experts(model)
    return model


def preload_experts(model: MoETransformerLM) -> None:
    """Read every expert of an offloaded model (``load``) into its cache, layer by layer in the
    store's order (sequential reads); the budget must hold them all (``BudgetError``
    otherwise). The reads count as the cache's misses."""
    plan, cache = model.memory_plan, model.expert_cache
    for layer, count in plan.num_experts.items():
        if plan.slots[layer] < count:
            raise BudgetError(f"preload needs every expert cached, but the budget gives layer {layer} "
                              f"{plan.slots[layer]} of {count} slots ({format_size(plan.expert_bytes)} of experts)")
    for layer, count in plan.num_experts.items():
        if _preload_stacked(model, layer, count):
            continue
        everything = list(range(count))
        cache.acquire(layer, everything)
        cache.release(layer, everything)


def _preload_stacked(model: MoETransformerLM, layer: int, count: int) -> bool:
    """Read the layer's experts (stored as the model's dtype, w_in and w_out only) into one
    page-aligned buffer, blob after blob, and cache each as views into it; the layer's stacked
    [E, D, H] / [E, F, D] views (expert stride: one padded blob) go to ``cache.stacked``, which
    moekit's one-call decode reads as it reads in-memory experts. False (nothing read) where the
    layer's blobs differ in layout or hold biases or another dtype, or some are cached already."""
    store, cache = model.expert_store, model.expert_cache
    if store.experts_dtype in SCHEMES or cache.entries[layer]:  # (some already cached: read the rest as usual)
        return False
    blobs = [store.blobs[layer, expert] for expert in range(count)]
    first = blobs[0]
    names = sorted(t.name for t in first.tensors)
    dtype = model.embed.weight.dtype
    slot = cache.slot_bytes[layer]
    layout = [(t.name, t.offset, t.dtype, tuple(t.shape)) for t in first.tensors]
    if names != ["w_in", "w_out"] or any(t.dtype != dtype for t in first.tensors) or first.padded_length != slot:
        return False
    if any(b.padded_length != slot or [(t.name, t.offset, t.dtype, tuple(t.shape)) for t in b.tensors] != layout
           for b in blobs):
        return False
    buffer = slot_buffer(count * slot)
    whole = torch.frombuffer(buffer, dtype=torch.uint8).view(dtype)  # keeps the buffer alive
    element = dtype.itemsize
    stacked = {}
    for t in first.tensors:
        rows, cols = t.shape
        stacked[t.name] = whole.as_strided((count, rows, cols), (slot // element, cols, 1), t.offset // element)
    for expert in range(count):
        store.read_blob(layer, expert, buffer[expert * slot : (expert + 1) * slot])
        weights = ExpertWeights(stacked["w_in"][expert], stacked["w_out"][expert], None, None, None)
        cache.insert(layer, expert, weights, slot)
    cache.stacked[layer] = (stacked["w_in"], stacked["w_out"])
    return True


def plain_lm_from_store(store: str | Path | ExpertStore, dtype: torch.dtype | None = None) -> MoETransformerLM:
    """The ordinary moekit LM (``GroupedExperts`` holding every expert) of a store's weights.

    It holds the whole model in memory; it is the comparison point for the offloaded model.
    A quantized store (int8/int4) gives the LM with ``QuantizedExperts`` (as ``quantize_experts``
    makes them) holding every expert.
    """
    opened = store if isinstance(store, ExpertStore) else ExpertStore(store)
    model = _skeleton_with_resident(opened, dtype)
    load_expert = _expert_loader(opened, dtype, {})
    for spec in model_layout(opened.config).expert_layers:
        if opened.experts_dtype in SCHEMES:
            moe = model.get_submodule(spec.module.rpartition(".")[0])
            moe.experts = QuantizedExperts([load_expert(spec.layer, e)[0].expert for e in range(spec.num_experts)])
            continue
        experts = model.get_submodule(spec.module)
        per_expert = [load_expert(spec.layer, e)[0] for e in range(spec.num_experts)]
        stacked = {
            "w_in": torch.stack([w.w_in_DH for w in per_expert]),
            "w_out": torch.stack([w.w_out_FD for w in per_expert]),
        }
        if per_expert[0].b_in_H is not None:
            stacked["b_in"] = torch.stack([w.b_in_H for w in per_expert])  # type: ignore[misc]
            stacked["b_out"] = torch.stack([w.b_out_D for w in per_expert])  # type: ignore[misc]
        for name, value in stacked.items():
            experts._parameters[name] = nn.Parameter(value, requires_grad=False)
    place_in_huge_pages(model)  # as load() and moekit sample place theirs
    return model.eval()
