"""Budgeted loading (moekit.inference.offload), the expert cache (moekit.inference.cache), the
residency helper, and ``moekit sample STORE --memory-budget``.

Verified: sizes parse (4GiB, 512MiB, 1.5GB, bytes) and bad ones are refused; a budget below
the minimum (non-expert bytes + top_k experts per MoE layer) is rejected naming the minimum in
bytes and GiB, the minimum itself works; logits (prefill, then decode steps with the KV cache)
are bit-identical at every budget from the minimum to unlimited, in float32 and bfloat16, and
to the plain moekit LM's; a prefill reads each needed expert once per layer; pins hold
under a scripted routing (a fake router forcing a sequence of experts), with hit/miss/eviction
counts derived by hand; a prefill keeps the last token's experts cached; the residency helper
counts a store file's page-cache pages; the CLI's --json is one document with the counters,
and bad sizes name --memory-budget.

    PYTHONPATH=src pytest tests/test_offload.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from moekit import matvec
from moekit.inference import load, minimum_budget, parse_size
from moekit.inference.cache import CacheError, ExpertCache
from moekit.inference.offload import BudgetError, OffloadedExperts, plain_lm_from_store, plan_memory, preload_experts
from moekit.inference.store import ExpertStore, write_store
from moekit.models.lm import KVCache, LMConfig, MoETransformerLM
from moekit.routing import RoutingResult, topk_assignments
from tests.test_store import lm_config


def tiny_config(**changes) -> LMConfig:
    return lm_config(changes, dict(d_model=32, d_ff=24, num_experts=8, top_k=2),
                     vocab_size=64, seq_len=64, n_layer=3, n_head=2, d_model=32)


def make_store(tmp_path: Path, dtype: torch.dtype = torch.float32, **changes) -> tuple[Path, MoETransformerLM]:
    torch.manual_seed(0)
    model = MoETransformerLM(tiny_config(**changes)).eval().to(dtype)
    return write_store(tmp_path / "store", model.config, model.state_dict().items()), model


# --------------------------------------------------------------------------------------------
# Sizes and the budget
# --------------------------------------------------------------------------------------------


def test_parse_size_units():
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("4096") == 4096
    assert parse_size("2 kib") == 2048
    assert parse_size(123) == 123


@pytest.mark.parametrize("text", ["", "4XB", "-1", "0", "1.5B", "GiB", "4G", "1e9", "nan", "4GiB extra"])
def test_parse_size_refuses_what_is_not_a_whole_size(text):
    with pytest.raises(ValueError, match="size|bytes"):
        parse_size(text)


def test_budget_below_the_minimum_is_rejected_naming_it(tmp_path):
    store, _ = make_store(tmp_path)
    minimum = minimum_budget(store)
    plan = plan_memory(ExpertStore(store), None)
    # The minimum: every non-expert weight plus top_k=2 experts for each of the 3 MoE layers.
    assert minimum == plan.non_expert_bytes + 3 * 2 * plan.slot_bytes[0]
    with pytest.raises(BudgetError) as error:
        load(store, memory_budget=minimum - 1)
    message = str(error.value)
    assert f"{minimum:,} bytes" in message and f"{minimum / 2**30:.3f} GiB" in message and "top_k=2" in message
    model = load(store, memory_budget=minimum)
    assert model.memory_plan.slots == {0: 2, 1: 2, 2: 2}


def test_budget_spreads_extra_slots_over_the_layers_in_turn(tmp_path):
    store, _ = make_store(tmp_path)
    plan = plan_memory(ExpertStore(store), None)
    slot = plan.slot_bytes[0]
    assert plan_memory(ExpertStore(store), plan.minimum_bytes + 2 * slot + slot - 1).slots == {0: 3, 1: 3, 2: 2}
    everything = plan.non_expert_bytes + plan.expert_bytes
    assert plan_memory(ExpertStore(store), everything).slots == {0: 8, 1: 8, 2: 8}
    assert plan_memory(ExpertStore(store), 100 * everything).slots == {0: 8, 1: 8, 2: 8}  # capped at E


# --------------------------------------------------------------------------------------------
# Bit-exactness
# --------------------------------------------------------------------------------------------


def prefill_then_decode(model: MoETransformerLM, idx_BS: Tensor, prompt: int) -> list[Tensor]:
    """Logits of a prefill of ``prompt`` tokens, then of one decode step per later token."""
    cache = KVCache(model.config.n_layer)
    with torch.no_grad():
        outputs = [model(idx_BS[:, :prompt], cache=cache)[0]]
        for t in range(prompt, idx_BS.shape[1]):
            outputs.append(model(idx_BS[:, t : t + 1], cache=cache)[0])
    return outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_are_bit_identical_at_every_budget(tmp_path, dtype):
    store, model = make_store(tmp_path, dtype)
    torch.manual_seed(1)
    idx = torch.randint(0, 64, (1, 24))
    reference = prefill_then_decode(load(store), idx, prompt=16)  # every expert cached, nothing evicted
    plan = plan_memory(ExpertStore(store), None)
    slot = plan.slot_bytes[0]
    budgets = [plan.minimum_bytes, plan.minimum_bytes + slot, plan.minimum_bytes + 4 * slot,
               plan.non_expert_bytes + plan.expert_bytes // 2, plan.non_expert_bytes + plan.expert_bytes]
    for budget in budgets:
        offloaded = load(store, memory_budget=budget)
        outputs = prefill_then_decode(offloaded, idx, prompt=16)
        for step, (got, want) in enumerate(zip(outputs, reference, strict=True)):
            assert got.dtype == dtype
            assert torch.equal(got, want), f"budget {budget}: step {step} differs"
        stats = offloaded.expert_cache.stats()
        assert stats.cached_bytes <= budget - plan.non_expert_bytes
        if budget == plan.minimum_bytes:
            assert stats.evictions > 0  # the smallest budget really did evict and reload
    # plain_lm_from_store rebuilds exactly the model that was packed.
    rebuilt = prefill_then_decode(plain_lm_from_store(store), idx, prompt=16)
    plain = prefill_then_decode(model, idx, prompt=16)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt, plain, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
def test_offloaded_logits_equal_the_plain_lm_bitwise(tmp_path, dtype, batch):
    """The plain LM runs other code (grouped GEMM and the fused combine for a prefill, the
    per-assignment fast path for batch-1 decode); it reduces with the same embedding_bag, and
    CPU grouped GEMM rounds as the per-expert matmul, so the logits are equal bit for bit. If a
    change to the plain layer's kernels breaks this, the offloaded model's reference is still
    load(store) (the test above); this test then says by how much the plain LM moved."""
    store, model = make_store(tmp_path, dtype)
    idx = torch.randint(0, 64, (batch, 24))
    plain = prefill_then_decode(model, idx, prompt=16)
    offloaded = prefill_then_decode(load(store, memory_budget=minimum_budget(store)), idx, prompt=16)
    for step, (got, want) in enumerate(zip(offloaded, plain, strict=True)):
        difference = (got.float() - want.float()).abs().max().item()
        assert torch.equal(got, want), f"step {step}: the plain LM differs by up to {difference:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_through_the_kernels_equals_the_plain_lm_bitwise(tmp_path, dtype, monkeypatch):
    """Experts large enough for moekit.matvec (the tests above run torch's products): a decode
    step routes in C (``route_experts_ffn``), then runs the token's cached experts and their
    weighted sum in one C call (``experts_ffn`` on their own matrices), and its logits equal
    the in-memory model's bit for bit (the same router code, then the same experts code on the
    stacked weights, every block in one ``lm_decode`` call) at the minimum budget and with
    every expert cached."""
    if not matvec.available():
        pytest.skip(f"moekit.matvec kernels: {matvec.status()}")
    store, model = make_store(tmp_path, dtype, d_model=256, n_head=4, moe=dict(d_model=256, d_ff=128))
    idx = torch.randint(0, 64, (1, 14), generator=torch.Generator().manual_seed(5))
    calls = []
    real, real_routed = matvec.experts_ffn, matvec.route_experts_ffn
    monkeypatch.setattr(matvec, "experts_ffn", lambda *args: calls.append(isinstance(args[1], list)) or real(*args))
    monkeypatch.setattr(matvec, "route_experts_ffn",
                        lambda *args: calls.append("routed" if args[8] is None else False) or real_routed(*args))
    real_step = matvec.lm_decode
    monkeypatch.setattr(matvec, "lm_decode", lambda *args: calls.append("step") or real_step(*args))
    plain = prefill_then_decode(model, idx, prompt=8)
    for budget in (minimum_budget(store), None):
        offloaded = load(store, memory_budget=budget)
        outputs = prefill_then_decode(offloaded, idx, prompt=8)
        for step, (got, want) in enumerate(zip(outputs, plain, strict=True)):
            assert torch.equal(got, want), f"budget {budget}: step {step} differs"
        assert offloaded.expert_cache.stats().misses > 0
    decode_steps, moe_layers = 14 - 8, 3
    assert calls.count(True) == 2 * decode_steps * moe_layers  # two budgets, the offloaded experts' lists
    assert calls.count("routed") == 2 * decode_steps * moe_layers  # their routing, before the loads
    # the plain LM: every block's attention, router and stacked experts in one call per token
    # (the same C functions as the offloaded model's per-layer calls)
    assert calls.count("step") == decode_steps and calls.count(False) == 0


def test_bf16_view_of_a_float32_store_is_bit_identical_across_budgets(tmp_path):
    store, _ = make_store(tmp_path)
    idx = torch.randint(0, 64, (1, 12))
    reference = prefill_then_decode(load(store, dtype=torch.bfloat16), idx, prompt=8)
    minimum = minimum_budget(store, dtype=torch.bfloat16)
    assert minimum < minimum_budget(store)
    outputs = prefill_then_decode(load(store, memory_budget=minimum, dtype=torch.bfloat16), idx, prompt=8)
    assert all(torch.equal(a, b) and a.dtype == torch.bfloat16 for a, b in zip(outputs, reference, strict=True))


def test_generate_gives_the_same_tokens_at_the_minimum_budget(tmp_path):
    store, model = make_store(tmp_path)
    idx = torch.randint(0, 64, (2, 5))
    want = load(store).generate(idx, 12, temperature=0.0)
    got = load(store, memory_budget=minimum_budget(store)).generate(idx, 12, temperature=0.0)
    assert torch.equal(got, want)
    assert torch.equal(model.generate(idx, 12, temperature=0.0), want)


def test_prefill_reads_each_needed_expert_once_per_layer(tmp_path):
    import moekit

    store, _ = make_store(tmp_path)
    model = load(store, memory_budget=minimum_budget(store))  # 2 slots per layer, 8 experts
    idx = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        model(idx)
    used = sum(sum(count > 0 for count in s.tokens_per_expert) for s in moekit.routing_stats(model).values())
    stats = model.expert_cache.stats()
    assert used > 3 * 2  # the prompt needs more experts per layer than the layer's slots
    assert stats.misses == used and stats.hits == 0  # each read once, though they cannot all stay


def test_offloaded_experts_refuse_training_mode(tmp_path):
    store, _ = make_store(tmp_path)
    model = load(store).train()
    with pytest.raises(RuntimeError, match="inference only"):
        model(torch.randint(0, 64, (1, 4)))


# --------------------------------------------------------------------------------------------
# The cache: pins, scripted routing
# --------------------------------------------------------------------------------------------


def counting_cache(slots: int, layers=(0,)) -> tuple[ExpertCache, list]:
    loads = []

    def load_expert(layer, expert, spare):
        loads.append((layer, expert))
        return f"w{layer}.{expert}", 100

    return ExpertCache(dict.fromkeys(layers, slots), dict.fromkeys(layers, 100), load_expert), loads


def test_lfu_evicts_the_least_requested_and_breaks_ties_by_recency():
    """Requests 0, 0, 1 then 2 with two slots: LRU evicts 0 (used longest ago), LFU evicts 1
    (requested once against twice); with equal counts LFU falls back to LRU; clear() forgets."""
    for policy, survivor in (("lru", 1), ("lfu", 0)):
        cache = ExpertCache({0: 2}, {0: 100}, lambda layer, expert, spare: (expert, 100), policy)
        for expert in (0, 0, 1, 2):
            cache.acquire(0, [expert])
            cache.release(0, [expert])
        assert cache.cached(0) == [survivor, 2], policy
    cache = ExpertCache({0: 2}, {0: 100}, lambda layer, expert, spare: (expert, 100), "lfu")
    for expert in (0, 1, 2):  # one request each: the tie goes to the least recently used
        cache.acquire(0, [expert])
        cache.release(0, [expert])
    assert cache.cached(0) == [1, 2]
    cache.clear()
    assert cache.requests == {} and cache.cached(0) == []
    # A prefill's acquisition counts its rows: expert 0 (3 rows) outlives expert 1 (1 row).
    cache.acquire(0, [0, 1], requests=[3, 1])
    cache.release(0, [0, 1])
    cache.acquire(0, [2])
    assert cache.cached(0) == [0, 2] and cache.requests[0, 0] == 3
    with pytest.raises(ValueError, match="cache policy 'mru' is invalid: use lru or lfu"):
        ExpertCache({0: 2}, {0: 100}, lambda layer, expert, spare: (expert, 100), "mru")


def test_an_eviction_hands_the_evicted_value_to_the_loader():
    spares = []

    def load_expert(layer, expert, spare):
        spares.append(spare)
        return f"w{expert}", 100

    cache = ExpertCache({0: 1}, {0: 100}, load_expert)
    for expert in (0, 1, 2):
        cache.acquire(0, [expert])
        cache.release(0, [expert])
    assert spares == [None, "w0", "w1"]


def test_pinned_experts_are_never_evicted():
    cache, loads = counting_cache(slots=2)
    assert cache.acquire(0, [0, 1]) == ["w0.0", "w0.1"]
    with pytest.raises(CacheError, match="pinned"):
        cache.acquire(0, [2])  # both slots hold experts in use
    assert cache.cached(0) == [0, 1]
    cache.release(0, [0])
    assert cache.acquire(0, [2]) == ["w0.2"]  # evicts 0, the only unpinned one
    assert cache.cached(0) == [1, 2] and cache.is_pinned(0, 1)
    with pytest.raises(CacheError, match="3 experts acquired at once but the layer has 2 slots"):
        cache.acquire(0, [3, 4, 5])
    assert not cache.is_pinned(0, 3)


def test_lru_with_protect_and_counters():
    cache, loads = counting_cache(slots=3)
    for wave in ([0], [1], [2], [0], [3]):  # 3 evicts 1: 0 was used more recently
        cache.acquire(0, wave)
        cache.release(0, wave)
    assert cache.cached(0) == [2, 0, 3]
    cache.acquire(0, [4], protect={2})  # the LRU (2) is protected: 0 goes instead
    cache.release(0, [4])
    assert cache.cached(0) == [2, 3, 4]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.bytes_read) == (1, 5, 2, 500)
    assert stats.cached_bytes == 300 == stats.capacity_bytes and loads[-1] == (0, 4)


class ScriptedRouter:
    """A fake router: token t of the current forward goes to the experts ``script[t]`` (weights 0.5)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.script: list[tuple[int, ...]] = []

    def __call__(self, x_TD: Tensor, capacity_factor) -> RoutingResult:
        assert len(self.script) == x_TD.shape[0]
        topk_ids_TK = torch.tensor(self.script, dtype=torch.long)
        weights_TK = torch.full(topk_ids_TK.shape, 0.5)
        scores_TE = torch.full((x_TD.shape[0], self.num_experts), 1 / self.num_experts)
        return RoutingResult(scores_TE.log(), scores_TE, topk_assignments(topk_ids_TK, weights_TK, scores_TE),
                             torch.bincount(topk_ids_TK.reshape(-1), minlength=self.num_experts).float())


