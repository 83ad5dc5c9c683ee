"""The experts stage alone (moekit.experts): the grouped matmul and the expert FFNs.

Verifies: ``grouped_matmul`` and ``grouped_weight_grad`` at values derived by hand (an empty
expert in the middle); the grouped GEMM path (torch grouped_mm) against a per-expert matmul
loop written here, forward and weight gradient, with empty groups first, in the middle and
last, and with no rows at all; ``GroupedExperts`` (both impls) against a per-expert FFN loop
for outputs and gradients; ``ModuleExperts`` skips empty experts and returns zeros when no
expert has a row.

    pytest tests/test_experts.py
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moekit.config import MoEConfig
from moekit.experts import (
    EXPERT_LAYOUTS,
    GroupedExperts,
    GroupedMatmul,
    ModuleExperts,
    grouped_matmul,
    grouped_mm_available,
    grouped_weight_grad,
    set_expert_layout,
    use_grouped_mm,
)
from moekit.matvec import expert_layout


def ends_of(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def loop_matmul(rows_NK: torch.Tensor, weight_EKM: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The spec: each expert's rows times its own weight, one matmul per expert."""
    outs, start = [], 0
    for expert, count in enumerate(counts):
        outs.append(rows_NK[start : start + count] @ weight_EKM[expert])
        start += count
    return torch.cat(outs) if outs else rows_NK.new_zeros(0, weight_EKM.shape[2])


def test_grouped_matmul_by_hand():
    # E=3 experts of 2x2 weights: expert 0 the identity, expert 1 the swap, expert 2 twice
    # the identity. Counts [1, 0, 2]: row 0 goes to expert 0, rows 1-2 to expert 2.
    weight_EKM = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]], [[2.0, 0.0], [0.0, 2.0]]])
    rows_NK = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    counts = [1, 0, 2]
    for impl in ("auto", "loop"):
        out = grouped_matmul(rows_NK, weight_EKM, ends_of(counts), counts, impl)
        # [1, 2]·I = [1, 2]; [3, 4]·2I = [6, 8]; [5, 6]·2I = [10, 12]. The swap is never used.
        assert out.tolist() == [[1.0, 2.0], [6.0, 8.0], [10.0, 12.0]]
        # grad_weight[e] = rows_e^T · grad_e with grad = ones:
        #   e0: [1, 2]^T [1, 1] = [[1, 1], [2, 2]]; e1: zeros (no rows);
        #   e2: [[3, 5], [4, 6]] · ones(2, 2) = [[8, 8], [10, 10]]
        grad_w = grouped_weight_grad(rows_NK, torch.ones(3, 2), ends_of(counts), counts, impl)
        assert grad_w.tolist() == [[[1, 1], [2, 2]], [[0, 0], [0, 0]], [[8, 8], [10, 10]]]


@pytest.mark.parametrize("counts", [[5, 0, 3, 4], [0, 7, 5, 0], [0, 0, 0, 12], [0, 0, 0, 0]])
def test_grouped_mm_matches_loop_with_empty_groups(counts):
    torch.manual_seed(0)
    # D=16, M=8 float32: every stride is a multiple of 16 bytes, so "auto" takes grouped_mm.
    rows_NK = torch.randn(sum(counts), 16)
    weight_EKM = torch.randn(len(counts), 16, 8)
    if grouped_mm_available() and sum(counts):
        assert use_grouped_mm("auto", rows_NK, weight_EKM)
    out = grouped_matmul(rows_NK, weight_EKM, ends_of(counts), counts, "auto")
    torch.testing.assert_close(out, loop_matmul(rows_NK, weight_EKM, counts), atol=1e-5, rtol=1e-5)
    # Weight gradient through the autograd Function, against autograd of the loop.
    w = weight_EKM.clone().requires_grad_(True)
    rows = rows_NK.clone().requires_grad_(True)
    upstream = torch.randn(sum(counts), 8)
    (GroupedMatmul.apply(rows, w, ends_of(counts), counts, "auto") * upstream).sum().backward()
    w_ref = weight_EKM.clone().requires_grad_(True)
    rows_ref = rows_NK.clone().requires_grad_(True)
    (loop_matmul(rows_ref, w_ref, counts) * upstream).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows.grad, rows_ref.grad, atol=1e-5, rtol=1e-5)
    for expert, count in enumerate(counts):
        if count == 0:
            assert torch.count_nonzero(w.grad[expert]) == 0


def test_misaligned_layout_falls_back_to_the_loop():
    # d=6 float32: a row stride of 24 bytes is not a multiple of 16.
    assert not use_grouped_mm("auto", torch.randn(4, 6), torch.randn(2, 6, 8))
    assert not use_grouped_mm("loop", torch.randn(4, 16), torch.randn(2, 16, 8))
    assert not use_grouped_mm("auto", torch.randn(4, 16, dtype=torch.float64), torch.randn(2, 16, 8))


