"""Routing traces (moekit.inference.trace) and the cache-policy simulator (policy_sim).

- Policies on tiny traces computed by hand: a cyclic trace where Belady beats LRU (and LFU),
  a trace with one popular expert where LFU beats LRU, and a top-2 trace where the pinned
  experts of the current token must survive an eviction that plain LRU would make.
- Belady against an exhaustive search over every eviction choice on small random traces
  (it is the optimum), and never below LRU or LFU on larger random ones.
- Recording: the trace of a moekit LM equals the layers' own routing statistics, teacher-forced
  windows equal token-by-token decoding, metadata says where the trace came from, save/load
  round trips, bad files are refused by name; a transformers model patched by patch_moe
  records through its PatchedMoE layers.

    pytest tests/test_trace.py
"""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.inference.policy_sim import POLICIES, capacity_from_bytes, simulate_layer, simulate_trace
from moekit.inference.trace import (
    LayerTrace,
    RoutingTrace,
    TraceError,
    record_routing,
    record_trace,
    replay_routing,
)
from moekit.models.lm import KVCache, LMConfig, MoETransformerLM


def hits(steps, capacity):
    return {policy: simulate_layer(steps, capacity, policy) for policy in POLICIES}


# --------------------------------------------------------------------------------------------
# Hand-computed traces
# --------------------------------------------------------------------------------------------


def test_cyclic_trace_belady_beats_lru_and_lfu():
    # A B C A B C, capacity 2. LRU always evicts the expert needed next: 0 hits. LFU's counts
    # tie and fall back to LRU: 0 hits. Belady at C (t=2) evicts B (next at 4, A at 3) and at
    # B (t=4) evicts A (never again): hits at t=3 (A) and t=5 (C).
    steps = [[0], [1], [2], [0], [1], [2]]
    assert hits(steps, 2) == {"lru": 0, "lfu": 0, "belady": 2}


def test_popular_expert_lfu_beats_lru():
    # A A B C A, capacity 2. LRU: hit at t=1; C (t=3) evicts A (least recent: t=1 < B's t=2),
    # so A misses at t=4: 1 hit. LFU: C evicts B (1 use < A's 2): A hits at t=4: 2 hits.
    steps = [[0], [0], [1], [2], [0]]
    assert hits(steps, 2) == {"lru": 1, "lfu": 2, "belady": 2}


def test_current_tokens_experts_are_pinned():
    # top-2, capacity 2: token 0 uses (0, 1), token 1 uses (2, 0). Loading 2 needs a victim;
    # plain LRU would take 0 (least recent), which token 1 needs too: pinned, so 1 goes and 0
    # hits. Every policy: 1 hit of 4 requests.
    steps = [[0, 1], [2, 0]]
    assert hits(steps, 2) == {"lru": 1, "lfu": 1, "belady": 1}


def test_capacity_below_top_k_is_refused():
    with pytest.raises(TraceError, match="capacity=1 experts is below the 2 experts one token uses"):
        simulate_layer([[0, 1]], 1, "lru")
    with pytest.raises(TraceError, match="policy='fifo' is invalid: use lru, lfu, belady"):
        simulate_layer([[0]], 1, "fifo")


def exhaustive_best(steps, capacity) -> int:
    """The most hits any eviction choices reach (demand loading, pins), by trying them all."""
    flat = [(t, e) for t, step in enumerate(steps) for e in step]

    @functools.cache
    def best(i: int, cache: frozenset) -> int:
        if i == len(flat):
            return 0
        t, expert = flat[i]
        if expert in cache:
            return 1 + best(i + 1, cache)
        if len(cache) < capacity:
            return best(i + 1, cache | {expert})
        victims = [e for e in cache if e not in steps[t]]
        return max(best(i + 1, (cache - {v}) | {expert}) for v in victims)

    return best(0, frozenset())


@pytest.mark.parametrize("top_k", [1, 2])
def test_belady_is_the_exhaustive_optimum_on_small_random_traces(top_k):
    rng = random.Random(top_k)
    for _ in range(40):
        steps = [rng.sample(range(5), top_k) for _ in range(9)]
        capacity = rng.randint(top_k, 4)
        assert simulate_layer(steps, capacity, "belady") == exhaustive_best(steps, capacity), (steps, capacity)


def test_belady_is_never_below_lru_or_lfu_on_random_traces():
    rng = np.random.default_rng(0)
    for trial in range(30):
        top_k = int(rng.integers(1, 4))
        num_experts = int(rng.integers(top_k + 1, 12))
        # skewed popularity, as trained routers have
        popularity = rng.dirichlet(np.full(num_experts, 0.5))
        steps = [list(rng.choice(num_experts, top_k, replace=False, p=popularity)) for _ in range(200)]
        capacity = int(rng.integers(top_k, num_experts + 1))
        result = hits(steps, capacity)
        assert result["belady"] >= max(result["lru"], result["lfu"]), (trial, result)


