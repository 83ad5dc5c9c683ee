"""Quantized experts (moekit.inference.quant), checked against naive references.

- The quantizers against a per-element formula written out here (int8: symmetric per output
  channel; int4: asymmetric, groups of 128, tinygemm's (q - 8) · scale + zero).
- The int4 packers against a literal transcription of PyTorch's C++ packing loop, and this
  build's ``_convert_weight_to_int4pack_for_cpu`` against the layout ``int4_layout()`` names.
- Both compute paths (PyTorch's kernels and dequantize-and-matmul) against ``x @ w_dq.T`` with
  the naive dequantized weight, in float32 and bfloat16, for 1 and several rows.
- ``to_bytes``/``from_bytes`` round trips bit for bit; bad blobs are refused by name.
- ``quantize_experts`` on MoE layers and LMs: prefill and batch-1 decoding equal a per-token
  loop over the quantized experts, generation runs, and int8 stays close to the float model.

    pytest tests/test_quant.py
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.inference import quant
from moekit.inference.quant import (
    QuantizedExpert,
    QuantizedExperts,
    int4_layout,
    pack_int4,
    quantization_quality,
    quantize_expert,
    quantize_experts,
    quantize_linear,
    unpack_int4,
)
from moekit.models.lm import LMConfig, MoETransformerLM

KERNEL_LAYOUT = int4_layout()


def naive_int8(w_NK: torch.Tensor) -> torch.Tensor:
    """Per row: scale = max|w| / 127 (rounded up to bf16), w_dq = round(w / scale) · scale."""
    out = torch.empty_like(w_NK)
    for n in range(w_NK.shape[0]):
        scale = max(float(w_NK[n].abs().max()) / 127, torch.finfo(torch.float32).tiny)
        scale_bf16 = torch.tensor(scale).bfloat16().float().item()
        if scale_bf16 < scale:
            up = torch.nextafter(torch.tensor(scale_bf16).bfloat16(), torch.tensor(1.0).bfloat16())
            scale_bf16 = up.float().item()
        out[n] = torch.round(w_NK[n] / scale_bf16).clamp(-127, 127) * scale_bf16
    return out


def naive_int4(w_NK: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group): scale = (max - min) / 15, zero = min + 8 · scale (both bf16);
    q = round((w - zero) / scale + 8) in [0, 15]; w_dq = (q - 8) · scale + zero."""
    q_NK = torch.empty(w_NK.shape, dtype=torch.int64)
    out = torch.empty_like(w_NK)
    for n in range(w_NK.shape[0]):
        for g in range(w_NK.shape[1] // group):
            part = w_NK[n, g * group : (g + 1) * group]
            scale = quant._round_up_bf16(((part.max() - part.min()) / 15).reshape(1))[0]
            zero = (part.min() + 8 * scale).bfloat16().float()
            q = torch.round((part - zero) / scale + 8).clamp(0, 15)
            q_NK[n, g * group : (g + 1) * group] = q.long()
            out[n, g * group : (g + 1) * group] = (q - 8) * scale + zero
    return q_NK, out


def cpp_pack(q_NK: torch.Tensor, layout: str) -> torch.Tensor:
    """weight_to_int4pack_kernel (aten/src/ATen/native/cpu/int4mm_kernel.cpp), loop for loop."""
    n_rows, k_cols = q_NK.shape
    block_n = 64 if layout == "avx512" else 32
    q = q_NK.tolist()
    dst = [0] * (n_rows * k_cols // 2)
    for i in range((n_rows + block_n - 1) // block_n):
        nb = min(block_n, n_rows - i * block_n)
        src = q[i * block_n : i * block_n + nb]
        base = i * k_cols * block_n // 2
        for k in range(k_cols):
            if layout == "avx512" and nb == block_n:
                for d in range(16):
                    dst[base + k * 32 + d] = (src[d + 32][k] << 4) | src[d][k]
                    dst[base + k * 32 + 16 + d] = (src[d + 48][k] << 4) | src[d + 16][k]
            elif layout == "avx2" and nb == block_n:
                for d in range(16):
                    dst[base + k * 16 + d] = (src[d + 16][k] << 4) | src[d][k]
            else:
                for n in range(0, nb, 2):
                    dst[base + k * nb // 2 + n // 2] = (src[n + 1][k] << 4) | src[n][k]
    return torch.tensor(dst, dtype=torch.uint8).reshape(n_rows, k_cols // 2)


# --------------------------------------------------------------------------------------------
# Quantizers, packers and the two compute paths
# --------------------------------------------------------------------------------------------


def test_int8_dequantized_weight_matches_the_naive_per_channel_formula():
    w_NK = torch.randn(24, 48, generator=torch.Generator().manual_seed(0))
    w_NK[3] = 0.0  # an all-zero row gets a tiny scale, not a division by zero
    linear = quantize_linear(w_NK, "int8")
    assert linear.qweight.dtype == torch.int8 and linear.scales.dtype == torch.bfloat16
    assert linear.qweight.abs().max() <= 127
    torch.testing.assert_close(linear.dequantize(), naive_int8(w_NK), rtol=0, atol=0)
    # the error of each weight is at most half a step of its row
    step_N = linear.scales.float()
    assert ((linear.dequantize() - w_NK).abs() <= step_N[:, None] / 2 + 1e-7).all()


def test_int4_dequantized_weight_matches_the_naive_group_formula():
    w_NK = torch.randn(32, 256, generator=torch.Generator().manual_seed(1)) + 0.5  # skewed groups
    linear = quantize_linear(w_NK, "int4", group_size=128)
    q_NK, want_NK = naive_int4(w_NK)
    assert linear.scales.shape == (2, 32, 2)
    assert torch.equal(unpack_int4(linear.qweight, linear.layout).long(), q_NK)
    torch.testing.assert_close(linear.dequantize(), want_NK, rtol=0, atol=0)
    # asymmetric: every group's min..max is covered, to half a step
    step_GN = linear.scales[..., 0].float()
    assert ((linear.dequantize() - w_NK).abs().reshape(32, 2, 128) <= step_GN.t()[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("layout", ["avx512", "avx2", "pairs"])
@pytest.mark.parametrize("rows", [16, 48, 64, 112])
def test_int4_packers_match_pytorchs_packing_loop_and_invert(layout, rows):
    if layout == "avx2" and rows % 32 not in (0, 16):
        pytest.skip("AVX2 blocks are 32 rows")
    q_NK = torch.randint(0, 16, (rows, 8), generator=torch.Generator().manual_seed(rows))
    packed = pack_int4(q_NK, layout)
    assert torch.equal(packed, cpp_pack(q_NK, layout))
    assert torch.equal(unpack_int4(packed, layout).long(), q_NK)


@pytest.mark.skipif(KERNEL_LAYOUT is None, reason="no usable int4 CPU kernel in this torch build")
def test_this_builds_int4_packing_is_the_layout_int4_layout_names():
    q_NK = torch.randint(0, 16, (80, 256), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q_NK, 1).view(torch.uint8).reshape(80, 128)
    assert torch.equal(packed, pack_int4(q_NK, KERNEL_LAYOUT))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_kernel_and_fallback_match_the_naive_dequantized_matmul(scheme, dtype, rows):
    generator = torch.Generator().manual_seed(3)
    w_NK = torch.randn(48, 256, generator=generator)
    x_MK = torch.randn(rows, 256, generator=generator).to(dtype)
    linear = quantize_linear(w_NK, scheme)
    w_dq_NK = naive_int8(w_NK) if scheme == "int8" else naive_int4(w_NK)[1]
    want_MN = x_MK.float() @ w_dq_NK.t()
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.2)
    fallback_MN = linear.matmul(x_MK, impl="dequant")
    auto_MN = linear.matmul(x_MK)
    assert fallback_MN.dtype == auto_MN.dtype == dtype and auto_MN.shape == (rows, 48)
    torch.testing.assert_close(fallback_MN.float(), want_MN, **tolerance)
    torch.testing.assert_close(auto_MN.float(), want_MN, **tolerance)
    if scheme == "int8":
        assert linear.kernel_applies() == (torch._weight_int8pack_mm is not None)
    else:
        assert linear.kernel_applies() == (KERNEL_LAYOUT is not None)


def test_kernel_path_calls_pytorchs_kernels(monkeypatch):
    calls = []
    for name in ("_int8_mm", "_int4_mm"):
        original = getattr(quant, name)
        if original is None:
            pytest.skip(f"{name} missing in this torch build")
        monkeypatch.setattr(quant, name, lambda *args, _o=original, _n=name: calls.append(_n) or _o(*args))
    if KERNEL_LAYOUT is None:
        pytest.skip("no usable int4 kernel")
    x_MK = torch.randn(2, 128).bfloat16()
    quantize_linear(torch.randn(32, 128), "int8").matmul(x_MK)
    quantize_linear(torch.randn(32, 128), "int4").matmul(x_MK)
    quantize_linear(torch.randn(32, 128), "int8").matmul(x_MK, impl="dequant")
    assert calls == ["_int8_mm", "_int4_mm"]


def test_shapes_the_kernels_cannot_take_run_the_fallback():
    # int8: K not a multiple of 16 (the kernel would read past the row); int4: N not of 16
    torch.manual_seed(0)
    w8_NK, w4_NK = torch.randn(7, 40), torch.randn(24, 128)
    linear8, linear4 = quantize_linear(w8_NK, "int8"), quantize_linear(w4_NK, "int4")
    assert not linear8.kernel_applies() and not linear4.kernel_applies()
    x8, x4 = torch.randn(3, 40), torch.randn(3, 128)
    torch.testing.assert_close(linear8.matmul(x8), x8 @ naive_int8(w8_NK).t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(linear4.matmul(x4), x4 @ naive_int4(w4_NK)[1].t(), rtol=1e-4, atol=1e-4)


def test_bad_quantization_input_is_refused_by_name():
    with pytest.raises(ValueError, match="scheme='int2' is invalid: use int8 or int4"):
        quantize_linear(torch.randn(4, 128), "int2")
    with pytest.raises(ValueError, match="multiple of group_size=128, got 96"):
        quantize_linear(torch.randn(16, 96), "int4")
    with pytest.raises(ValueError, match="group_size=100 is invalid"):
        quantize_linear(torch.randn(16, 200), "int4", group_size=100)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_linear(torch.full((16, 128), float("nan")), "int8")
    with pytest.raises(ValueError, match="impl='fast' is invalid"):
        quantize_linear(torch.randn(16, 128), "int8").matmul(torch.randn(1, 128), impl="fast")


# --------------------------------------------------------------------------------------------
# Blobs
# --------------------------------------------------------------------------------------------


def make_expert(scheme: str, biases: bool = False, activation: str = "swiglu") -> QuantizedExpert:
    generator = torch.Generator().manual_seed(4)
    w_in_DH, w_out_FD = torch.randn(128, 256, generator=generator), torch.randn(128, 128, generator=generator)
    b_in, b_out = (None, None)
    if biases:
        b_in, b_out = torch.randn(256, generator=generator), torch.randn(128, generator=generator)
    return quantize_expert(w_in_DH, w_out_FD, scheme, activation, 128, b_in, b_out)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("biases", [False, True])
def test_to_bytes_from_bytes_round_trips_bit_for_bit(scheme, biases):
    expert = make_expert(scheme, biases, "clamped_swiglu" if biases else "swiglu")
    blob = expert.to_bytes()
    x_MD = torch.randn(3, 128)
    for buffer in (blob, bytearray(blob), memoryview(bytearray(blob))):
        again = QuantizedExpert.from_bytes(buffer)
        assert again.to_bytes() == blob
        assert again.activation == expert.activation and again.scheme == scheme
        for name, tensor in expert._tensors().items():
            assert torch.equal(again._tensors()[name], tensor), name
        assert torch.equal(again(x_MD), expert(x_MD))
    writable = bytearray(blob)
    view = QuantizedExpert.from_bytes(writable)
    start = view.w_in.qweight.data_ptr() - (ctypes_address(writable))
    assert 0 < start < len(writable)  # a view into the buffer, not a copy


def ctypes_address(buffer: bytearray) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def test_an_int4_blob_packed_for_another_cpu_is_repacked_on_load():
    expert = make_expert("int4")
    other = "pairs" if KERNEL_LAYOUT != "pairs" else "avx512"
    for linear in (expert.w_in, expert.w_out):
        linear.qweight = pack_int4(unpack_int4(linear.qweight, linear.layout), other)
        linear.layout = other
    loaded = QuantizedExpert.from_bytes(expert.to_bytes())
    assert loaded.w_in.layout == (KERNEL_LAYOUT or other)
    torch.testing.assert_close(loaded.w_in.dequantize(), expert.w_in.dequantize(), rtol=0, atol=0)
    x_MD = torch.randn(2, 128, generator=torch.Generator().manual_seed(6))
    # the kernel and the dequantized matmul sum in different orders: outputs are ~10 here
    torch.testing.assert_close(loaded(x_MD), expert(x_MD, impl="dequant"), rtol=1e-3, atol=1e-3)


def test_bad_blobs_are_refused_with_the_reason():
    blob = make_expert("int8").to_bytes()
    with pytest.raises(ValueError, match="bad magic"):
        QuantizedExpert.from_bytes(b"XXXX" + blob[4:])
    with pytest.raises(ValueError, match="truncated"):
        QuantizedExpert.from_bytes(blob[: len(blob) - 100])
    with pytest.raises(ValueError, match="version 9 is not supported"):
        QuantizedExpert.from_bytes(blob[:4] + (9).to_bytes(4, "little") + blob[8:])


def test_quantized_experts_take_about_a_half_and_a_quarter_of_bf16_bytes():
    bf16_bytes = (128 * 256 + 128 * 128) * 2
    assert 0.5 <= make_expert("int8").nbytes / bf16_bytes < 0.51
    assert 0.25 <= make_expert("int4").nbytes / bf16_bytes < 0.27  # + bf16 scale and zero per 128


# --------------------------------------------------------------------------------------------
# Whole layers and models
# --------------------------------------------------------------------------------------------


def per_token_reference(layer: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """y[t] = Σ_k weight · quantized_expert_e(x[t]), one token and one expert at a time."""
    routing = layer.route(x_TD, None)
    a = routing.assignments
    y_TD = torch.zeros(x_TD.shape, dtype=torch.float32)
    for token, expert, weight in zip(a.token_idx_N.tolist(), a.expert_idx_N.tolist(), a.weight_N.tolist(), strict=True):
        y_TD[token] += weight * layer.experts.experts[expert](x_TD[token : token + 1])[0].float()
    return y_TD.to(x_TD.dtype)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 9])
def test_quantized_layer_matches_a_per_token_loop_in_decode_and_prefill(scheme, tokens):
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=128, d_ff=128, num_experts=4, top_k=2)).eval()
    x_TD = torch.randn(tokens, 128)
    with torch.no_grad():
        float_TD = layer(x_TD)
        assert quantize_experts(layer, scheme) == [""]
        assert isinstance(layer.experts, QuantizedExperts)
        got_TD = layer(x_TD)
        torch.testing.assert_close(got_TD, per_token_reference(layer, x_TD), rtol=1e-5, atol=1e-5)
    # and it is still the same layer, up to the quantization error
    relative = (got_TD - float_TD).norm() / float_TD.norm()
    assert relative < (0.02 if scheme == "int8" else 0.2)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_one_token_fast_path_equals_the_generic_path_bitwise(scheme, dtype, monkeypatch):
    """A decoded token skips the dispatcher's sort and grouping (``forward_per_assignment``).
    Its router runs in C (``matvec.route_experts_ffn``: the experts are large enough for
    moekit.matvec, 256 x 256), summing the logits in another order: the same experts, weights
    equal to rounding. int4: the same expert calls and float32 index_add; int8: one C call
    with the same products and roundings, its own nonlinearity and sum."""
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=256, d_ff=128, num_experts=4, top_k=2)).eval().to(dtype)
    quantize_experts(layer, scheme)
    calls = []
    real = QuantizedExperts.forward_per_assignment
    monkeypatch.setattr(QuantizedExperts, "forward_per_assignment",
                        lambda self, *args: calls.append(1) or real(self, *args))
    with torch.no_grad():
        for seed in range(4):
            x_1D = torch.randn(1, 256, generator=torch.Generator().manual_seed(seed)).to(dtype)
            fast = layer(x_1D)
            chosen = layer.last_stats.tokens_per_expert_E
            layer.decode_fast_path_tokens = 0  # the generic path: dispatch, experts, combine
            generic = layer(x_1D)
            layer.decode_fast_path_tokens = 1
            assert fast.dtype == dtype and torch.equal(chosen, layer.last_stats.tokens_per_expert_E)
            tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(fast, generic, **tolerance)
    assert len(calls) == 4


def test_quantized_gpt_oss_style_experts_match_their_dequantized_weights():
    torch.manual_seed(0)
    config = MoEConfig(d_model=128, d_ff=64, num_experts=4, top_k=2, activation="clamped_swiglu",
                       expert_biases=True, swiglu_limit=0.5)
    layer = MoE(config).eval()
    with torch.no_grad():
        layer.experts.b_in.normal_()
        layer.experts.b_out.normal_()
    quantize_experts(layer, "int8")
    x_TD = torch.randn(5, 128)
    with torch.no_grad():
        want_TD = torch.zeros(5, 128)
        a = layer.route(x_TD, None).assignments
        rows = zip(a.token_idx_N.tolist(), a.expert_idx_N.tolist(), a.weight_N.tolist(), strict=True)
        for token, expert_idx, weight in rows:
            expert = layer.experts.experts[expert_idx]
            h = x_TD[token] @ expert.w_in.dequantize().t() + expert.b_in
            gate, up = h.chunk(2)
            gate, up = gate.clamp(max=0.5), up.clamp(-0.5, 0.5)
            act = (up + 1) * gate * torch.sigmoid(1.702 * gate)
            want_TD[token] += weight * (act @ expert.w_out.dequantize().t() + expert.b_out)
        torch.testing.assert_close(layer(x_TD), want_TD, rtol=1e-4, atol=1e-4)


def tiny_lm(d_model: int = 128) -> MoETransformerLM:
    torch.manual_seed(0)
    config = LMConfig(vocab_size=64, seq_len=32, n_layer=2, n_head=2, d_model=d_model,
                      moe=MoEConfig(d_model=d_model, d_ff=128, num_experts=4, top_k=2))
    return MoETransformerLM(config).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_lm_generates_with_the_kv_cache_as_without(dtype):
    model = tiny_lm().to(dtype)
    assert quantize_experts(model, "int4") == ["blocks.0.ffn", "blocks.1.ffn"]
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(5))
    cached = model.generate(prompt, 12, temperature=0)
    uncached = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert cached.shape == (1, 17)
    if dtype == torch.float32:  # bf16 logits may tie differently between the two paths
        assert torch.equal(cached, uncached)


def test_quantize_experts_refuses_what_it_cannot_quantize():
    with pytest.raises(ValueError, match="no moekit MoE layer"):
        quantize_experts(torch.nn.Linear(4, 4), "int8")
    model = tiny_lm()
    quantize_experts(model, "int8")
    with pytest.raises(ValueError, match=r"blocks.0.ffn is already quantized \(int8\)"):
        quantize_experts(model, "int4")
    with pytest.raises(ValueError, match="multiple of group_size=128, got 64"):
        quantize_experts(tiny_lm(d_model=64), "int4")
    with pytest.raises(ValueError, match="custom expert modules"):
        modules = [torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)]
        quantize_experts(MoE(MoEConfig(d_model=16, d_ff=8, num_experts=2, top_k=1), experts=modules), "int8")