def scripted_model(tmp_path: Path, budget_slots: int):
    store, _ = make_store(tmp_path, n_layer=1)
    plan = plan_memory(ExpertStore(store), None)
    model = load(store, memory_budget=plan.minimum_bytes + (budget_slots - 2) * plan.slot_bytes[0])
    router = ScriptedRouter(8)
    moe = model.blocks[0].ffn
    moe.route = router
    cache = model.expert_cache
    evicted_while_pinned = []
    evict = cache._evict_one

    def checked_evict(layer, protect):
        before = {e for e in cache.cached(layer) if cache.is_pinned(layer, e)}
        evict(layer, protect)
        evicted_while_pinned.extend(before - set(cache.cached(layer)))

    cache._evict_one = checked_evict
    acquire = cache.acquire

    def checked_acquire(layer, experts, protect=(), requests=None):
        values = acquire(layer, experts, protect, requests)
        # Every expert of the wave is cached and pinned once the whole wave is loaded.
        assert all(cache.is_cached(layer, e) and cache.is_pinned(layer, e) for e in experts)
        return values

    cache.acquire = checked_acquire
    return model, router, cache, evicted_while_pinned


def test_pins_hold_and_counters_follow_a_scripted_routing(tmp_path):
    model, router, cache, evicted_while_pinned = scripted_model(tmp_path, budget_slots=2)
    steps = [
        [(0, 1)],  # misses 0, 1
        [(0, 1)],  # hits 0, 1
        [(2, 3)],  # misses 2, 3; evicts 0, 1
        [(3, 0)],  # hit 3, miss 0 (evicts 2)
        # A prefill of 3 tokens needing 5 experts with 2 slots, the last token's (1, 3) last:
        # 0 (cached) first, then 2, 4 (misses, one at a time so 3 stays), then 3 (hit), 1 (miss).
        [(0, 2), (4, 0), (1, 3)],
    ]
    expected = [(0, 2, 0), (2, 2, 0), (2, 4, 2), (3, 5, 3), (5, 8, 6)]  # cumulative hits, misses, evictions
    for step, want in zip(steps, expected, strict=True):
        router.script = step
        with torch.no_grad():
            model(torch.zeros(1, len(step), dtype=torch.long))
        stats = cache.stats()
        assert (stats.hits, stats.misses, stats.evictions) == want, step
        assert not cache.pins  # every pin released after the forward
    assert evicted_while_pinned == []
    assert sorted(cache.cached(0)) == [1, 3]  # the prefill's last token's experts stay for decoding


