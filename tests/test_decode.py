"""Batch-1 decoding of moekit's LM: the preallocated KV cache against the ``torch.cat`` cache it
replaced, last-position logits, rotary positions past ``seq_len``, the grouped-query decode
attention, and the MoE layer's one-token routing against the router's general path.

    pytest tests/test_decode.py
"""

from __future__ import annotations

import copy

import pytest
import torch

from moekit import MoEConfig
from moekit.models.lm import KVCache, LMConfig, MoETransformerLM, RotaryTables, rotary_tables


def tiny_lm(**overrides) -> MoETransformerLM:
    moe = MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2)
    values = dict(seq_len=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32, moe=moe, tie_embeddings=False)
    values.update(overrides)
    torch.manual_seed(0)
    return MoETransformerLM(LMConfig(**values)).eval()


class ConcatKVCache(KVCache):
    """The cache before preallocation: ``torch.cat`` of the whole history per forward (the reference)."""

    def __init__(self, n_layer: int) -> None:
        super().__init__(n_layer)
        self.cat_keys: list[torch.Tensor | None] = [None] * n_layer
        self.cat_values: list[torch.Tensor | None] = [None] * n_layer

    def append(self, layer_idx, k_BHSK, v_BHSK):
        old_k, old_v = self.cat_keys[layer_idx], self.cat_values[layer_idx]
        if old_k is not None and old_v is not None:
            k_BHSK = torch.cat([old_k, k_BHSK], dim=2)
            v_BHSK = torch.cat([old_v, v_BHSK], dim=2)
        self.cat_keys[layer_idx], self.cat_values[layer_idx] = k_BHSK, v_BHSK
        self._lengths[layer_idx] = k_BHSK.shape[2]
        return k_BHSK, v_BHSK


def _step_logits(model, idx_BS, cache, chunks):
    """Logits of prompt chunk(s) then one token at a time through ``cache``."""
    out, start = [], 0
    for end in chunks:
        out.append(model(idx_BS[:, start:end], cache=cache)[0])
        start = end
    for t in range(start, idx_BS.shape[1]):
        out.append(model(idx_BS[:, t : t + 1], cache=cache)[0])
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preallocated_cache_gives_the_concat_caches_logits_exactly(dtype):
    model = tiny_lm().to(dtype)
    idx = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        concat = ConcatKVCache(2)
        reference = _step_logits(model, idx, concat, chunks=[6, 9])
        # capacity 4 < the first chunk: the buffer is allocated at 6 and doubles twice (12, 24)
        cache = KVCache(2, capacity=4)
        preallocated = _step_logits(model, idx, cache, chunks=[6, 9])
    assert torch.equal(preallocated, reference)
    assert cache.length == 20 and cache._keys[0].shape[2] == 24
    assert torch.equal(cache.keys[1], concat.cat_keys[1]) and torch.equal(cache.values[0], concat.cat_values[0])


def test_cached_decoding_past_seq_len_equals_the_full_forward():
    model = tiny_lm()  # seq_len 32: rotary rows past 32 are computed on demand
    idx = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(idx)
        cached = _step_logits(model, idx, KVCache(2), chunks=[10])
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_rotary_tables_grow_to_any_position_and_equal_a_fresh_table():
    tables = RotaryTables(head_dim=8, theta=10000.0)
    cos_SK, sin_SK = tables(0, 3, torch.device("cpu"))
    assert cos_SK.shape == (3, 4)
    cos_SK, sin_SK = tables(600, 1000, torch.device("cpu"))  # grows past its first 256 rows
    want_cos, want_sin = rotary_tables(1000, 8, 10000.0)
    assert torch.equal(cos_SK, want_cos[600:]) and torch.equal(sin_SK, want_sin[600:])


