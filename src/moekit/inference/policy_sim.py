"""Replay a routing trace against expert-cache policies: LRU, LFU and Belady's optimal (MIN).

The cache modelled is the one the expert store builds (moekit.inference's byte-budget cache):
each MoE layer has its own cache of ``capacity`` experts, and the token being decoded pins its
k experts: they are all resident while it runs, so none of them is evicted to make room for
another of the same token (which is why the capacity must be at least k). Tokens are replayed
one at a time in trace order, as batch-1 decoding runs them. A request is one (token, expert)
pair; it hits when the expert is resident when the token arrives, and a miss loads it,
evicting, when the layer's cache is full, the unpinned expert the policy picks:

- ``lru``: the least recently used.
- ``lfu``: the least frequently used, counting every request since the start of the trace
  (an expert's popularity outlives its evictions: "perfect" LFU); ties go to the least recently
  used.
- ``belady``: the one whose next request is farthest in the future, or never comes (Belady
  1966, "A study of replacement algorithms for a virtual-storage computer"; MIN). With the
  loads forced (a missed expert is needed now) and the current token's experts pinned, evicting
  the farthest next use is optimal (the usual exchange argument; tests/test_trace.py also
  checks it against an exhaustive search on small traces), so its hit rate is the best any
  policy can reach on the trace: the gap from LRU to it is what a smarter policy could win.

Not modelled: prefill, which needs the union of a forward's experts at once (the store loads
each at most once per layer per forward, in waves when they do not all fit); byte budgets
shared across layers. The cache starts empty: the first request of every expert is a miss
for every policy (``cold_misses``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from moekit.inference.trace import RoutingTrace, TraceError

__all__ = ["POLICIES", "PolicyResult", "simulate_layer", "simulate_trace"]

POLICIES = ("lru", "lfu", "belady")
NEVER = float("inf")


def _steps(experts_TK: np.ndarray) -> list[list[int]]:
    """Each token's distinct experts, in choice order (-1 slots dropped)."""
    steps = []
    for row in experts_TK.tolist():
        seen: list[int] = []
        for expert in row:
            if expert >= 0 and expert not in seen:
                seen.append(expert)
        steps.append(seen)
    return steps


def simulate_layer(steps: Sequence[Sequence[int]], capacity: int, policy: str) -> int:
    """Hits of ``policy`` on one layer's requests (``steps[t]``: token t's distinct experts)
    with a cache of ``capacity`` experts, the current token's experts pinned."""
    if policy not in POLICIES:
        raise TraceError(f"policy={policy!r} is invalid: use {', '.join(POLICIES)}")
    widest = max((len(step) for step in steps), default=0)
    if capacity < widest:
        raise TraceError(
            f"capacity={capacity} experts is below the {widest} experts one token uses: a token's "
            "experts are pinned together, so the capacity must be at least top_k"
        )
    next_use: list[dict[int, float]] = []
    if policy == "belady":  # next_use[t][e]: the next step after t that requests e
        upcoming: dict[int, float] = {}
        for step in reversed(steps):
            next_use.append({expert: upcoming.get(expert, NEVER) for expert in step})
            for expert in step:
                upcoming[expert] = len(steps) - len(next_use)
        next_use.reverse()
    cache: OrderedDict[int, None] = OrderedDict()  # least recently used first
    frequency: dict[int, int] = {}
    due: dict[int, float] = {}  # belady: each resident expert's next request
    hits = 0
    for t, step in enumerate(steps):
        pinned = set(step)
        for expert in step:
            frequency[expert] = frequency.get(expert, 0) + 1
            if expert in cache:
                hits += 1
                cache.move_to_end(expert)
            else:
                if len(cache) >= capacity:
                    candidates = [e for e in cache if e not in pinned]  # in LRU order
                    if policy == "lru":
                        victim = candidates[0]
                    elif policy == "lfu":
                        victim = min(candidates, key=lambda e: frequency[e])  # first = least recent on ties
                    else:
                        victim = max(candidates, key=lambda e: (due[e], -e))  # ties: lowest expert id
                    del cache[victim]
                cache[expert] = None
            if policy == "belady":
                due[expert] = next_use[t][expert]
    return hits


@dataclass
class PolicyResult:
    policy: str
    capacity: int  # experts per layer
    requests: int
    hits: int
    cold_misses: int  # first requests of each expert: misses for every policy
    per_layer_hits: list[int] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    def to_dict(self) -> dict:
        return {
            "policy": self.policy, "capacity": self.capacity, "requests": self.requests, "hits": self.hits,
            "misses": self.requests - self.hits, "hit_rate": self.hit_rate, "cold_misses": self.cold_misses,
            "per_layer_hits": self.per_layer_hits,
        }


def capacity_from_bytes(trace: RoutingTrace, capacity_bytes: int) -> int:
    """Experts per layer that ``capacity_bytes`` per layer holds: the bytes divided by the
    largest expert of the trace's layers (``expert_bytes`` in its metadata), rounded down."""
    sizes = trace.metadata.get("expert_bytes") or []
    if not sizes or min(sizes) <= 0:
        raise TraceError("the trace's metadata has no expert_bytes; give the capacity in experts")
    return capacity_bytes // max(sizes)


def simulate_trace(
    trace: RoutingTrace, capacity: int, policies: Sequence[str] = POLICIES
) -> list[PolicyResult]:
    """Every policy on every layer of ``trace`` with ``capacity`` experts per layer."""
    if capacity < 1:
        raise TraceError(f"capacity={capacity} is invalid: must be >= 1 expert per layer")
    for policy in policies:
        if policy not in POLICIES:
            raise TraceError(f"policy={policy!r} is invalid: use {', '.join(POLICIES)}")
    layer_steps = [_steps(layer.experts_TK) for layer in trace.layers]
    requests = sum(len(step) for steps in layer_steps for step in steps)
    cold = sum(len({e for step in steps for e in step}) for steps in layer_steps)
    results = []
    for policy in policies:
        per_layer = [simulate_layer(steps, capacity, policy) for steps in layer_steps]
        results.append(PolicyResult(policy, capacity, requests, sum(per_layer), cold, per_layer))
    return results