def test_prefill_order_puts_cached_experts_first_and_the_last_tokens_last(tmp_path):
    model, router, cache, _ = scripted_model(tmp_path, budget_slots=3)
    experts: OffloadedExperts = model.blocks[0].ffn.experts
    router.script = [(5, 6)]
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long))
    experts.protect = frozenset({1, 6})
    assert experts.processing_order([0, 1, 5, 6, 7]) == [5, 0, 7, 6, 1]
    # With 3 slots and the cached 6 still to come, waves leave it a slot: 2 experts, not 3.
    assert experts.next_wave([5, 0, 7, 6, 1]) == [5, 0]
    assert experts.next_wave([6, 1]) == [6, 1]


# --------------------------------------------------------------------------------------------
# Residency
# --------------------------------------------------------------------------------------------


def test_residency_counts_the_store_files_page_cache(tmp_path):
    from moekit.inference.residency import resident_bytes

    store_dir, _ = make_store(tmp_path)
    store = ExpertStore(store_dir)
    store.drop_from_page_cache()
    cold = resident_bytes(store.expert_files)
    if cold.page_cache_bytes is None:
        pytest.skip(cold.note)
    path = store.expert_files[0]
    path.read_bytes()  # a buffered read leaves the file's pages cached
    warm = resident_bytes(store.expert_files)
    assert warm.file_bytes[str(path)] == path.stat().st_size
    assert warm.page_cache_bytes >= cold.page_cache_bytes + path.stat().st_size - cold.file_bytes[str(path)]
    assert warm.rss_bytes > 0 and warm.total_bytes == warm.rss_bytes + warm.page_cache_bytes
    store.drop_from_page_cache()
    assert resident_bytes([path]).page_cache_bytes == 0


