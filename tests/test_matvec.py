"""moekit.matvec, the batch-1 decode kernels, against a float64 reference; and moekit.hugepages.

    pytest tests/test_matvec.py

Shapes cover every tail of the C loops: row counts not a multiple of the 8-row pass or of the
row blocks, column counts not a multiple of 8 (float32) or 16 (bfloat16), a single element.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit import matvec
from moekit.config import MoEConfig
from moekit.hugepages import HUGE_PAGE_BYTES, huge_page_copy, place_in_huge_pages, transparent_huge_pages

needs_kernels = pytest.mark.skipif(not matvec.available(), reason=f"moekit.matvec is {matvec.status()}")

# (out features O, in features I)
SHAPES = [(1, 1), (17, 16), (33, 300), (1000, 37), (24, 1030), (130, 1024), (96, 2056), (4096, 64)]


def reference(x_I: torch.Tensor, weight_OI: torch.Tensor) -> torch.Tensor:
    return (weight_OI.double() @ x_I.double().reshape(-1)).reshape(1, -1)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"O{s[0]}xI{s[1]}")
def test_rows_and_cols_equal_the_float64_product(shape, dtype):
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(out_features * 7919 + in_features)
    weight_OI = torch.randn(out_features, in_features, generator=generator).to(dtype)
    x_1I = torch.randn(1, in_features, generator=generator)
    want = reference(x_1I, weight_OI)
    # float32 sums of I products: error within a few ulps of the sum of |products|
    bound = 1e-6 * (weight_OI.double().abs() @ x_1I.double().abs().reshape(-1)).max().item() * 8 + 1e-7
    with torch.no_grad():
        got_rows = matvec.rows(x_1I, weight_OI)
        got_cols = matvec.cols(x_1I, weight_OI.t().contiguous())
    for got in (got_rows, got_cols):
        assert got.shape == (1, out_features) and got.dtype == torch.float32
        assert (got.double() - want).abs().max().item() <= bound


@needs_kernels
def test_bfloat16_activations_are_widened_and_the_result_rounded_once():
    weight_OI = torch.randn(64, 96).bfloat16()
    x_1I = torch.randn(1, 96).bfloat16()
    with torch.no_grad():
        got = matvec.rows(x_1I, weight_OI)
    want_float32 = reference(x_1I.float(), weight_OI).float()
    assert got.dtype == torch.bfloat16
    # one rounding of a nearly exact float32 sum: within one bfloat16 ulp of the rounded reference
    assert torch.allclose(got.float(), want_float32.bfloat16().float(), rtol=2**-7, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_the_thread_count(dtype):
    weight_OI = torch.randn(300, 1030).to(dtype)
    weight_IO = torch.randn(1030, 300).to(dtype)
    x_1I = torch.randn(1, 1030)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            with torch.no_grad():
                outputs.append((matvec.rows(x_1I, weight_OI), matvec.cols(x_1I, weight_IO)))
    finally:
        torch.set_num_threads(threads)
    for rows, cols in outputs[1:]:
        assert torch.equal(rows, outputs[0][0]) and torch.equal(cols, outputs[0][1])


@needs_kernels
def test_a_view_of_a_3d_weight_reads_its_own_expert():
    w_EDH = torch.randn(4, 40, 24)
    x_1D = torch.randn(1, 40)
    with torch.no_grad():
        for expert in range(4):
            got = matvec.cols(x_1D, w_EDH[expert])
            torch.testing.assert_close(got, x_1D @ w_EDH[expert], atol=1e-5, rtol=1e-5)


def test_applies_only_to_one_row_inference_on_supported_weights():
    weight = torch.randn(256, 128)
    one_row = torch.randn(1, 1, 128)
    with torch.no_grad():
        assert matvec.applies(one_row, weight) == matvec.available()
        assert not matvec.applies(torch.randn(2, 128), weight)  # two rows: a GEMM
        assert not matvec.applies(one_row, weight[:255])  # small: torch's GEMM is faster in cache
        assert not matvec.applies(one_row, weight.t())  # not contiguous
        assert not matvec.applies(one_row, weight.double())
        assert not matvec.applies(one_row.bfloat16(), weight)  # mixed: bf16 x, float32 weight
        assert not matvec.applies(one_row, weight.bfloat16())  # mixed: float32 x, bf16 weight (F.linear refuses)
    trainable = nn.Parameter(weight)
    assert not matvec.applies(one_row, trainable)  # autograd on: torch's matmul
    previous = matvec.set_enabled(False)
    try:
        with torch.no_grad():
            assert not matvec.applies(one_row, weight)
        assert matvec.status().startswith("off")
    finally:
        matvec.set_enabled(previous)


def test_decode_linear_equals_nn_linear_and_keeps_gradients():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(480, 400), nn.ReLU(), nn.Linear(400, 256, bias=False))
    fast = copy.deepcopy(plain)
    assert matvec.use_decode_linears(fast) == 2
    assert all(type(m) is matvec.DecodeLinear for m in (fast[0], fast[2]))
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(1, 480)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast(x.expand(3, 480)), plain(x.expand(3, 480)), atol=0, rtol=0)
    # training: torch's path, the same gradients
    fast(x).sum().backward()
    plain(x).sum().backward()
    torch.testing.assert_close(fast[0].weight.grad, plain[0].weight.grad, atol=0, rtol=0)


def test_without_a_compiler_everything_falls_back_with_a_reason(tmp_path):
    """A fresh process with no compiler found: status says why, the products are torch's."""
    script = (
        "import torch, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "from moekit import matvec\n"
        "w = torch.randn(256, 256); x = torch.randn(1, 256)\n"
        "with torch.no_grad():\n"
        "    y = matvec.linear(x, w)\n"
        "assert torch.equal(y, torch.nn.functional.linear(x, w))\n"
        "print(matvec.status())\n"
    )
    environment = {"PATH": str(tmp_path), "CC": "", "MOEKIT_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "off: no C compiler (cc, gcc or $CC) found"


def test_the_environment_switch_turns_the_kernels_off(tmp_path):
    script = "from moekit import matvec\nprint(matvec.status())\n"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "MOEKIT_MATVEC": "0", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "off: MOEKIT_MATVEC=0"


# ---------------------------------------------------------------------------------------
# moekit.hugepages
# ---------------------------------------------------------------------------------------


def test_huge_page_copy_is_equal_aligned_and_its_own_storage():
    tensor = torch.randn(3, HUGE_PAGE_BYTES // 4 + 5)
    copied = huge_page_copy(tensor)
    assert torch.equal(copied, tensor) and copied.dtype == tensor.dtype and copied.shape == tensor.shape
    assert copied.data_ptr() % HUGE_PAGE_BYTES == 0
    # its storage is exactly its bytes: torch.save writes no padding
    assert copied.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    copied.add_(1)  # a copy, not a view of the original
    assert not torch.equal(copied, tensor)
    experts_EIO = torch.randn(2, HUGE_PAGE_BYTES // 16, 3)
    rows_EIO = torch.randn(2, 3, HUGE_PAGE_BYTES // 16).transpose(1, 2)  # the "rows" expert layout
    for view in (experts_EIO, rows_EIO):
        copied = huge_page_copy(view)
        assert torch.equal(copied, view) and copied.stride() == view.stride()  # the same layout
        assert copied.data_ptr() % HUGE_PAGE_BYTES == 0
    with_gaps = torch.randn(4, 6)[:, :3]
    assert huge_page_copy(with_gaps).is_contiguous() and torch.equal(huge_page_copy(with_gaps), with_gaps)


def test_place_in_huge_pages_keeps_outputs_ties_and_trainability():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(1024, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    model[2].weight = model[0].weight  # tied
    small = nn.Linear(4, 4)
    model.append(small)
    before = copy.deepcopy(model)
    small_pointer = small.weight.data_ptr()
    moved = place_in_huge_pages(model)
    if transparent_huge_pages() in ("always", "madvise"):
        assert moved == 2 * 1024 * 1024 * 4  # the embedding (tied) and one linear, once each
        assert model[0].weight.data_ptr() % HUGE_PAGE_BYTES == 0
    else:
        assert moved == 0
    assert model[2].weight is model[0].weight
    assert model[0].weight.data_ptr() == model[2].weight.data_ptr()
    assert small.weight.data_ptr() == small_pointer  # under 2 MiB: left where it was
    assert all(p.requires_grad for p in model.parameters())
    idx = torch.tensor([[1, 5, 9]])
    x = model[0](idx)
    torch.testing.assert_close(model[1](x), before[1](before[0](idx)), atol=0, rtol=0)
    model[1](x).sum().backward()  # still trainable
    assert model[1].weight.grad is not None


@needs_kernels
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 128), (300, 1030), (4096, 64)], ids=lambda s: f"O{s[0]}xI{s[1]}")
def test_rows_int8_equals_the_dequantized_product(shape, x_dtype):
    """int8 weights with one scale per output row: (q · x) · scale, float32 sums."""
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(out_features + in_features)
    qweight_OI = torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
    scales_O = torch.rand(out_features, generator=generator) / 100
    x_1I = torch.randn(1, in_features, generator=generator).to(x_dtype)
    assert matvec.applies_int8(x_1I, qweight_OI)
    with torch.no_grad():
        got = matvec.rows_int8(x_1I, qweight_OI, scales_O)
    want = (qweight_OI.double() @ x_1I.double().reshape(-1)) * scales_O.double()
    assert got.shape == (1, out_features) and got.dtype == x_dtype
    if x_dtype == torch.float32:
        bound = 1e-6 * 8 * ((qweight_OI.double().abs() @ x_1I.double().abs().reshape(-1)) * scales_O.double()).max()
        assert (got.double().reshape(-1) - want).abs().max().item() <= bound.item() + 1e-7
    else:  # one rounding to bfloat16 of a nearly exact sum
        torch.testing.assert_close(got.float().reshape(-1), want.float(), rtol=2**-7, atol=1e-5)
    assert not matvec.applies_int8(torch.randn(2, in_features), qweight_OI)
    assert not matvec.applies_int8(x_1I, qweight_OI.float())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cols_experts_equals_one_cols_call_per_expert_bit_for_bit(dtype):
    """A token's k experts in one call sum each product as a call of its own does (the
    offloaded experts, which run one at a time, rely on it)."""
    w_EIO = torch.randn(6, 300, 264).to(dtype)
    x_kI = torch.randn(3, 300).to(dtype)
    experts = [4, 0, 4]
    with torch.no_grad():
        together = matvec.cols_experts(x_kI, w_EIO, experts)
        apart = torch.cat([matvec.cols(x_kI[j : j + 1], w_EIO[e]) for j, e in enumerate(experts)])
    assert together.dtype == dtype and torch.equal(together, apart)
    want = (x_kI.double().unsqueeze(1) @ w_EIO[experts].double()).squeeze(1).float()
    tolerance = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=0.5, rtol=2e-2)
    torch.testing.assert_close(together.float(), want, **tolerance)
    x_1I = x_kI[:1]
    with torch.no_grad():
        assert matvec.applies_experts(x_1I, w_EIO, torch.randn(6, 264, 300).to(dtype))
        assert not matvec.applies_experts(x_1I, w_EIO[:, :, :8])  # 2,400 elements per matrix: torch's
        assert not matvec.applies_experts(torch.randn(2, 300).to(dtype), w_EIO)  # two tokens
    with pytest.raises(ValueError, match="experts"):
        matvec.cols_experts(x_kI, w_EIO, [0, 1, 6])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cols_matrices_equals_cols_experts_bit_for_bit(dtype):
    """Separately stored matrices (an offloaded layer's cached experts) sum each product as
    ``cols_experts`` sums the same matrices stacked: the offloaded model's decode equals the
    in-memory model's bit for bit."""
    w_EIO = torch.randn(5, 300, 264).to(dtype)
    apart = [w_EIO[e].clone() for e in range(5)]  # own storage each
    x_kI = torch.randn(2, 300).to(dtype)
    experts = [3, 1]
    with torch.no_grad():
        got = matvec.cols_matrices(x_kI, [apart[e] for e in experts])
        assert got.dtype == dtype and torch.equal(got, matvec.cols_experts(x_kI, w_EIO, experts))
        x_1I = x_kI[:1]
        assert matvec.applies_matrices(x_1I, apart[:2], [torch.randn(264, 300).to(dtype)] * 2)
        assert not matvec.applies_matrices(x_1I, [torch.randn(264, 300).to(dtype)] * 2)  # I != x's 300
        assert not matvec.applies_matrices(x_1I, [apart[0], apart[1][:, :8]])  # shapes differ
        assert not matvec.applies_matrices(x_1I, [apart[0].t()])  # not contiguous
        assert not matvec.applies_matrices(x_1I, [])
        assert not matvec.applies_matrices(torch.randn(2, 300).to(dtype), apart[:2])  # two tokens
    with pytest.raises(ValueError, match="2 rows for 3 matrices"):
        matvec.cols_matrices(x_kI, apart[:3])


def naive_attention_block(x_D, w_qkv, w_proj, g_attn, g_ffn, eps, cos_K, sin_K, keys, values, position, n_head):
    """The attention half written out in float64, one formula per line (the C kernel's spec)."""
    f64 = torch.float64
    _, n_kv, _, head_dim = keys.shape
    x = x_D.to(f64)

    def rms_norm(v, g):  # Zhang & Sennrich 2019: v / sqrt(mean(v^2) + eps) * g
        return v / torch.sqrt((v * v).mean() + eps) * g.to(f64)

    qkv = w_qkv.to(f64) @ rms_norm(x, g_attn)
    q = qkv[: n_head * head_dim].view(n_head, head_dim)
    k = qkv[n_head * head_dim : (n_head + n_kv) * head_dim].view(n_kv, head_dim)
    v = qkv[(n_head + n_kv) * head_dim :].view(n_kv, head_dim)

    def rotate(t):  # "rotate half": (a, b) -> (a cos - b sin, a sin + b cos), Su et al. 2021 eq. 34
        a, b = t[:, : head_dim // 2], t[:, head_dim // 2 :]
        c, s = cos_K.to(f64), sin_K.to(f64)
        return torch.cat([a * c - b * s, a * s + b * c], dim=1)

    q, k = rotate(q), rotate(k)
    keys_all, values_all = keys[0, :, : position + 1].to(f64).clone(), values[0, :, : position + 1].to(f64).clone()
    keys_all[:, position], values_all[:, position] = k, v
    out = torch.empty(n_head, head_dim, dtype=f64)
    for head in range(n_head):
        g = head // (n_head // n_kv)  # grouped-query attention: kv head g serves these query heads
        p = torch.softmax(keys_all[g] @ q[head] / head_dim**0.5, dim=0)
        out[head] = p @ values_all[g]
    x_out = x + w_proj.to(f64) @ out.reshape(-1)
    return x_out, rms_norm(x_out, g_ffn), k, v


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n_head", "n_kv", "position"), [(8, 2, 0), (8, 2, 37), (4, 4, 5)])
def test_attention_block_equals_the_float64_formulas(dtype, n_head, n_kv, position):
    torch.manual_seed(position)
    d_model, head_dim, capacity = 256, 256 // n_head, 48
    w_qkv = (torch.randn(d_model + 2 * n_kv * head_dim, d_model) / 16).to(dtype)
    w_proj = (torch.randn(d_model, d_model) / 16).to(dtype)
    g_attn, g_ffn = (1 + torch.rand(d_model)).to(dtype), (1 + torch.rand(d_model)).to(dtype)
    angles = torch.rand(head_dim // 2) * 6
    keys = torch.randn(1, n_kv, capacity, head_dim).to(dtype)
    values = torch.randn(1, n_kv, capacity, head_dim).to(dtype)
    x = torch.randn(1, d_model).to(dtype)
    want_x, want_h, want_k, want_v = naive_attention_block(
        x[0], w_qkv, w_proj, g_attn, g_ffn, 1e-6, angles.cos(), angles.sin(), keys, values, position, n_head)
    before = keys.clone()
    with torch.no_grad():
        assert matvec.applies_attention_block(x, w_qkv, w_proj, keys, values)
        got_x, got_h = matvec.attention_block(x, w_qkv, w_proj, g_attn, g_ffn, 1e-6, angles.cos(), angles.sin(),
                                              keys, values, position, n_head)
    tolerance = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.03)
    assert got_x.dtype == got_h.dtype == dtype
    torch.testing.assert_close(got_x.double(), want_x, **tolerance)
    torch.testing.assert_close(got_h.double(), want_h, **tolerance)
    # the token's key and value were written at its position, nothing else moved
    torch.testing.assert_close(keys[0, :, position].double(), want_k, **tolerance)
    torch.testing.assert_close(values[0, :, position].double(), want_v, **tolerance)
    others = [t for t in range(capacity) if t != position]
    assert torch.equal(keys[0, :, others], before[0, :, others])


def test_attention_block_applies_only_to_inference_of_supported_tensors():
    w_qkv, w_proj = torch.randn(384, 256), torch.randn(256, 256)
    keys = torch.zeros(1, 2, 8, 32)
    x = torch.randn(1, 256)
    with torch.no_grad():
        assert not matvec.applies_attention_block(torch.randn(2, 256), w_qkv, w_proj, keys, keys)  # two tokens
        assert not matvec.applies_attention_block(x, w_qkv, w_proj, keys.bfloat16(), keys)  # cache dtype
        assert not matvec.applies_attention_block(x, w_qkv, w_proj.t(), keys, keys)  # not contiguous
    w_proj.requires_grad_(True)
    assert not matvec.applies_attention_block(x, w_qkv, w_proj, keys, keys)  # autograd would need the graph
    with torch.no_grad(), pytest.raises(ValueError, match="position 8 of a cache of 8"):
        matvec.attention_block(x, w_qkv, w_proj.detach(), torch.ones(256), torch.ones(256), 1e-6, torch.ones(16),
                               torch.zeros(16), keys, keys.clone(), 8, 8)


def naive_experts(x_D, w_in_EDH, w_out_EFD, experts, weights, activation, alpha, limit, b_in_EH, b_out_ED):
    """Σ_j w_j FFN_{e_j}(x) in float64, the formulas of moekit.experts.activate written out."""
    f64 = torch.float64
    y = torch.zeros(w_out_EFD.shape[2], dtype=f64)
    for e, w in zip(experts, weights.tolist(), strict=True):
        h = x_D.to(f64) @ w_in_EDH[e].to(f64) + (0 if b_in_EH is None else b_in_EH[e].to(f64))
        if activation in ("swiglu", "clamped_swiglu"):
            gate, up = h.chunk(2)
            if activation == "swiglu":  # Shazeer 2020 eq. 6: silu(gate) · up
                a = gate * torch.sigmoid(gate) * up
            else:  # GPT-OSS: (clamp(up) + 1) · g · sigmoid(alpha g), g = min(gate, limit)
                gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
                a = (up + 1) * gate * torch.sigmoid(alpha * gate)
        elif activation == "gelu":  # the erf form
            a = 0.5 * h * (1 + torch.erf(h / 2**0.5))
        else:
            a = h.clamp(min=0)
        y += w * (a @ w_out_EFD[e].to(f64) + (0 if b_out_ED is None else b_out_ED[e].to(f64)))
    return y


def as_layout(w_EIO: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values stored as ``layout`` (moekit.experts.set_expert_layout's two)."""
    return w_EIO.contiguous() if layout == "cols" else w_EIO.transpose(1, 2).contiguous().transpose(1, 2)


def test_expert_layout_names_the_two_storages_and_nothing_else():
    w_EIO = torch.randn(3, 4, 5)
    assert matvec.expert_layout(w_EIO) == "cols" and matvec.expert_layout(w_EIO[1]) == "cols"
    rows_EIO = as_layout(w_EIO, "rows")
    assert rows_EIO.stride() == (20, 1, 4)  # expert e's [O, I] = [5, 4] matrix, row-major
    assert matvec.expert_layout(rows_EIO) == "rows" and matvec.expert_layout(rows_EIO[2]) == "rows"
    assert matvec.expert_layout(w_EIO[:, :, :3]) is None  # rows with gaps
    assert matvec.expert_layout(w_EIO.transpose(0, 1)) is None  # experts interleaved
    assert matvec.expert_layout(w_EIO[::2]) == "cols"  # experts apart, each whole (a store's padded blobs)
    assert matvec.expert_layout(torch.randn(60).as_strided((3, 4, 5), (10, 5, 1))) is None  # overlapping


@needs_kernels
@pytest.mark.parametrize("layout", ["cols", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("activation", "biases"), [("swiglu", False), ("clamped_swiglu", True), ("gelu", False),
                                                    ("relu", True)])
def test_experts_ffn_equals_the_float64_formulas_stacked_or_listed(dtype, activation, biases, layout):
    torch.manual_seed(1)
    d_model, d_ff, num_experts = 256, 192, 5
    hidden = 2 * d_ff if "swiglu" in activation else d_ff
    w_in = as_layout((torch.randn(num_experts, d_model, hidden) / 16).to(dtype), layout)
    w_out = as_layout((torch.randn(num_experts, d_ff, d_model) / 16).to(dtype), layout)
    b_in = (torch.randn(num_experts, hidden) / 4).to(dtype) if biases else None
    b_out = (torch.randn(num_experts, d_model) / 4).to(dtype) if biases else None
    x = torch.randn(1, d_model).to(dtype)
    experts, weights = [3, 0, 4], torch.tensor([0.5, 0.3, 0.2])
    with torch.no_grad():
        assert matvec.applies_experts(x, w_in, w_out)
        stacked = matvec.experts_ffn(x, w_in, w_out, experts, weights, activation, 1.702, 0.7, b_in, b_out)
        listed = matvec.experts_ffn(
            x, [w_in[e].clone() for e in experts], [w_out[e].clone() for e in experts], experts, weights, activation,
            1.702, 0.7, None if b_in is None else [b_in[e].clone() for e in experts],
            None if b_out is None else [b_out[e].clone() for e in experts],
        )
    assert stacked.dtype == torch.float32 and stacked.shape == (1, d_model)
    assert torch.equal(stacked, listed)  # the same sums, however the experts are held
    if layout == "rows":  # vecmat reads a transposed expert matrix with the rows kernel
        with torch.no_grad():
            h = matvec.rows(x, w_in[experts[0]].T)
        assert torch.equal(h, matvec.vecmat(x, w_in[experts[0]]))
        with pytest.raises(ValueError, match=r"all \[I, O\] or all \[O, I\]"):
            matvec.experts_ffn(x, w_in, w_out.contiguous(), experts, weights, activation)
    want = naive_experts(x[0], w_in, w_out, experts, weights, activation, 1.702, 0.7, b_in, b_out)
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
    torch.testing.assert_close(stacked[0].double(), want, **tolerance)
    with pytest.raises(ValueError, match="activation 'tanh'"):
        matvec.experts_ffn(x, w_in, w_out, experts, weights, "tanh")


def test_the_c_calls_know_every_activation_a_config_allows():
    """The decode fast paths call experts_ffn for every config: no activation may lack a C code."""
    from moekit.config import ACTIVATIONS

    assert set(matvec.DECODE_ACTIVATIONS) == set(ACTIVATIONS)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("activation", "biases"), [("swiglu", False), ("clamped_swiglu", True), ("relu", False)])
def test_experts_ffn_int8_equals_the_float64_formulas(dtype, activation, biases):
    """int8 experts ([out, in] weights, one scale per output): the dequantized weights through
    the same float64 formulas."""
    torch.manual_seed(2)
    d_model, d_ff, k = 256, 192, 2
    hidden = 2 * d_ff if "swiglu" in activation else d_ff
    q_in = [torch.randint(-127, 128, (hidden, d_model), dtype=torch.int8) for _ in range(k)]
    q_out = [torch.randint(-127, 128, (d_model, d_ff), dtype=torch.int8) for _ in range(k)]
    s_in = [torch.rand(hidden) / 2000 for _ in range(k)]
    s_out = [torch.rand(d_model) / 2000 for _ in range(k)]
    b_in = [torch.randn(hidden) / 4 for _ in range(k)] if biases else None
    b_out = [torch.randn(d_model) / 4 for _ in range(k)] if biases else None
    x = torch.randn(1, d_model).to(dtype)
    weights = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        assert matvec.applies_int8_experts(x, q_in, q_out)
        assert not matvec.applies_int8_experts(x, q_out, q_in)  # w_in's inputs are not x's features
        got = matvec.experts_ffn_int8(x, q_in, s_in, q_out, s_out, weights, activation, 1.702, 0.7, b_in, b_out)
    w_in = torch.stack([(q.double() * s.double()[:, None]).t() for q, s in zip(q_in, s_in, strict=True)])
    w_out = torch.stack([(q.double() * s.double()[:, None]).t() for q, s in zip(q_out, s_out, strict=True)])
    want = naive_experts(x[0], w_in, w_out, [0, 1], weights, activation, 1.702, 0.7,
                         None if b_in is None else torch.stack(b_in), None if b_out is None else torch.stack(b_out))
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
    assert got.shape == (1, d_model) and got.dtype == torch.float32
    torch.testing.assert_close(got[0].double(), want, **tolerance)


# ---------------------------------------------------------------------------------------
# route_experts_ffn: a decoded token's whole MoE layer (router and experts) in one C call
# ---------------------------------------------------------------------------------------


@needs_kernels
def test_route_experts_ffn_routes_as_derived_by_hand():
    """x = e_0 and a gate whose column 0 holds the logits [1, 3, 3, 0, ln 2 + 3]: softmax
    p ∝ [e, e³, e³, 1, 2e³]; top-2 = expert 4 (2e³), then the tie between 1 and 2 goes to the
    lower index; normalized weights 2/3 and 1/3, times the scale 2."""
    d_model = 64
    gate = torch.zeros(5, d_model)
    gate[:, 0] = torch.tensor([1.0, 3.0, 3.0, 0.0, math.log(2.0) + 3.0])
    x = torch.zeros(1, d_model)
    x[0, 0] = 1.0
    routed = matvec.route_experts_ffn(x, gate, None, False, True, 2, True, 2.0)
    assert routed.expert_idx_K.tolist() == [4, 1] and routed.counts_E.tolist() == [0, 1, 0, 0, 1]
    torch.testing.assert_close(routed.weight_K, torch.tensor([4 / 3, 2 / 3]))
    torch.testing.assert_close(routed.logits_1E[0], gate[:, 0])
    torch.testing.assert_close(routed.scores_1E, gate[:, 0].softmax(-1)[None])
    unnormalized = matvec.route_experts_ffn(x, gate, torch.tensor([0.0, 0, 0, 10, 0]), False, True, 2, False, 1.0)
    assert unnormalized.expert_idx_K.tolist() == [3, 4]  # the bias lifts expert 3 to 10
    torch.testing.assert_close(unnormalized.weight_K, unnormalized.scores_1E[0, [3, 4]])
    gate[1, 0] = float("nan")
    assert matvec.route_experts_ffn(x, gate, None, False, True, 2, True, 1.0) is None  # the caller raises


@needs_kernels
@pytest.mark.parametrize("layout", ["cols", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_experts_ffn_equals_the_top_k_router_then_experts_ffn(dtype, layout):
    from moekit.routing import TopKRouter

    torch.manual_seed(3)
    d_model, d_ff, num_experts = 256, 192, 6
    router = TopKRouter(MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=2,
                                  routed_scaling_factor=1.5)).to(dtype)
    w_in = as_layout((torch.randn(num_experts, d_model, 2 * d_ff) / 16).to(dtype), layout)
    w_out = as_layout((torch.randn(num_experts, d_ff, d_model) / 16).to(dtype), layout)
    for seed in range(5):
        x = torch.randn(1, d_model, generator=torch.Generator().manual_seed(seed)).to(dtype)
        with torch.no_grad():
            assert matvec.applies_routed_experts(x, router.weight, w_in, w_out)
            want = router.route(x).assignments
            routed = matvec.route_experts_ffn(x, router.weight, None, False, True, 2, True, 1.5, w_in, w_out, "swiglu")
            alone = matvec.route_experts_ffn(x, router.weight, None, False, True, 2, True, 1.5)  # the routing only
            y = matvec.experts_ffn(x, w_in, w_out, routed.expert_idx_K.tolist(), routed.weight_K, "swiglu")
        assert routed.expert_idx_K.tolist() == want.expert_idx_N.tolist()
        torch.testing.assert_close(routed.weight_K, want.weight_N, atol=1e-6, rtol=1e-6)
        assert torch.equal(alone.expert_idx_K, routed.expert_idx_K) and torch.equal(alone.weight_K, routed.weight_K)
        assert torch.equal(routed.y_1D, y)  # the same experts code on the same choices


@needs_kernels
def test_route_experts_ffn_rounds_the_logits_as_a_bf16_gate():
    torch.manual_seed(4)
    gate = torch.randn(8, 256).bfloat16()
    x = torch.randn(1, 256).bfloat16()
    routed = matvec.route_experts_ffn(x, gate, None, True, True, 2, True, 1.0)
    assert torch.equal(routed.logits_1E, routed.logits_1E.bfloat16().float())  # bfloat16 values
    torch.testing.assert_close(routed.logits_1E, F.linear(x, gate).float(), atol=0, rtol=2**-7)  # to 1 ulp
