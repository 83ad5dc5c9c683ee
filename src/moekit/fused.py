"""The fast path: permute → grouped expert FFN → combine, as two autograd Functions.

Shape suffixes: T tokens, D d_model, N rows (assignments in expert order), E experts,
H first projection width (2F for SwiGLU), F expert hidden size.

Plain autograd through (gather rows, grouped_mm, multiply by weights, index_add) spends
most of its time outside the matmuls: the backward of the gather and of index_add, extra
elementwise products, and zero-filled buffers. The hand-written backwards here do only:

  _ExpertsUp          rows = x[token of row]; h = rows @ w_in[e]; act = activation(h)
    backward          g_h = activation'(g_act) (gate and up into one buffer, no temporaries)
                      g_w_in = rows^T g_h;  g_x = Σ over a token's rows of g_h @ w_in[e]^T
                      (embedding_bag: no scatter-add)
  _ExpertsDownCombine y[t] = Σ over t's rows of weight · (act @ w_out[e])
                      (embedding_bag with per_sample_weights)
    backward          g_rows = g_y[token of row]            one index_select
                      u = g_rows @ w_out[e]^T               [N, F]
                      g_weight = rowwise <u, act>           = <g_rows, out>: out is never saved
                      g_act = weight · u;  g_w_out = act^T (weight · g_rows)

NOTE: two Functions rather than one so that autograd frees the down projection's saved
tensors before the up projection's backward runs; with the expert output ``out`` [N, D]
never saved, the peak of a forward+backward stays under the dense equivalent's (DESIGN.md,
"Performance contract"). Every saved tensor goes through ``save_for_backward``, so
saved-tensor hooks (activation checkpointing, offloading) see them all.

It is checked against the unfused path and a per-token reference loop in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.dispatch import DispatchPlan
from moekit.experts import activate, grouped_matmul, grouped_weight_grad


def _activation_backward(g_act_NF: Tensor, h_NH: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        width = gate_NF.shape[1]
        # NOTE: gate and up gradients are written straight into one [N, 2F] buffer, which the
        # weight-gradient GEMM then reads as one contiguous matrix; no [N, F] temporaries.
        g_h_NH = torch.empty_like(h_NH)
        g_gate_NF, g_up_NF = g_h_NH[:, :width], g_h_NH[:, width:]
        torch.mul(g_act_NF, up_NF, out=g_gate_NF)
        torch.ops.aten.silu_backward.grad_input(g_gate_NF, gate_NF, grad_input=g_gate_NF)
        torch.ops.aten.silu.out(gate_NF, out=g_up_NF)
        g_up_NF.mul_(g_act_NF)
        return g_h_NH
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(g_act_NF, h_NH)
    # relu(h) > 0 exactly where h > 0, so h serves as the threshold input.
    return torch.ops.aten.threshold_backward(g_act_NF, h_NH, 0)


_ROWDOT_CHUNK = 1 << 20  # elements per chunk of _rowwise_dot: a 4 MB float32 buffer


def combine_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the combine weights are applied in: float32 (router precision) for float32,
    bf16 and fp16 experts; float64 for float64 experts, which float32 would round."""
    return torch.promote_types(dtype, torch.float32)