def test_simulate_trace_sums_layers_and_converts_bytes_to_experts():
    experts_TK = np.array([[0], [1], [2], [0], [1], [2]], dtype=np.int16)
    layer = LayerTrace("blocks.0.ffn", 3, 1, experts_TK, np.zeros(6, dtype=np.int32))
    other = LayerTrace("blocks.1.ffn", 3, 1, np.array([[0], [0], [1], [2], [0], [-1]], dtype=np.int16),
                       np.zeros(6, dtype=np.int32))
    trace = RoutingTrace([layer, other], np.zeros(0, dtype=np.int32), {"expert_bytes": [100, 100]})
    results = {r.policy: r for r in simulate_trace(trace, 2)}
    assert results["lru"].requests == 11 and results["lru"].cold_misses == 6  # the -1 slot is no request
    assert results["lru"].per_layer_hits == [0, 1] and results["belady"].per_layer_hits == [2, 2]
    assert results["belady"].hit_rate == pytest.approx(4 / 11)
    assert capacity_from_bytes(trace, 250) == 2


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------


def tiny_lm(vocab_size: int = 64) -> MoETransformerLM:
    torch.manual_seed(0)
    config = LMConfig(vocab_size=vocab_size, seq_len=16, n_layer=2, n_head=2, d_model=32,
                      moe=MoEConfig(d_model=32, d_ff=16, num_experts=6, top_k=2))
    return MoETransformerLM(config).eval()


def test_recorded_trace_is_the_layers_routing():
    model = tiny_lm()
    ids_T = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(1))
    trace = record_trace(model, ids_T, 16, source="random init (test)", trained=False,
                         model_name="tiny moekit LM", text="40 random token ids")
    assert [layer.name for layer in trace.layers] == ["blocks.0.ffn", "blocks.1.ffn"]
    assert trace.num_tokens == 40 and np.array_equal(trace.tokens_T, ids_T.numpy())
    for layer_trace, block in zip(trace.layers, model.blocks, strict=True):
        assert layer_trace.experts_TK.shape == (40, 2) and (layer_trace.experts_TK >= 0).all()
        assert (layer_trace.experts_TK[:, 0] != layer_trace.experts_TK[:, 1]).all()
        assert layer_trace.forward_T.tolist() == [0] * 16 + [1] * 16 + [2] * 8
        # the last forward (window 3, 8 tokens): the layer's own count of tokens per expert
        last = layer_trace.experts_TK[32:].reshape(-1)
        want = block.ffn.last_stats.tokens_per_expert_E.numpy()
        assert np.array_equal(np.bincount(last, minlength=6), want)
    assert trace.metadata["source"] == "random init (test)" and trace.metadata["trained"] is False
    assert trace.metadata["top_k"] == [2, 2] and trace.metadata["num_experts"] == [6, 6]
    assert trace.metadata["expert_bytes"] == [(32 * 32 + 16 * 32) * 4] * 2  # w_in [D, 2F] + w_out [F, D], fp32
    assert not hasattr(model.blocks[0].ffn, "route") or "route" not in vars(model.blocks[0].ffn)


def test_teacher_forced_trace_equals_token_by_token_decoding():
    model = tiny_lm()
    ids_T = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(2))
    forced = record_trace(model, ids_T, 16, source="random init", trained=False, model_name="m", text="t")
    with torch.no_grad(), record_routing(model) as recorder:
        cache = KVCache(model.config.n_layer)
        for token in ids_T.tolist():
            model(torch.tensor([[token]]), cache=cache)
    decoded = recorder.trace(source="random init", trained=False, model="m", text="t", tokens=ids_T)
    for a, b in zip(forced.layers, decoded.layers, strict=True):
        assert np.array_equal(a.experts_TK, b.experts_TK)
        assert b.forward_T.tolist() == list(range(12))


def test_trace_save_load_round_trip_and_bad_files(tmp_path):
    model = tiny_lm()
    trace = record_trace(model, torch.arange(20) % 64, 8, source="random init", trained=False,
                         model_name="tiny", text="0..19", extra={"note": "test"})
    path = trace.save(tmp_path / "trace")
    assert path.name == "trace.npz"
    again = RoutingTrace.load(path)
    assert again.metadata == trace.metadata and again.metadata["note"] == "test"
    for a, b in zip(trace.layers, again.layers, strict=True):
        assert a.name == b.name and np.array_equal(a.experts_TK, b.experts_TK)
        assert np.array_equal(a.forward_T, b.forward_T)
    assert [r.to_dict() for r in simulate_trace(again, 3)] == [r.to_dict() for r in simulate_trace(trace, 3)]

    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:100])
    with pytest.raises(TraceError, match="cut.npz: corrupt or truncated trace file"):
        RoutingTrace.load(tmp_path / "cut.npz")
    with pytest.raises(TraceError, match="missing.npz: no such trace file"):
        RoutingTrace.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", metadata=np.array('{"format": "x"}'))
    with pytest.raises(TraceError, match="not a moekit routing trace"):
        RoutingTrace.load(tmp_path / "other.npz")