def test_quality_report_compares_against_the_unquantized_model():
    model = tiny_lm()
    windows = [torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    reports = quantization_quality(model, windows)
    assert [r.scheme for r in reports] == ["int8", "int4"]
    with torch.no_grad():
        losses = [model(w[:, :-1], w[:, 1:])[1] for w in windows]
    want_ppl = torch.stack(losses).mean().exp().item()
    for report in reports:
        assert report.tokens == 64
        assert report.reference_perplexity == pytest.approx(want_ppl, rel=1e-5)
        assert report.perplexity_change == pytest.approx(report.perplexity / report.reference_perplexity - 1)
    assert reports[0].top1_agreement >= 0.95 and abs(reports[0].perplexity_change) < 0.01
    assert isinstance(model.blocks[0].ffn.experts, quant.GroupedExperts)  # the model itself is unchanged


def test_quality_of_a_run_on_held_out_text_as_one_json_document(tmp_path, capsys):
    import dataclasses
    import json

    from moekit.experiments.quant import main
    from moekit.training.checkpoint import save_checkpoint, write_json_atomic
    from moekit.training.config import TrainConfig

    torch.manual_seed(0)
    config = LMConfig(vocab_size=256, seq_len=32, n_layer=1, n_head=2, d_model=128,
                      moe=MoEConfig(d_model=128, d_ff=128, num_experts=4, top_k=2))
    run = tmp_path / "run"
    run.mkdir()
    payload = {"model": config.to_dict(), "train": dataclasses.asdict(TrainConfig()), "tokenizer": {"kind": "bytes"}}
    write_json_atomic(run / "config.json", payload)
    save_checkpoint(run, MoETransformerLM(config), {"step": 7})
    data = tmp_path / "held_out.txt"
    data.write_text("Now is the winter of our discontent made glorious summer. " * 3)
    assert main([str(run), "--data", str(data), "--max-tokens", "64"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["tokens"] == 64 and document["trained"] is True and "step 7" in document["source"]
    assert [r["scheme"] for r in document["results"]] == ["int8", "int4"]
    assert all(0 <= r["top1_agreement"] <= 1 for r in document["results"])
    assert main([str(run), "--data", str(data), "--max-tokens", "32", "--dtype", "bfloat16"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["dtype"] == "bfloat16" and document["tokens"] == 32
    assert main([str(run), "--dtype", "float16"]) == 2
    assert "--dtype float16 is invalid" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