def test_logits_to_keep_gives_the_last_positions_logits():
    model = tiny_lm()
    idx = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(idx)
        last, _ = model(idx, logits_to_keep=1)
        last3, _ = model(idx, logits_to_keep=3)
    assert last.shape == (2, 1, 256) and last3.shape == (2, 3, 256)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(last3, full[:, -3:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep applies without targets"):
        model(idx, idx, logits_to_keep=1)
    with pytest.raises(ValueError, match=r"logits_to_keep=-1 is invalid"):
        model(idx, logits_to_keep=-1)


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_grouped_query_decode_attention_equals_repeated_kv_heads(n_kv_head):
    # The decode step attends the n_rep query heads of a kv head as n_rep queries of it; the
    # prefill path repeats the kv heads (transformers' repeat_kv). Both give the same logits.
    model = tiny_lm(n_kv_head=n_kv_head)
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _ = model(idx)
        cached = _step_logits(model, idx, KVCache(2), chunks=[5])
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_kv_cache_refuses_a_bad_capacity():
    with pytest.raises(ValueError, match=r"capacity=0 is invalid"):
        KVCache(2, capacity=0)


# ---------------------------------------------------------------------------------------
# bf16: a patched model routes exactly as the original (the gate's rounding included)
# ---------------------------------------------------------------------------------------

# transformers runs these families' gate matmul in the activation dtype, the others in float32
GATE_IN_ACTIVATION_DTYPE = {"mixtral": True, "qwen2_moe": True, "qwen3_moe": True, "olmoe": True, "gpt_oss": True,
                            "qwen3_next": True, "deepseek_v3": False, "deepseek_v2": False, "glm4_moe": False}

# These families' transformers blocks round the combine weights to bf16 before combining
# (Qwen, OLMoE: ``router_top_value.to(router_logits.dtype)``; GPT-OSS also its biases and clamped
# SwiGLU), where moekit combines with float32 weights: their gates match, their logits do not
# bit for bit.
BF16_EXPERTS_ROUND_DIFFERENTLY = {"gpt_oss", "olmoe", "qwen2_moe", "qwen3_moe", "qwen3_next"}


@pytest.mark.parametrize("family", sorted(GATE_IN_ACTIVATION_DTYPE))
def test_patched_bf16_model_gives_the_original_logits_exactly(family):
    from moekit.interop.patch import patch_moe
    from tests.test_patch_moe import build

    original = build(family).to(torch.bfloat16)
    model = copy.deepcopy(original)
    patched = patch_moe(model)
    assert all(
        model.get_submodule(p.path).router.gate_in_activation_dtype == GATE_IN_ACTIVATION_DTYPE[family]
        for p in patched
    )
    ids = torch.randint(2, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = original(ids).logits, model(ids).logits
        for p in patched:  # the router in float32, as moekit's own layers run it, rounds differently
            model.get_submodule(p.path).router.gate_in_activation_dtype = False
        float32_gate = model(ids).logits
    if family in BF16_EXPERTS_ROUND_DIFFERENTLY:
        return
    assert torch.equal(got, want)
    if GATE_IN_ACTIVATION_DTYPE[family]:
        assert not torch.equal(float32_gate, want)


def test_router_gate_in_activation_dtype_rounds_the_logits_to_that_dtype():
    from moekit.routing import build_router

    router = build_router(MoEConfig(d_model=64, d_ff=32, num_experts=8, top_k=2)).to(torch.bfloat16)
    x_TD = torch.randn(5, 64).to(torch.bfloat16)
    assert torch.equal(router.compute_logits(x_TD), torch.nn.functional.linear(x_TD.float(), router.weight.float()))
    router.gate_in_activation_dtype = True
    logits_TE = router.compute_logits(x_TD)
    assert logits_TE.dtype == torch.float32
    assert torch.equal(logits_TE, torch.nn.functional.linear(x_TD, router.weight).float())


def test_moekit_lm_from_bf16_mixtral_differs_from_transformers_only_by_the_gates_rounding():
    # moekit's LM routes with the gate in float32; with it in bf16, as transformers' Mixtral
    # router runs it, the prompt's logits are transformers' bit for bit (docs/bench_generate.md).
    from moekit.interop.hf import from_hf_model
    from moekit.routing import Router
    from tests.test_patch_moe import build

    original = build("mixtral")
    rotary = original.model.rotary_emb
    inv_freq = rotary.inv_freq.clone()
    original.to(torch.bfloat16)
    rotary.inv_freq = inv_freq  # float32, as from_pretrained(dtype=bfloat16) keeps it
    lm = from_hf_model(original).eval()
    ids = torch.randint(2, 97, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = original(ids).logits
        float32_gate, _ = lm(ids)
        for router in (m for m in lm.modules() if isinstance(m, Router)):
            router.gate_in_activation_dtype = True
        bf16_gate, _ = lm(ids)
    assert lm.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(bf16_gate, want) and not torch.equal(float32_gate, want)


@pytest.mark.parametrize("n_kv_head", [2, 8])
def test_the_one_call_attention_half_equals_the_torch_ops(n_kv_head, monkeypatch):
    """With weights large enough for moekit.matvec each decoded token's attention half runs in
    one C call (``matvec.attention_block``); its logits equal the PyTorch ops' (float32, up to
    summation order) over steps that grow the KV cache past its first allocation, and its cache
    holds the same keys and values."""
    from moekit import matvec
    from moekit.models import lm as lm_module

    if not matvec.available():
        pytest.skip(f"moekit.matvec is {matvec.status()}")
    model = tiny_lm(d_model=256, n_head=8, n_kv_head=n_kv_head, seq_len=64,
                    moe=MoEConfig(d_model=256, d_ff=128, num_experts=4, top_k=2))
    idx = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    calls = []
    real = matvec.attention_block
    monkeypatch.setattr(matvec, "attention_block", lambda *args: calls.append(1) or real(*args))
    # block by block (the whole-step call, tested below, runs the same C function for every block)
    monkeypatch.setattr(lm_module.MoETransformerLM, "_decode_blocks_in_one_call", lambda *args: None)

    def decode() -> tuple[torch.Tensor, KVCache]:
        cache = KVCache(model.config.n_layer, capacity=6)  # grows twice below
        with torch.no_grad():
            model(idx[:, :4], cache=cache)
            steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(4, 24)]
        return torch.cat(steps, dim=1), cache

    got, got_cache = decode()
    assert len(calls) == 20 * model.config.n_layer
    with monkeypatch.context() as torch_ops:
        torch_ops.setattr(lm_module.Block, "_decode_attention", lambda *args: None)
        want, want_cache = decode()
    assert len(calls) == 20 * model.config.n_layer
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got_k, want_k in zip(got_cache.keys + got_cache.values, want_cache.keys + want_cache.values, strict=True):
        torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
    # With autograd on (parameters that need gradients, no no_grad) the PyTorch ops run.
    calls.clear()
    cache = KVCache(model.config.n_layer)
    model(idx[:, :4], cache=cache)
    model(idx[:, 4:5], cache=cache)
    assert calls == []


def _big_enough_lm(**moe_overrides) -> MoETransformerLM:
    """Weights large enough for moekit.matvec's kernels (d_model 256: the one-call paths)."""
    moe = MoEConfig(**{"d_model": 256, "d_ff": 128, "num_experts": 4, "top_k": 2, **moe_overrides})
    return tiny_lm(d_model=256, n_head=8, n_kv_head=2, seq_len=64, n_layer=3, moe=moe)


@pytest.mark.parametrize("layout", ["cols", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decoded_token_through_every_block_in_one_call_equals_block_by_block(dtype, layout, monkeypatch):
    """``matvec.lm_decode`` runs each block's attention call, MoE call and residual add in one
    C call: the same logits, KV cache and routing statistics bit for bit as calling the blocks
    one by one (which run the same C functions per block)."""
    from moekit import matvec
    from moekit.experts import set_expert_layout
    from moekit.models import lm as lm_module

    if not matvec.available():
        pytest.skip(f"moekit.matvec is {matvec.status()}")
    model = _big_enough_lm().to(dtype)
    set_expert_layout(model, layout)
    idx = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(4))
    calls = []
    real = matvec.lm_decode
    monkeypatch.setattr(matvec, "lm_decode", lambda *args: calls.append(1) or real(*args))

    def decode():
        cache = KVCache(model.config.n_layer, capacity=5)  # grows while decoding
        stats = []
        with torch.no_grad():
            model(idx[:, :4], cache=cache)
            steps = []
            for t in range(4, 16):
                steps.append(model(idx[:, t : t + 1], cache=cache)[0])
                stats.append([(b.ffn.last_stats.tokens_per_expert_E, b.ffn.last_stats.scores_TE) for b in model.blocks])
        return torch.cat(steps, dim=1), cache, stats

    got, got_cache, got_stats = decode()
    assert len(calls) == 12  # one per decoded token
    with monkeypatch.context() as per_block:
        per_block.setattr(lm_module.MoETransformerLM, "_decode_blocks_in_one_call", lambda *args: None)
        want, want_cache, want_stats = decode()
    assert len(calls) == 12
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_cache.keys + got_cache.values,
                                                   want_cache.keys + want_cache.values, strict=True))
    for step_got, step_want in zip(got_stats, want_stats, strict=True):
        for a, b in zip(step_got, step_want, strict=True):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_one_call_step_leaves_the_blocks_to_themselves_where_it_would_skip_something(monkeypatch):
    """A forward hook on a block or its MoE layer, shared experts, or a layer routed otherwise:
    the blocks run one by one (and the hook runs); a NaN input raises the router's error."""
    from moekit import matvec
    from moekit.routing import NonFiniteRouterLogitsError

    if not matvec.available():
        pytest.skip(f"moekit.matvec is {matvec.status()}")
    calls = []
    real = matvec.lm_decode
    monkeypatch.setattr(matvec, "lm_decode", lambda *args: calls.append(1) or real(*args))
    idx = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(5))

    def decode(model):
        cache = KVCache(model.config.n_layer)
        with torch.no_grad():
            model(idx[:, :5], cache=cache)
            model(idx[:, 5:], cache=cache)

    model = _big_enough_lm()
    decode(model)
    assert calls == [1]
    seen = []
    handle = model.blocks[1].ffn.register_forward_hook(lambda *args: seen.append(1))
    decode(model)
    assert calls == [1] and len(seen) == 2  # the prompt's forward and the decoded token's, block by block
    handle.remove()
    decode(_big_enough_lm(num_shared_experts=1))
    decode(_big_enough_lm(router="aux_free"))
    assert calls == [1]
    model = _big_enough_lm()
    with torch.no_grad(), pytest.raises(NonFiniteRouterLogitsError, match="block 0"):
        cache = KVCache(model.config.n_layer)
        model(idx[:, :5], cache=cache)
        model.blocks[0].ffn.router.weight[0, 0] = float("nan")
        model(idx[:, 5:], cache=cache)