def test_a_trace_must_say_where_it_came_from():
    model = tiny_lm()
    with pytest.raises(TraceError, match="needs a non-empty source"):
        record_trace(model, torch.arange(4), 4, source="", trained=False, model_name="m", text="t")
    with pytest.raises(TraceError, match="no moekit MoE layer"):
        with record_routing(torch.nn.Linear(2, 2)):
            pass


def test_routing_is_restored_after_an_error_inside_the_block():
    model = tiny_lm()
    with pytest.raises(RuntimeError, match="boom"):
        with record_routing(model):
            raise RuntimeError("boom")
    assert all("route" not in vars(block.ffn) for block in model.blocks)


# --------------------------------------------------------------------------------------------
# Replay: a model routes as a trace says
# --------------------------------------------------------------------------------------------


def hand_trace(rows, num_experts: int = 6) -> RoutingTrace:
    experts_TK = np.array(rows, dtype=np.int16)
    layer = LayerTrace("blocks.0.ffn", num_experts, experts_TK.shape[1], experts_TK,
                       np.arange(len(rows), dtype=np.int32))
    return RoutingTrace([layer], np.zeros(0, dtype=np.int32), {"source": "hand", "trained": True})


def test_replay_routes_every_layer_as_the_trace_token_after_token():
    model = tiny_lm()
    rows = [[0, 1], [2, 3], [4, 5], [5, 0], [1, 2]]
    with torch.no_grad(), replay_routing(model, hand_trace(rows), start=1) as replay, record_routing(model) as rec:
        cache = KVCache(model.config.n_layer)
        model(torch.tensor([[3, 4, 5]]), cache=cache)  # a prompt of 3: trace rows 1, 2, 3
        model(torch.tensor([[6]]), cache=cache)  # then one decoded token each: rows 4, 0 (wrapped)
        model(torch.tensor([[7]]), cache=cache)
        replay.reset(0)
        model(torch.tensor([[8]]))  # a new generation from row 0
    trace = rec.trace(source="replay (test)", trained=False, model="m", text="t")
    for layer in trace.layers:  # both model layers take the trace's one layer
        assert layer.experts_TK.tolist() == [rows[1], rows[2], rows[3], rows[4], rows[0], rows[0]]
    assert all("route" not in vars(block.ffn) for block in model.blocks)  # both blocks restored, nested


def test_replayed_weights_are_the_routers_scores_at_the_traces_experts():
    torch.manual_seed(3)
    layer = MoE(MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, routed_scaling_factor=1.5)).eval()
    model = torch.nn.Sequential(layer)
    x_TD = torch.randn(3, 8)
    rows = [[3, 0], [1, 2], [2, 3]]
    with torch.no_grad(), replay_routing(model, hand_trace(rows, num_experts=4)):
        y_TD = layer(x_TD)
    # Naive reference: softmax scores at the trace's experts, renormalized over k, times 1.5.
    scores_TE = (x_TD @ layer.router.weight.T).softmax(dim=-1)
    w_in, w_out = layer.experts.w_in.detach(), layer.experts.w_out.detach()
    for t, experts in enumerate(rows):
        weights = scores_TE[t, experts] / scores_TE[t, experts].sum() * 1.5
        want = torch.zeros(8)
        for weight, e in zip(weights, experts, strict=True):
            gate, up = (x_TD[t] @ w_in[e]).chunk(2)
            want += weight * ((torch.nn.functional.silu(gate) * up) @ w_out[e])
        torch.testing.assert_close(y_TD[t], want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "rows,config,message",
    [
        ([[0, 1]], {"num_experts": 8}, "has 8 experts, top-2; the trace's layer blocks.0.ffn has 6 experts"),
        ([[0, 1]], {"router": "expert_choice"}, "router 'expert_choice'"),
        ([[0, -1]], {}, "empty slots"),
    ],
)
def test_replay_refuses_a_trace_the_model_cannot_follow(rows, config, message):
    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, d_ff=16, num_experts=6, top_k=2)
    moe = MoEConfig(**{**moe.__dict__, **config})
    model = MoETransformerLM(LMConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=32, moe=moe))
    with pytest.raises(TraceError, match=message):
        with replay_routing(model, hand_trace(rows)):
            pass
    assert "route" not in vars(model.blocks[0].ffn)