@pytest.mark.parametrize("layout", EXPERT_LAYOUTS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("impl", ["auto", "loop"])
def test_grouped_experts_match_per_expert_ffn_loop(activation, impl, layout):
    torch.manual_seed(1)
    config = MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2, activation=activation, expert_impl=impl)
    experts = GroupedExperts(config)
    set_expert_layout(experts, layout)
    counts = [3, 0, 6, 1]
    x_ND = torch.randn(sum(counts), 16, requires_grad=True)
    upstream = torch.randn(sum(counts), 16)
    (experts(x_ND, ends_of(counts), counts) * upstream).sum().backward()

    def ffn(x, w_in, w_out):
        h = x @ w_in
        if activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return (F.silu(gate) * up) @ w_out
        return (F.gelu(h) if activation == "gelu" else F.relu(h)) @ w_out

    x_ref = x_ND.detach().clone().requires_grad_(True)
    w_in = experts.w_in.detach().clone().requires_grad_(True)
    w_out = experts.w_out.detach().clone().requires_grad_(True)
    starts = [0, 3, 3, 9]
    out_ref = torch.cat(
        [ffn(x_ref[s : s + c], w_in[e], w_out[e]) for e, (s, c) in enumerate(zip(starts, counts, strict=True))]
    )
    (out_ref * upstream).sum().backward()
    torch.testing.assert_close(x_ND.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(experts.w_in.grad, w_in.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(experts.w_out.grad, w_out.grad, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(experts.w_in.grad[1]) == 0  # the empty expert
    assert expert_layout(experts.w_in.grad) == expert_layout(experts.w_out.grad) == layout  # as the weights lie


def test_set_expert_layout_moves_storage_not_values():
    torch.manual_seed(0)
    model = torch.nn.ModuleList([GroupedExperts(MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2))
                                 for _ in range(2)])
    before = [p.detach().clone() for p in model.parameters()]
    assert set_expert_layout(model, "cols") == 0  # already moekit's layout
    assert set_expert_layout(model, "rows") == 4  # w_in and w_out of both
    assert model[0].w_in.shape == (4, 16, 16) and model[0].w_in.stride() == (256, 1, 16)  # [E, H, D] stored
    assert model[0].w_out.shape == (4, 8, 16) and model[0].w_out.stride() == (128, 1, 8)  # [E, D, F] stored
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in model.parameters())
    assert set_expert_layout(model, "rows") == 0
    assert set_expert_layout(model, "cols") == 4 and model[1].w_in.is_contiguous()
    with pytest.raises(ValueError, match="layout='packed' is invalid: use one of cols, rows"):
        set_expert_layout(model, "packed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decoded_token_through_either_layout_gives_the_same_output(dtype):
    """The MoE layer's one-token fast path (moekit.matvec's C call where it is built, torch's
    ops otherwise) and its prefill path on "rows" experts equal those on "cols" ones (to the
    sums' order) and the naive per-expert FFN."""
    from moekit import MoE

    torch.manual_seed(2)
    layer = MoE(MoEConfig(d_model=256, d_ff=192, num_experts=4, top_k=2)).to(dtype).eval()
    rows_layer = copy.deepcopy(layer)
    set_expert_layout(rows_layer, "rows")
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        for tokens in (1, 7):
            x = torch.randn(1, tokens, 256).to(dtype)
            want = layer(x)
            torch.testing.assert_close(rows_layer(x).float(), want.float(), **tolerance)
        chosen = layer.router.route(x[0, :1]).assignments
        naive = torch.zeros(256, dtype=torch.float64)
        for e, w in zip(chosen.expert_idx_N.tolist(), chosen.weight_N.tolist(), strict=True):
            gate, up = (x[0, 0].double() @ layer.experts.w_in[e].double()).chunk(2)
            naive += w * ((F.silu(gate) * up) @ layer.experts.w_out[e].double())
        torch.testing.assert_close(rows_layer(x[:, :1])[0, 0].double(), naive, **tolerance)


def test_module_experts_skip_empty_experts():
    calls = []

    class Scale(torch.nn.Module):
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, x):
            calls.append(self.factor)
            return self.factor * x

    experts = ModuleExperts([Scale(1.0), Scale(2.0), Scale(3.0)])
    x_ND = torch.tensor([[1.0], [2.0], [3.0]])
    # Counts [2, 0, 1]: rows 0-1 scaled by 1, row 2 by 3; expert 1 is never called.
    out = experts(x_ND, ends_of([2, 0, 1]), [2, 0, 1])
    assert out.tolist() == [[1.0], [2.0], [9.0]] and calls == [1.0, 3.0]
    calls.clear()
    none = experts(x_ND[:0], ends_of([0, 0, 0]), [0, 0, 0])
    assert none.shape == (0, 1) and calls == []