@pytest.mark.parametrize("direct", [True, False])
def test_reading_experts_leaves_no_page_cache_behind(tmp_path, monkeypatch, direct):
    """O_DIRECT reads bypass the page cache; buffered ones (where the filesystem refuses
    O_DIRECT, simulated by hiding it) drop what they read."""
    import os

    from moekit.inference.residency import resident_bytes

    if not direct:
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    store_dir, _ = make_store(tmp_path)
    store = ExpertStore(store_dir)
    store.drop_from_page_cache()
    for expert in range(8):
        tensors, _ = store.expert_tensors(0, expert)
        assert tensors["w_in"].shape == (32, 48)
    assert store._files["experts-000.bin"].direct is (direct and hasattr(os, "O_DIRECT"))
    if resident_bytes([]).page_cache_bytes is None:
        pytest.skip("mincore unavailable")
    assert resident_bytes(store.expert_files).page_cache_bytes == 0


# --------------------------------------------------------------------------------------------
# moekit sample STORE --memory-budget
# --------------------------------------------------------------------------------------------


@pytest.fixture
def byte_store(tmp_path):
    torch.manual_seed(0)
    model = MoETransformerLM(tiny_config(vocab_size=256)).eval()
    return write_store(tmp_path / "store", model.config, model.state_dict().items(), tokenizer={"kind": "bytes"})