def test_patched_transformers_model_records_through_its_moe_layers():
    transformers = pytest.importorskip("transformers")
    from moekit.interop.patch import patch_moe

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    model = transformers.MixtralForCausalLM(config).eval()
    patch_moe(model)
    ids_T = torch.randint(0, 97, (10,), generator=torch.Generator().manual_seed(3))
    trace = record_trace(model, ids_T, 10, source="random init", trained=False, model_name="tiny Mixtral", text="t")
    assert len(trace.layers) == 2 and all(layer.experts_TK.shape == (10, 2) for layer in trace.layers)
    assert trace.metadata["num_experts"] == [4, 4]


# --------------------------------------------------------------------------------------------
# moekit trace / moekit trace simulate
# --------------------------------------------------------------------------------------------


def tiny_run(path):
    import dataclasses

    from moekit.training.checkpoint import save_checkpoint, write_json_atomic
    from moekit.training.config import TrainConfig

    model = tiny_lm(vocab_size=256)  # byte tokens
    path.mkdir(parents=True)
    payload = {"model": model.config.to_dict(), "train": dataclasses.asdict(TrainConfig())}
    payload["tokenizer"] = {"kind": "bytes"}
    write_json_atomic(path / "config.json", payload)
    save_checkpoint(path, model, {"step": 0})
    return path


def test_trace_cli_records_and_simulates_with_one_json_document_each(tmp_path, capsys):
    import json

    from moekit.cli.main import main

    run = tiny_run(tmp_path / "run")
    data = tmp_path / "held_out.txt"
    data.write_text("To be, or not to be, that is the question. " * 4)
    out = tmp_path / "t.npz"
    assert main(["trace", str(run), "--data", str(data), "--out", str(out), "--max-tokens", "100", "--json"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert document["trace"] == str(out) and out.exists()
    meta = document["metadata"]
    assert meta["num_tokens"] == 100 and meta["trained"] is False
    assert str(run) in meta["source"] and "step 0" in meta["source"] and "held_out.txt" in meta["text"]

    # one expert: (32·32 + 16·32)·4 = 6144 bytes, so 12 KiB per layer holds 2
    assert main(["trace", "simulate", str(out), "--capacity", "2,6", "--capacity-bytes", "12KiB", "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)["results"]
    assert "untrained model" in captured.err
    assert [(r["capacity"], r["policy"]) for r in rows] == [(c, p) for c in (2, 6, 2) for p in POLICIES]
    assert rows[6:] == [{**row, "capacity_given": "12KiB"} for row in rows[:3]]
    by_capacity = {r["capacity"]: r for r in rows if r["policy"] == "lru"}
    assert by_capacity[6]["hit_rate"] == pytest.approx(1 - by_capacity[6]["cold_misses"] / by_capacity[6]["requests"])
    assert all(r["gap_to_belady"] >= 0 for r in rows)

    assert main(["trace", "simulate", str(out), "--capacity", "2"]) == 0
    table = capsys.readouterr().out
    assert "belady" in table and "gap to belady" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", "{out}", "--capacity", "1"], "--capacity 1 is invalid: 1 experts per layer is below top_k=2"),
        (["simulate", "{out}", "--capacity", "x"], "--capacity x is invalid: must be an integer >= 1"),
        (["simulate", "{out}", "--capacity-bytes", "4parsecs"], "--capacity-bytes 4parsecs is invalid"),
        (["simulate", "{out}"], "give --capacity"),
        (["simulate", "{out}", "--capacity", "2", "--policies", "fifo"], "--policies fifo is invalid"),
        (["simulate", "{tmp}/none.npz", "--capacity", "2"], "TRACE {tmp}/none.npz: no such file"),
        (["simulate"], "TRACE is missing"),
        (["{run}", "--out", "{out}"], "--out {out}: exists"),
        (["{run}"], "--out TRACE.npz is required"),
        (["{run}", "--out", "{tmp}/t.json"], "must end in .npz"),
        (["{tmp}/norun", "--out", "{tmp}/n.npz"], "RUN {tmp}/norun: no such directory"),
        (["{run}", "--out", "{tmp}/n.npz", "--capacity", "2"], "--capacity belongs to moekit trace simulate"),
    ],
)
def test_trace_cli_refuses_bad_input_by_name(tmp_path, capsys, argv, message):
    from moekit.cli.main import main

    run = tiny_run(tmp_path / "run")
    out = tmp_path / "t.npz"
    record_trace(tiny_lm(), torch.arange(8), 8, source="random init", trained=False, model_name="m", text="t").save(out)
    fill = {"out": str(out), "run": str(run), "tmp": str(tmp_path)}
    assert main(["trace", *[a.format(**fill) for a in argv]]) == 2
    captured = capsys.readouterr()
    assert message.format(**fill) in captured.err and "Traceback" not in captured.err
