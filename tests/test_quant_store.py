"""Quantized experts in the expert store: ``write_store(..., experts_dtype="int8"|"int4")``,
``moekit pack --experts-dtype``, and ``load(store, memory_budget)`` running them from the cache.

Verified: each blob is byte for byte the expert's ``QuantizedExpert.to_bytes()`` (int8 and int4,
with and without expert biases) and the index says the encoding; logits of prefill and decode
steps (KV cache) of a quantized store are bit-identical to ``quantize_experts`` applied to the
in-memory model, at an unlimited, a full and the minimum budget, in float32 and bfloat16; the
minimum budget counts the quantized blobs; an int4 blob packed in another CPU's layout is
repacked into its own buffer and gives the same logits; a corrupt quantized blob is the store's
clear error naming the file, layer and expert; int4 with widths that are not multiples of 128
is refused before anything is written (the CLI names --experts-dtype); ``moekit pack
--experts-dtype int8`` and ``moekit sample STORE --memory-budget`` run end to end.

    PYTHONPATH=src pytest tests/test_quant_store.py -q
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

import moekit.inference.quant as quant
from moekit.inference import load, minimum_budget
from moekit.inference.offload import plain_lm_from_store, plan_memory
from moekit.inference.quant import QuantizedExperts, quantize_expert, quantize_experts
from moekit.inference.store import ExpertStore, StoreError, write_store
from moekit.models.lm import LMConfig, MoETransformerLM
from tests.test_offload import prefill_then_decode
from tests.test_store import flip_byte, lm_config, write_run


def quant_config(**changes) -> LMConfig:
    """Widths of 128 (int4's group): d_model and d_ff are each projection's input width."""
    return lm_config(changes, dict(d_model=128, d_ff=128, num_experts=6, top_k=2),
                     vocab_size=64, seq_len=64, n_layer=2, n_head=2, d_model=128)


def quant_model(dtype: torch.dtype = torch.float32, **changes) -> MoETransformerLM:
    torch.manual_seed(0)
    model = MoETransformerLM(quant_config(**changes)).eval()
    for name, param in model.named_parameters():
        if name.endswith(("b_in", "b_out")):  # zeros by default: give the biases values to check
            torch.nn.init.normal_(param, std=0.1)
    return model.to(dtype)


def pack(model: MoETransformerLM, out: Path, scheme: str) -> Path:
    return write_store(out, model.config, model.state_dict().items(), experts_dtype=scheme, tokenizer={"kind": "bytes"})


def assert_bitwise_equal(got: list[Tensor], want: list[Tensor], what: str) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: step {step} differs by {(a - b).abs().max()}"


# --------------------------------------------------------------------------------------------
# The blobs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("biases", [False, True])
def test_each_blob_is_the_quantized_experts_bytes(tmp_path, scheme, biases):
    model = quant_model(moe={"expert_biases": biases})
    store = ExpertStore(pack(model, tmp_path / "store", scheme))
    assert store.experts_dtype == scheme
    assert json.loads((store.path / "index.json").read_text())["experts_dtype"] == scheme
    config = model.config.moe
    for layer in (0, 1):
        experts = model.blocks[layer].ffn.experts
        for expert in range(config.num_experts):
            want = quantize_expert(
                experts.w_in[expert], experts.w_out[expert], scheme, config.activation, 128,
                experts.b_in[expert] if biases else None, experts.b_out[expert] if biases else None,
                config.swiglu_alpha, config.swiglu_limit,
            ).to_bytes()
            blob = store.blob(layer, expert)
            assert blob.length == len(want) and blob.offset % 4096 == 0
            assert bytes(store.read_blob(layer, expert)) == want + bytes(blob.padded_length - len(want))


def test_quantized_blobs_are_smaller_and_the_minimum_budget_counts_them(tmp_path):
    model = quant_model()
    same = plan_memory(ExpertStore(pack(model, tmp_path / "same", "same")), None)
    for scheme, at_most in (("int8", 0.30), ("int4", 0.17)):  # of float32 expert bytes (+ headers, 4 KiB padding)
        store = ExpertStore(pack(model, tmp_path / scheme, scheme))
        plan = plan_memory(store, None)
        slot = store.blob(0, 0).padded_length
        assert plan.slot_bytes == {0: slot, 1: slot}
        assert plan.expert_bytes == 2 * 6 * slot < at_most * same.expert_bytes
        assert plan.non_expert_bytes == same.non_expert_bytes
        assert minimum_budget(store) == plan.non_expert_bytes + 2 * 2 * slot
        # A bf16 view holds the resident weights in bf16; the quantized experts stay as stored.
        bf16 = plan_memory(store, None, torch.bfloat16)
        assert bf16.slot_bytes == plan.slot_bytes and bf16.non_expert_bytes == same.non_expert_bytes // 2


# --------------------------------------------------------------------------------------------
# Bit-exactness against quantize_experts on the in-memory model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_equal_quantize_experts_bitwise_at_full_and_small_budgets(tmp_path, scheme, dtype):
    model = quant_model(dtype)
    store = pack(model, tmp_path / "store", scheme)
    in_memory = copy.deepcopy(model)
    quantize_experts(in_memory, scheme)
    idx = torch.randint(0, 64, (1, 22), generator=torch.Generator().manual_seed(1))
    want = prefill_then_decode(in_memory, idx, prompt=14)
    plan = plan_memory(ExpertStore(store), None)
    full = plan.non_expert_bytes + plan.expert_bytes
    for budget in (None, full, plan.minimum_bytes + plan.slot_bytes[0], plan.minimum_bytes):
        offloaded = load(store, memory_budget=budget)
        assert isinstance(offloaded.expert_cache.load(0, 0)[0].expert, quant.QuantizedExpert)
        assert_bitwise_equal(prefill_then_decode(offloaded, idx, prompt=14), want, f"{scheme} budget {budget}")
        stats = offloaded.expert_cache.stats()
        if budget == plan.minimum_bytes:
            assert stats.evictions > 0  # the small budget really swapped experts
        assert stats.cached_bytes <= (budget or full) - plan.non_expert_bytes
    plain = plain_lm_from_store(store)
    assert isinstance(plain.blocks[0].ffn.experts, QuantizedExperts)
    assert_bitwise_equal(prefill_then_decode(plain, idx, prompt=14), want, f"{scheme} in memory from the store")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_decode_in_one_c_call_is_bitwise_equal_offloaded_and_in_memory(tmp_path, dtype, monkeypatch):
    """Experts wide enough for moekit.matvec's int8 kernel (d_ff 256): a decoded token's int8
    experts run in one ``experts_ffn_int8`` call in both models, with the same sums."""
    from moekit import matvec

    if not matvec.available():
        pytest.skip(f"moekit.matvec is {matvec.status()}")
    model = quant_model(dtype, moe={"d_ff": 256})
    store = pack(model, tmp_path / "store", "int8")
    in_memory = copy.deepcopy(model)
    quantize_experts(in_memory, "int8")
    calls = []
    real = matvec.experts_ffn_int8
    monkeypatch.setattr(matvec, "experts_ffn_int8", lambda *args: calls.append(1) or real(*args))
    idx = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(2))
    want = prefill_then_decode(in_memory, idx, prompt=14)
    assert len(calls) == (20 - 14) * model.config.n_layer
    offloaded = load(store, memory_budget=minimum_budget(store))
    assert_bitwise_equal(prefill_then_decode(offloaded, idx, prompt=14), want, "int8 at the minimum budget")
    assert len(calls) == 2 * (20 - 14) * model.config.n_layer


def test_bf16_view_of_a_float32_quantized_store_equals_quantize_experts_in_bf16(tmp_path):
    model = quant_model()
    store = pack(model, tmp_path / "store", "int8")
    in_memory = copy.deepcopy(model).to(torch.bfloat16)
    quantize_experts(in_memory, "int8")  # bf16 weights quantize to the same numbers (scales are bf16)
    idx = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    offloaded = load(store, memory_budget=minimum_budget(store, torch.bfloat16), dtype=torch.bfloat16)
    got, want = prefill_then_decode(offloaded, idx, 8), prefill_then_decode(in_memory, idx, 8)
    assert got[0].dtype == torch.bfloat16
    # Not bitwise: a float32 weight and its bf16 rounding may quantize one step apart.
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)


@pytest.mark.skipif(quant.int4_layout() in (None, "pairs"), reason="needs an int4 kernel whose layout is not 'pairs'")
def test_an_int4_store_packed_for_another_cpu_is_repacked_into_its_buffer(tmp_path, monkeypatch):
    model = quant_model()
    with monkeypatch.context() as patched:
        patched.setattr(quant, "int4_layout", lambda: None)  # pack as a CPU without the kernel: "pairs"
        store_dir = pack(model, tmp_path / "store", "int4")
    store = ExpertStore(store_dir)
    expert, nbytes = store.expert(0, 1)
    assert expert.w_in.layout == quant.int4_layout() and nbytes == store.blob(0, 1).padded_length
    # The repacked bytes live in the blob's buffer, at the offset the index gives (as w_in.scales does).
    offsets = {t.name: t.offset for t in store.blob(0, 1).tensors}
    buffer_start = expert.w_in.scales.data_ptr() - offsets["w_in.scales"]
    assert expert.w_in.qweight.data_ptr() == buffer_start + offsets["w_in.qweight"]
    assert expert.w_out.qweight.data_ptr() == buffer_start + offsets["w_out.qweight"]
    in_memory = copy.deepcopy(model)
    quantize_experts(in_memory, "int4")
    idx = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(3))
    assert_bitwise_equal(prefill_then_decode(load(store, memory_budget=minimum_budget(store)), idx, 6),
                         prefill_then_decode(in_memory, idx, 6), "repacked int4")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["header", "weights"])
def test_a_corrupt_quantized_blob_is_the_stores_clear_error(tmp_path, where):
    store_dir = pack(quant_model(), tmp_path / "store", "int8")
    blob = ExpertStore(store_dir).blob(1, 3)
    flip_byte(store_dir / blob.file, blob.offset + (20 if where == "header" else blob.length - 100))
    model = load(store_dir, memory_budget=minimum_budget(store_dir))
    with pytest.raises(StoreError, match=r"experts-001\.bin: CRC-32 mismatch in the blob of layer 1 expert 3"):
        for start in range(0, 64, 8):  # enough tokens to route to every expert of layer 1
            with torch.no_grad():
                model(torch.arange(start, start + 8)[None])
            model.expert_cache.clear()


def test_a_blob_with_another_scheme_than_the_index_is_refused(tmp_path):
    store_dir = pack(quant_model(), tmp_path / "store", "int8")
    index = json.loads((store_dir / "index.json").read_text())
    index["experts_dtype"] = "int4"
    (store_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match="expert 0 in experts-000.bin holds a int8 expert but the index says int4"):
        ExpertStore(store_dir).expert(0, 0)


def test_int4_needs_widths_that_are_multiples_of_128_and_writes_nothing(tmp_path):
    model = quant_model(d_model=64, moe={"d_model": 64, "d_ff": 128})
    with pytest.raises(StoreError, match=r"blocks.0.ffn.experts.w_in has input width 64.*multiple of 128; use int8"):
        pack(model, tmp_path / "store", "int4")
    assert not any(tmp_path.iterdir())
    pack(model, tmp_path / "int8", "int8")  # int8 has no such constraint


# --------------------------------------------------------------------------------------------
# The CLI: moekit pack --experts-dtype, moekit sample STORE --memory-budget
# --------------------------------------------------------------------------------------------


def test_pack_int8_and_sample_with_a_budget_end_to_end(tmp_path, capsys):
    from moekit.cli.main import main
    from moekit.training.data import tokenizer_from_dict

    model = quant_model(vocab_size=256)
    run = write_run(tmp_path / "run", model)
    assert main(["pack", str(run), "--out", str(tmp_path / "store"), "--experts-dtype", "int8", "--json"]) == 0
    packed = json.loads(capsys.readouterr().out)
    store = ExpertStore(tmp_path / "store")
    assert packed["experts_dtype"] == "int8" == store.experts_dtype
    assert packed["minimum_budget_bytes"] == minimum_budget(store)
    args = ["sample", str(tmp_path / "store"), "--prompt", "Hi", "--tokens", "5", "--greedy", "--json"]
    assert main([*args, "--memory-budget", str(minimum_budget(store))]) == 0
    small = json.loads(capsys.readouterr().out)
    assert small["memory"]["minimum_bytes"] == minimum_budget(store)
    assert small["expert_cache"]["generate"]["misses"] > 0
    # The text is the in-memory quantized model's greedy continuation.
    in_memory = copy.deepcopy(model)
    quantize_experts(in_memory, "int8")
    prompt = torch.tensor([list(b"Hi")])
    want = in_memory.generate(prompt, 5, temperature=0.0)
    assert small["samples"] == [tokenizer_from_dict({"kind": "bytes"}).decode(want[0].tolist())]
    assert main([*args, "--memory-budget", str(minimum_budget(store) - 4096)]) == 2
    assert "--memory-budget" in capsys.readouterr().err


def test_pack_int4_of_a_model_too_narrow_names_the_flag(tmp_path, capsys):
    from moekit.cli.main import main

    run = write_run(tmp_path / "run", quant_model(vocab_size=256, d_model=64, moe={"d_model": 64}))
    assert main(["pack", str(run), "--out", str(tmp_path / "store"), "--experts-dtype", "int4"]) == 2
    captured = capsys.readouterr()
    assert "--experts-dtype int4" in captured.err and "multiple of 128" in captured.err
    assert "Traceback" not in captured.err and not (tmp_path / "store").exists()