def _rowwise_dot(a_NF: Tensor, b_NF: Tensor) -> Tensor:
    """out[n] = <a[n], b[n]> in float32 (float64 for float64 rows): [N].

    NOTE: computed a few thousand rows at a time through one small product buffer, not as
    one [N, F] temporary: no peak-memory cost, and the buffer stays in cache (faster on CPU
    than both the full product and a batched [1, F] x [F, 1] matmul).
    """
    num_rows, width = a_NF.shape
    dtype = combine_dtype(a_NF.dtype)
    out_N = torch.empty(num_rows, dtype=dtype, device=a_NF.device)
    rows = max(1, _ROWDOT_CHUNK // max(width, 1))
    buffer = torch.empty(min(rows, num_rows), width, dtype=dtype, device=a_NF.device)
    for start in range(0, num_rows, rows):
        end = min(num_rows, start + rows)
        product = buffer[: end - start]
        # .to() is free for float32 rows; bf16 rows are upcast a chunk at a time.
        torch.mul(a_NF[start:end].to(dtype), b_NF[start:end].to(dtype), out=product)
        torch.sum(product, dim=-1, out=out_N[start:end])
    return out_N


class _ExpertsUp(torch.autograd.Function):
    """act = activation(x[token of row] @ w_in[expert of row]): [N, F]."""

    @staticmethod
    def forward(
        ctx,
        x_TD: Tensor,
        w_in_EDH: Tensor,
        token_of_row_N: Tensor,
        row_of_assignment_N: Tensor,
        bag_offsets_T: Tensor,
        group_ends_E: Tensor,
        counts: Sequence[int],
        activation: str,
        impl: str,
    ) -> Tensor:
        x_rows_ND = x_TD.index_select(0, token_of_row_N)
        h_NH = grouped_matmul(x_rows_ND, w_in_EDH, group_ends_E, counts, impl)
        act_NF = activate(h_NH, activation)
        ctx.save_for_backward(x_rows_ND, h_NH, w_in_EDH, row_of_assignment_N, bag_offsets_T, group_ends_E)
        ctx.counts, ctx.activation, ctx.impl = counts, activation, impl
        return act_NF

    @staticmethod
    def backward(ctx, g_act_NF: Tensor):
        x_rows_ND, h_NH, w_in_EDH, row_of_assignment_N, bag_offsets_T, group_ends_E = ctx.saved_tensors
        counts, impl = ctx.counts, ctx.impl
        needs_x, needs_w_in = ctx.needs_input_grad[:2]
        g_h_NH = _activation_backward(g_act_NF.contiguous(), h_NH, ctx.activation)
        g_w_in = grouped_weight_grad(x_rows_ND, g_h_NH, group_ends_E, counts, impl) if needs_w_in else None
        g_x_TD = None
        if needs_x:
            g_x_rows_ND = grouped_matmul(g_h_NH, w_in_EDH.transpose(1, 2), group_ends_E, counts, impl)
            del g_h_NH
            # A token's rows summed back into the token: embedding_bag over its bag of rows.
            g_x_TD = F.embedding_bag(row_of_assignment_N, g_x_rows_ND, bag_offsets_T, mode="sum")
        return g_x_TD, g_w_in, None, None, None, None, None, None, None


class _ExpertsDownCombine(torch.autograd.Function):
    """y[t] = Σ over t's rows of weight · (act @ w_out[expert of row]): [T, D] in combine_dtype."""

    @staticmethod
    def forward(
        ctx,
        act_NF: Tensor,
        weight_N: Tensor,
        w_out_EFD: Tensor,
        token_of_row_N: Tensor,
        row_of_assignment_N: Tensor,
        order_N: Tensor,
        bag_offsets_T: Tensor,
        group_ends_E: Tensor,
        counts: Sequence[int],
        impl: str,
    ) -> Tensor:
        out_ND = grouped_matmul(act_NF, w_out_EFD, group_ends_E, counts, impl)
        # NOTE: combine weights are applied in float32 (router precision); for bf16 experts
        # the rows are upcast first and y is cast back by the caller.
        dtype = combine_dtype(act_NF.dtype)
        y_TD = F.embedding_bag(
            row_of_assignment_N,
            out_ND.to(dtype),
            bag_offsets_T,
            mode="sum",
            per_sample_weights=weight_N.to(dtype),
        )
        ctx.save_for_backward(act_NF, weight_N, w_out_EFD, token_of_row_N, row_of_assignment_N, order_N, group_ends_E)
        ctx.counts, ctx.impl = counts, impl
        return y_TD

    @staticmethod
    def backward(ctx, g_y_TD: Tensor):
        act_NF, weight_N, w_out_EFD, token_of_row_N, row_of_assignment_N, order_N, group_ends_E = ctx.saved_tensors
        counts, impl = ctx.counts, ctx.impl
        needs_act, needs_weight, needs_w_out = ctx.needs_input_grad[:3]
        # NOTE: contiguous() because an upstream y.sum() hands us a zero-stride expanded
        # tensor, which CPU grouped_mm rejects.
        g_rows_ND = g_y_TD.contiguous().index_select(0, token_of_row_N).to(act_NF.dtype)
        weight_by_row_N1 = weight_N.to(combine_dtype(act_NF.dtype)).index_select(0, order_N)[:, None]
        g_act_NF = g_weight_N = g_w_out = None
        if needs_act or needs_weight:
            # u = g_rows @ w_out^T, so <u, act> = <g_rows, act @ w_out> = <g_rows, out>: the
            # routing weight's gradient without keeping out [N, D] from the forward.
            u_NF = grouped_matmul(g_rows_ND, w_out_EFD.transpose(1, 2), group_ends_E, counts, impl)
            if needs_weight:
                g_weight_N = _rowwise_dot(u_NF, act_NF).index_select(0, row_of_assignment_N).to(weight_N.dtype)
            if needs_act:
                g_act_NF = u_NF.mul_(weight_by_row_N1)
        if needs_w_out:
            g_out_ND = g_rows_ND.mul_(weight_by_row_N1)
            g_w_out = grouped_weight_grad(act_NF, g_out_ND, group_ends_E, counts, impl)
        return g_act_NF, g_weight_N, g_w_out, None, None, None, None, None, None, None


def fused_experts(
    x_TD: Tensor,
    weight_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    plan: DispatchPlan,
    activation: str,
    impl: str,
) -> Tensor:
    """y[t] = Σ_{assignments (t, e, w)} w · FFN_e(x[t]): [T, D], float32 (float64 for float64 experts)."""
    act_NF = _ExpertsUp.apply(
        x_TD,
        w_in_EDH,
        plan.token_of_row_N,
        plan.row_of_assignment_N,
        plan.bag_offsets_T,
        plan.group_ends_E,
        plan.tokens_per_expert,
        activation,
        impl,
    )
    return _ExpertsDownCombine.apply(
        act_NF,
        weight_N,
        w_out_EFD,
        plan.token_of_row_N,
        plan.row_of_assignment_N,
        plan.order_N,
        plan.bag_offsets_T,
        plan.group_ends_E,
        plan.tokens_per_expert,
        impl,
    )
