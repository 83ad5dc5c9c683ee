"""A byte-budget cache of expert weights: per-layer LRU with pins.

Each MoE layer owns a number of slots (its share of the budget, at least top_k: a decode
token's k experts are in use at once). ``acquire(layer, experts)`` returns the experts'
weights, loading the missing ones and evicting the least recently used unpinned expert of
that layer to make room; the acquired experts stay pinned until ``release`` (an expert in use
by the current forward is never evicted). A ``protect`` set names experts to evict only when
nothing else can go (the decode working set during a prefill, see ``offload.py``).

A miss that evicts hands the evicted value to the loader (``load(layer, expert, spare)``):
the cache holds it no more, so the loader may read the new expert into its memory. The
offloaded experts do (one page-aligned buffer per slot, allocated once): a fresh buffer per
read paid its page faults inside the read and an unmap per eviction, which halved the disk's
read rate (docs/offload.md).

The counters (hits, misses, evictions, bytes read) are what ``moekit sample --json`` reports.
The cache is single-threaded: the forward that acquires is the forward that releases.

Per layer and not global: in a forward the layers run in order, so a global LRU would evict
the layer that runs next (the one used longest ago) on every miss; with per-layer slots
each layer keeps its own working set (as mixtral-offloading does, Eliseev & Mazur 2023).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

POLICIES = ("lru", "lfu")


class CacheError(RuntimeError):
    """The cache cannot make room: every expert of the layer is pinned (a wave larger than its slots)."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # each one a read of the expert's blob
    evictions: int = 0
    bytes_read: int = 0
    cached_experts: int = 0  # now
    cached_bytes: int = 0  # now
    capacity_bytes: int = 0  # slots x slot bytes, all layers

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hit_rate": self.hit_rate}