def test_sample_with_a_memory_budget_json_is_one_document(byte_store, capsys):
    from moekit.cli.main import main

    minimum = minimum_budget(byte_store)
    args = ["sample", str(byte_store), "--prompt", "Hello", "--tokens", "6", "--greedy", "--json"]
    assert main([*args, "--memory-budget", str(minimum)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)  # the whole of stdout is the one document
    assert result["memory"]["memory_budget"] == minimum and result["memory"]["minimum_bytes"] == minimum
    for phase in ("prefill", "generate"):
        counters = result["expert_cache"][phase]
        assert {"hits", "misses", "evictions", "bytes_read", "hit_rate"} <= set(counters)
    assert result["expert_cache"]["prefill"]["misses"] > 0
    assert result["residency"]["total_bytes"] >= result["residency"]["rss_bytes"] > 0
    # Without a budget every expert stays once read; the text is the same.
    assert main(args) == 0
    unlimited = json.loads(capsys.readouterr().out)
    assert unlimited["samples"] == result["samples"] and unlimited["memory"]["memory_budget"] is None
    assert main([*args, "--memory-budget", "1GiB"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == result["samples"]
    # The policy changes which experts stay, never the text.
    assert result["cache_policy"] == "lru"
    assert main([*args, "--memory-budget", str(minimum), "--cache-policy", "lfu"]) == 0
    lfu = json.loads(capsys.readouterr().out)
    assert lfu["cache_policy"] == "lfu" and lfu["samples"] == result["samples"]


def test_sample_cache_policy_needs_a_store(tmp_path, capsys):
    from moekit.cli.main import main

    (tmp_path / "run").mkdir()
    assert main(["sample", str(tmp_path / "run"), "--cache-policy", "lfu"]) == 2
    captured = capsys.readouterr()
    assert "--cache-policy applies to expert stores" in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize("size", ["4XB", "-1", "0", "1.5B", "lots"])
def test_sample_bad_memory_budget_names_the_flag(byte_store, capsys, size):
    from moekit.cli.main import main

    assert main(["sample", str(byte_store), "--memory-budget", size]) == 2
    captured = capsys.readouterr()
    assert "--memory-budget" in captured.err and captured.out == "" and "Traceback" not in captured.err


def test_sample_budget_below_minimum_names_the_minimum(byte_store, capsys):
    from moekit.cli.main import main

    minimum = minimum_budget(byte_store)
    assert main(["sample", str(byte_store), "--memory-budget", str(minimum - 4096), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--memory-budget" in captured.err and f"minimum {minimum:,} bytes" in captured.err


def test_sample_memory_budget_needs_a_store(tmp_path, capsys):
    from moekit.cli.main import main

    (tmp_path / "run").mkdir()
    assert main(["sample", str(tmp_path / "run"), "--memory-budget", "1GiB"]) == 2
    assert "moekit pack" in capsys.readouterr().err


def test_pack_cli_errors(tmp_path, capsys, byte_store):
    from moekit.cli.main import main

    assert main(["pack", str(tmp_path / "missing"), "--out", str(tmp_path / "s")]) == 2
    assert "missing" in capsys.readouterr().err
    # int4 quantizes in groups of 128: a d_model of 32 cannot (tests/test_quant_store.py has the rest).
    from tests.test_store import write_run

    run = write_run(tmp_path / "run", MoETransformerLM(tiny_config(vocab_size=256)))
    assert main(["pack", str(run), "--out", str(tmp_path / "s"), "--experts-dtype", "int4"]) == 2
    assert "--experts-dtype int4" in capsys.readouterr().err and not (tmp_path / "s").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert main(["pack", str(byte_store), "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "full" / "x").read_text() == "keep"


def test_dense_layers_and_shared_experts_stay_resident(tmp_path):
    """moe_every=2 (block 1 is the only MoE layer) and a shared expert: only routed experts are offloaded."""
    store, model = make_store(tmp_path, n_layer=3, moe_every=2, moe={"num_shared_experts": 1})
    opened = ExpertStore(store)
    assert opened.layers == [1] and [path.name for path in opened.expert_files] == ["experts-001.bin"]
    assert "blocks.1.ffn.shared_experts.ffn.w_in" in opened.resident_specs
    idx = torch.randint(0, 64, (1, 12))
    plain = prefill_then_decode(model, idx, prompt=8)
    offloaded = prefill_then_decode(load(opened, memory_budget=minimum_budget(opened)), idx, prompt=8)
    assert all(torch.equal(a, b) for a, b in zip(offloaded, plain, strict=True))


def test_preload_reads_every_expert_once_and_needs_room_for_all(tmp_path):
    store, _ = make_store(tmp_path)
    model = load(store, preload=True)
    assert model.expert_cache.stats().misses == 3 * 8
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 10)))
    assert model.expert_cache.stats().misses == 3 * 8  # nothing more to read
    with pytest.raises(BudgetError, match="preload needs every expert cached"):
        load(store, memory_budget=minimum_budget(store), preload=True)


def test_a_budget_that_holds_every_expert_preloads_them_by_default(tmp_path):
    """A user who gives the whole model's memory gets an in-memory model after the load, not
    one that reads its experts one miss at a time while it decodes; without a budget, or with
    one that holds fewer, experts are read on demand."""
    store, _ = make_store(tmp_path)
    plan = plan_memory(ExpertStore(store), None)
    whole = plan.non_expert_bytes + plan.expert_bytes
    assert load(store, memory_budget=whole).expert_cache.stats().misses == 3 * 8
    assert load(store, memory_budget=whole, preload=False).expert_cache.stats().misses == 0
    assert load(store).expert_cache.stats().misses == 0  # no budget: read once used
    assert load(store, memory_budget=whole - 1).expert_cache.stats().misses == 0  # one slot short somewhere


def test_a_prefill_frees_each_evicted_expert_before_reading_the_next(tmp_path):
    """At the minimum budget a prefill runs a layer's experts in waves; an expert evicted to make
    room must be freed then (no reference of the previous wave left), so that at most the
    layer's slots of experts are alive at any read."""
    import weakref

    store, _ = make_store(tmp_path)
    model = load(store, memory_budget=minimum_budget(store))
    cache = model.expert_cache
    alive: dict[int, list[weakref.ref]] = {}
    worst = {"alive_at_a_read": 0}
    real_load = cache.load

    def watched_load(layer: int, expert: int, spare):
        # The evicted expert (spare) is alive at the read only as the buffer read into.
        refs = [ref for ref in alive.get(layer, []) if ref() is not None and ref() is not spare]
        worst["alive_at_a_read"] = max(worst["alive_at_a_read"], len(refs))
        value, nbytes = real_load(layer, expert, spare)
        if spare is not None:
            assert value.buffer is spare.buffer  # read into the evicted expert's memory
            worst["reused"] = worst.get("reused", 0) + 1
        alive[layer] = [*refs, weakref.ref(value)]
        return value, nbytes

    cache.load = watched_load
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(4)))
    assert cache.stats().evictions > 0 and worst["reused"] == cache.stats().evictions
    # Before each read one slot was freed: at most slots - 1 experts of the layer are alive then.
    assert worst["alive_at_a_read"] <= max(cache.slots.values()) - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_budget_that_holds_every_expert_decodes_as_the_in_memory_model_does(tmp_path, dtype, monkeypatch):
    """Preloaded into one buffer per layer (blob after blob), a layer's experts are stacked
    views that the whole-step decode (``matvec.lm_decode``) reads as it reads the in-memory
    model's: the same call, the same logits bit for bit, hits counted per decoded token; a
    cleared cache drops the views (and decodes through the cache again)."""
    if not matvec.available():
        pytest.skip(f"moekit.matvec kernels: {matvec.status()}")
    store, model = make_store(tmp_path, dtype, d_model=256, n_head=4, moe=dict(d_model=256, d_ff=128))
    plan = plan_memory(ExpertStore(store), None)
    idx = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(6))
    calls = []
    real = matvec.lm_decode
    monkeypatch.setattr(matvec, "lm_decode", lambda *args: calls.append(1) or real(*args))
    plain = prefill_then_decode(model, idx, prompt=8)
    assert len(calls) == 4
    offloaded = load(store, memory_budget=plan.non_expert_bytes + plan.expert_bytes)
    cache = offloaded.expert_cache
    assert sorted(cache.stacked) == sorted(plan.num_experts) and cache.stats().misses == 3 * 8
    w_in = cache.stacked[0][0]
    assert w_in.shape == (8, 256, 256) and w_in.stride(0) == plan.slot_bytes[0] // dtype.itemsize
    assert torch.equal(w_in[5], cache.entries[0][5][0].w_in_DH)  # the cached expert is that view
    cache.reset_counters()
    outputs = prefill_then_decode(offloaded, idx, prompt=8)
    assert len(calls) == 8  # the offloaded model's 4 decoded tokens, one call each
    assert all(torch.equal(a, b) for a, b in zip(outputs, plain, strict=True))
    stats = cache.stats()
    assert stats.misses == 0 and stats.hits >= 4 * 3 * 2  # each decoded token's k experts in 3 layers, and the prompt's
    cache.clear()
    assert cache.stacked == {}
    again = prefill_then_decode(offloaded, idx, prompt=8)  # read on demand, per layer
    assert len(calls) == 8 and all(torch.equal(a, b) for a, b in zip(again, plain, strict=True))


def test_preloading_a_partly_filled_cache_reads_only_the_missing_experts(tmp_path):
    store, _ = make_store(tmp_path, d_model=256, n_head=4, moe=dict(d_model=256, d_ff=128))
    plan = plan_memory(ExpertStore(store), None)
    model = load(store, memory_budget=plan.non_expert_bytes + plan.expert_bytes, preload=False)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 3)))  # reads some experts on demand
    read = model.expert_cache.stats().misses
    assert 0 < read < 3 * 8
    preload_experts(model)
    assert model.expert_cache.stats().misses == 3 * 8  # each expert read once in all
    assert model.expert_cache.stacked == {}  # the layers were not read into one buffer
