"""The fast path: permute → grouped expert FFN → combine, as one autograd.Function.

Shape suffixes: T tokens, D d_model, N rows (assignments in expert order), E experts,
H first projection width (2F for SwiGLU), F expert hidden size.

Plain autograd through (gather rows, grouped_mm, multiply by weights, index_add) spends
most of its time outside the matmuls: the backward of the gather and of index_add, extra
elementwise products, and zero-filled buffers. The hand-written backward here does only:
  g_rows   = gy[token of row]                       one index_select
  g_weight = rowwise <g_rows, out>                  the routing weights' gradient
  g_out    = g_rows · weight                        into the grouped GEMMs
  g_x      = Σ over a token's rows (embedding_bag)  no scatter-add
and the combine itself is ``F.embedding_bag(mode="sum", per_sample_weights=...)``.

It is checked against the unfused path and a per-token reference loop in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.dispatch import DispatchPlan
from moekit.experts import grouped_matmul, grouped_weight_grad


def _activation_forward(h_NH: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        return F.silu(gate_NF) * up_NF
    if activation == "gelu":
        return F.gelu(h_NH)
    return F.relu(h_NH)


def _activation_backward(g_act_NF: Tensor, h_NH: Tensor, act_NF: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        width = gate_NF.shape[1]
        # NOTE: gate and up gradients go into one buffer so the weight-gradient GEMM reads
        # one contiguous [N, 2F] matrix.
        g_h_NH = torch.empty_like(h_NH)
        torch.ops.aten.silu_backward.grad_input(g_act_NF * up_NF, gate_NF, grad_input=g_h_NH[:, :width])
        torch.mul(g_act_NF, F.silu(gate_NF), out=g_h_NH[:, width:])
        return g_h_NH
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(g_act_NF, h_NH)
    return torch.ops.aten.threshold_backward(g_act_NF, act_NF, 0)


class _FusedExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: ANN205
        ctx,  # noqa: ANN001
        x_TD: Tensor,
        weight_N: Tensor,
        w_in_EDH: Tensor,
        w_out_EFD: Tensor,
        token_of_row_N: Tensor,
        row_of_assignment_N: Tensor,
        order_N: Tensor,
        bag_offsets_T: Tensor,
        group_ends_E: Tensor,
        counts: Sequence[int],
        activation: str,
        impl: str,
    ) -> Tensor:
        x_rows_ND = x_TD.index_select(0, token_of_row_N)
        h_NH = grouped_matmul(x_rows_ND, w_in_EDH, group_ends_E, counts, impl)
        act_NF = _activation_forward(h_NH, activation)
        out_ND = grouped_matmul(act_NF, w_out_EFD, group_ends_E, counts, impl)
        # NOTE: combine weights are applied in float32 (router precision); for bf16 experts
        # the rows are upcast first and y is cast back by the caller.
        out_f32_ND = out_ND.float()
        y_TD = F.embedding_bag(
            row_of_assignment_N,
            out_f32_ND,
            bag_offsets_T,
            mode="sum",
            per_sample_weights=weight_N.float(),
        )
        ctx.save_for_backward(
            x_rows_ND, h_NH, act_NF, out_ND, weight_N, w_in_EDH, w_out_EFD,
            token_of_row_N, row_of_assignment_N, order_N, bag_offsets_T, group_ends_E,
        )  # fmt: skip
        ctx.counts, ctx.activation, ctx.impl = counts, activation, impl
        return y_TD

    @staticmethod
    def backward(ctx, g_y_TD: Tensor):  # noqa: ANN001, ANN205
        (
            x_rows_ND, h_NH, act_NF, out_ND, weight_N, w_in_EDH, w_out_EFD,
            token_of_row_N, row_of_assignment_N, order_N, bag_offsets_T, group_ends_E,
        ) = ctx.saved_tensors  # fmt: skip
        counts, impl = ctx.counts, ctx.impl
        # NOTE: contiguous() because an upstream y.sum() hands us a zero-stride expanded
        # tensor, which CPU grouped_mm rejects.
        g_y_TD = g_y_TD.contiguous()
        g_rows_ND = g_y_TD.index_select(0, token_of_row_N)  # float32, row order
        g_weight_by_row_N = (g_rows_ND * out_ND.float()).sum(dim=-1)
        g_weight_N = g_weight_by_row_N.index_select(0, row_of_assignment_N)
        weight_by_row_N = weight_N.float().index_select(0, order_N)
        g_out_ND = (g_rows_ND.mul_(weight_by_row_N[:, None])).to(out_ND.dtype)

        g_w_out = grouped_weight_grad(act_NF, g_out_ND, group_ends_E, counts, impl)
        g_act_NF = grouped_matmul(g_out_ND, w_out_EFD.transpose(1, 2), group_ends_E, counts, impl)
        g_h_NH = _activation_backward(g_act_NF, h_NH, act_NF, ctx.activation)
        g_w_in = grouped_weight_grad(x_rows_ND, g_h_NH, group_ends_E, counts, impl)
        g_x_rows_ND = grouped_matmul(g_h_NH, w_in_EDH.transpose(1, 2), group_ends_E, counts, impl)
        # A token's rows summed back into the token: embedding_bag over its bag of rows.
        g_x_TD = F.embedding_bag(row_of_assignment_N, g_x_rows_ND, bag_offsets_T, mode="sum")
        return (
            g_x_TD, g_weight_N.to(weight_N.dtype), g_w_in, g_w_out,
            None, None, None, None, None, None, None, None,
        )  # fmt: skip


def fused_experts(
    x_TD: Tensor,
    weight_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    plan: DispatchPlan,
    activation: str,
    impl: str,
) -> Tensor:
    """y[t] = Σ_{assignments (t, e, w)} w · FFN_e(x[t]), float32 [T, D]."""
    return _FusedExpertsFunction.apply(
        x_TD,
        weight_N,
        w_in_EDH,
        w_out_EFD,
        plan.token_of_row_N,
        plan.row_of_assignment_N,
        plan.order_N,
        plan.bag_offsets_T,
        plan.group_ends_E,
        plan.tokens_per_expert,
        activation,
        impl,
    )