class ExpertCache:
    """Cached values per (layer, expert), ``slots[layer]`` of them per layer at most.

    ``load(layer, expert, spare) -> (value, nbytes)`` reads an expert; ``nbytes`` is what it
    holds in memory and what was read, at most ``slot_bytes[layer]`` (the size the budget was
    split by); ``spare`` is the value evicted to make room for it (None when nothing was), no
    longer held by the cache, whose memory the loader may reuse.

    ``policy``: which unpinned expert a miss evicts. ``lru``: the least recently used. ``lfu``:
    the least frequently requested since the cache was created or cleared, counting requests
    of evicted experts too ("perfect" LFU, as ``policy_sim`` models it), ties to the least
    recently used. On a trained model's routing LFU keeps the popular experts that LRU loses
    to a burst of rare ones (docs/offload.md compares both with Belady's bound).
    """

    def __init__(
        self, slots: dict[int, int], slot_bytes: dict[int, int], load: Callable[[int, int, Any], tuple[Any, int]],
        policy: str = "lru",
    ) -> None:
        for layer, count in slots.items():
            if count < 1:
                raise ValueError(f"ExpertCache: layer {layer} has {count} slots; every layer needs at least 1")
        if policy not in POLICIES:
            raise ValueError(f"cache policy {policy!r} is invalid: use {' or '.join(POLICIES)}")
        self.policy = policy
        self.requests: dict[tuple[int, int], int] = {}  # (layer, expert) -> times acquired (lfu)
        self.slots = dict(slots)
        self.slot_bytes = dict(slot_bytes)
        self.load = load
        self.entries: dict[int, OrderedDict[int, tuple[Any, int]]] = {layer: OrderedDict() for layer in slots}
        self.pins: dict[tuple[int, int], int] = {}
        self.hits = self.misses = self.evictions = self.bytes_read = 0
        # layer -> a value describing every expert of the layer at once (offload.preload_experts'
        # stacked views), valid while the layer's experts stay as inserted: dropped on any
        # eviction from the layer and on clear(), so it never outlives the entries it describes
        self.stacked: dict[int, Any] = {}

    def cached(self, layer: int) -> list[int]:
        """The experts of ``layer`` in the cache, least recently used first."""
        return list(self.entries[layer])

    def is_cached(self, layer: int, expert: int) -> bool:
        return expert in self.entries[layer]

    def is_pinned(self, layer: int, expert: int) -> bool:
        return self.pins.get((layer, expert), 0) > 0

    def acquire(
        self, layer: int, experts: Sequence[int], protect: Collection[int] = (), requests: Sequence[int] | None = None
    ) -> list[Any]:
        """The values of ``experts`` (distinct, at most ``slots[layer]``), pinned until ``release``.
        ``requests``: how many requests each acquisition stands for in LFU's counts (a prefill's
        rows per expert: its tokens' requests, as ``policy_sim`` replays them; default 1 each)."""
        if len(set(experts)) != len(experts):
            raise ValueError(f"ExpertCache.acquire: experts {list(experts)} repeat one")
        entries = self.entries[layer]
        # Pin the cached ones first: loading a missing one must not evict a wave-mate.
        for expert in experts:
            if expert in entries:
                self._pin(layer, expert)
        missing = [expert for expert in experts if expert not in entries]
        if len(experts) > self.slots[layer] and missing:
            self._unpin_all(layer, [e for e in experts if e not in missing])
            raise CacheError(
                f"layer {layer}: {len(experts)} experts acquired at once but the layer has {self.slots[layer]} slots"
            )
        for index, expert in enumerate(experts):
            self.requests[layer, expert] = self.requests.get((layer, expert), 0) + (
                1 if requests is None else requests[index]
            )
            if expert in entries:
                self.hits += 1
                entries.move_to_end(expert)
                continue
            spare = None
            while len(entries) >= self.slots[layer]:
                spare = self._evict_one(layer, protect)
            value, nbytes = self.load(layer, expert, spare)
            del spare
            if nbytes > self.slot_bytes[layer]:
                raise CacheError(f"layer {layer} expert {expert}: {nbytes} bytes, more than the slot's "
                                 f"{self.slot_bytes[layer]} the budget was split by")
            self.misses += 1
            self.bytes_read += nbytes
            entries[expert] = (value, nbytes)
            self._pin(layer, expert)
        return [entries[expert][0] for expert in experts]

    def release(self, layer: int, experts: Sequence[int]) -> None:
        self._unpin_all(layer, experts)

    def _pin(self, layer: int, expert: int) -> None:
        self.pins[layer, expert] = self.pins.get((layer, expert), 0) + 1

    def _unpin_all(self, layer: int, experts: Sequence[int]) -> None:
        for expert in experts:
            count = self.pins.get((layer, expert), 0)
            if count <= 1:
                self.pins.pop((layer, expert), None)
            else:
                self.pins[layer, expert] = count - 1

    def _evict_one(self, layer: int, protect: Collection[int]) -> Any:
        """Drop the LRU unpinned expert of ``layer`` (one outside ``protect`` if any); its value."""
        entries = self.entries[layer]
        unpinned = [expert for expert in entries if not self.is_pinned(layer, expert)]  # LRU first
        if not unpinned:
            raise CacheError(f"layer {layer}: all {len(entries)} cached experts are pinned; nothing can be evicted")
        candidates = [expert for expert in unpinned if expert not in protect] or unpinned
        if self.policy == "lfu":  # min keeps the first of equals: the least recently used
            victim = min(candidates, key=lambda expert: self.requests.get((layer, expert), 0))
        else:
            victim = candidates[0]
        value, _ = entries.pop(victim)
        self.evictions += 1
        self.stacked.pop(layer, None)
        return value

    def insert(self, layer: int, expert: int, value: Any, nbytes: int) -> None:
        """Put an expert read ahead of any request (``offload.preload_experts``) into a free slot:
        counted as a read (misses, bytes_read), not as a request."""
        entries = self.entries[layer]
        if expert in entries or len(entries) >= self.slots[layer] or nbytes > self.slot_bytes[layer]:
            raise CacheError(f"layer {layer} expert {expert}: no free slot of {self.slot_bytes[layer]} bytes for "
                             f"{nbytes} bytes ({len(entries)} of {self.slots[layer]} slots used)")
        entries[expert] = (value, nbytes)
        self.misses += 1
        self.bytes_read += nbytes

    def record_hits(self, layer: int, experts: Sequence[int]) -> None:
        """Count a use of cached ``experts`` that did not go through ``acquire`` (a decode step
        run on ``stacked`` views in one C call): hits, requests and recency as ``acquire``'s."""
        entries = self.entries[layer]
        for expert in experts:
            self.requests[layer, expert] = self.requests.get((layer, expert), 0) + 1
            self.hits += 1
            entries.move_to_end(expert)

    def clear(self) -> None:
        """Drop every unpinned expert and the policy's request counts (the counters stay)."""
        self.stacked.clear()
        self.requests.clear()
        for layer, entries in self.entries.items():
            for expert in [e for e in entries if not self.is_pinned(layer, e)]:
                del entries[expert]

    def reset_counters(self) -> None:
        self.hits = self.misses = self.evictions = self.bytes_read = 0

    @property
    def cached_bytes(self) -> int:
        return sum(nbytes for entries in self.entries.values() for _, nbytes in entries.values())

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
            bytes_read=self.bytes_read,
            cached_experts=sum(len(entries) for entries in self.entries.values()),
            cached_bytes=self.cached_bytes,
            capacity_bytes=sum(self.slots[layer] * self.slot_bytes[layer] for layer in self.slots),
        )
