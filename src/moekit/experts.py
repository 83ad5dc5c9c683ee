"""Experts: the FFNs that tokens are routed to.

Shape suffixes: N rows (assignments, grouped by expert), D d_model, F expert hidden size,
H the first projection's width (2F for SwiGLU: gate then up; F otherwise), E experts.

``GroupedExperts`` stores all experts as two 3-D tensors, ``w_in`` [E, D, H] and ``w_out``
[E, F, D], laid out so that neither is transposed in the forward, and runs each projection
as one grouped GEMM over the expert groups (``torch.nn.functional.grouped_mm``, which works
on CPU and CUDA in torch >= 2.9). A per-expert matmul loop computes the same thing and is
kept as the readable reference and as the fallback where grouped GEMM is unavailable or the
layout is not 16-byte aligned. Empty experts cost nothing on either path.

``ModuleExperts`` runs any list of modules, MoE layers included (hierarchical MoE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit import matvec
from moekit.config import GATED_ACTIVATIONS, MoEConfig

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_available() -> bool:
    return _grouped_mm is not None


def _aligned(*tensors: Tensor) -> bool:
    """grouped_mm needs every non-unit stride a multiple of 16 bytes."""
    for tensor in tensors:
        if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        item = tensor.element_size()
        for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
            if size > 1 and stride != 1 and (stride * item) % 16 != 0:
                return False
        if tensor.data_ptr() % 16 != 0:
            return False
    return True


def use_grouped_mm(impl: str, *tensors: Tensor) -> bool:
    if impl == "loop" or _grouped_mm is None:
        return False
    return _aligned(*tensors)


def grouped_matmul(
    rows_NK: Tensor, weight_EKM: Tensor, group_ends_E: Tensor, counts: Sequence[int], impl: str
) -> Tensor:
    """out[rows of expert e] = rows[rows of expert e] @ weight[e]: [N, M]."""
    if use_grouped_mm(impl, rows_NK, weight_EKM):
        return _grouped_mm(rows_NK, weight_EKM, offs=group_ends_E)
    out_NM = rows_NK.new_empty(rows_NK.shape[0], weight_EKM.shape[2])
    start = 0
    for expert, count in enumerate(counts):
        if count:
            torch.matmul(
                rows_NK[start : start + count], weight_EKM[expert], out=out_NM[start : start + count]
            )
        start += count
    return out_NM


def grouped_weight_grad(
    rows_NK: Tensor, grad_NM: Tensor, group_ends_E: Tensor, counts: Sequence[int], impl: str
) -> Tensor:
    """grad_weight[e] = rows[expert e]^T @ grad[expert e]: [E, K, M] (zeros for empty e)."""
    rows_KN = rows_NK.t()
    if use_grouped_mm(impl, rows_KN, grad_NM):
        return _grouped_mm(rows_KN, grad_NM, offs=group_ends_E)
    grad_EKM = rows_NK.new_zeros(len(counts), rows_NK.shape[1], grad_NM.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        if count:
            torch.matmul(
                rows_KN[:, start : start + count], grad_NM[start : start + count], out=grad_EKM[expert]
            )
        start += count
    return grad_EKM


class GroupedMatmul(torch.autograd.Function):
    """Differentiable ``grouped_matmul``: out[rows of expert e] = rows[rows of expert e] @ weight[e].

    ``GroupedMatmul.apply(rows_NK, weight_EKM, group_ends_E, counts, impl)``: rows grouped by
    expert (``counts[e]`` rows for expert e, in order; ``group_ends_E`` their int32 cumulative
    sums), ``impl`` "auto" (grouped GEMM where available and aligned) or "loop". Its backward
    is two grouped GEMMs (g_rows = g_out @ weight[e]^T, g_weight[e] = rows^T @ g_out), zeros
    for an empty expert. Used by the unfused expert path and by the multi-task experts.
    """

    @staticmethod
    def forward(ctx, rows_NK, weight_EKM, group_ends_E, counts, impl):
        ctx.save_for_backward(rows_NK, weight_EKM, group_ends_E)
        ctx.counts, ctx.impl = counts, impl
        return grouped_matmul(rows_NK, weight_EKM, group_ends_E, counts, impl)

    @staticmethod
    def backward(ctx, grad_NM):
        rows_NK, weight_EKM, group_ends_E = ctx.saved_tensors
        grad_NM = grad_NM.contiguous()
        grad_rows = grouped_matmul(grad_NM, weight_EKM.transpose(1, 2), group_ends_E, ctx.counts, ctx.impl)
        grad_weight = grouped_weight_grad(rows_NK, grad_NM, group_ends_E, ctx.counts, ctx.impl)
        return grad_rows, grad_weight, None, None, None


def activate(h_NH: Tensor, activation: str, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> Tensor:
    """The expert nonlinearity; SwiGLU reads h as [gate | up] (Shazeer 2020, eq. 6).

    ``clamped_swiglu`` is GPT-OSS's: gate clamped to <= limit, up to [-limit, limit], and
    (up + 1) · gate · sigmoid(alpha · gate).
    """
    if activation == "swiglu":
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        return F.silu(gate_NF) * up_NF
    if activation == "clamped_swiglu":
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        gate_NF = gate_NF.clamp(max=swiglu_limit)
        up_NF = up_NF.clamp(min=-swiglu_limit, max=swiglu_limit)
        return (up_NF + 1) * (gate_NF * torch.sigmoid(gate_NF * swiglu_alpha))
    if activation == "gelu":
        return F.gelu(h_NH)
    if activation == "relu":
        return F.relu(h_NH)
    raise ValueError(f"activation={activation!r} is invalid: use swiglu, clamped_swiglu, gelu or relu")


def hidden_width(config: MoEConfig, d_ff: int) -> int:
    return 2 * d_ff if config.activation in GATED_ACTIVATIONS else d_ff


def combine_assignments(
    out_ND: Tensor, token_idx_N: Tensor, weight_N: Tensor, num_tokens: int, fusable: bool
) -> Tensor:
    """y[t] = Σ weight · out over token t's assignments (rows in assignment order), float32
    [T, D]: the decode fast path's combine, with the same reduction as the path it replaces
    (``fusable``: the fused path's embedding_bag; else the dispatcher's index_add), so that the
    sums round alike."""
    if fusable:
        rows_N = torch.arange(token_idx_N.numel(), device=out_ND.device)
        if num_tokens == 1:  # one bag holding every row: no counting needed
            bag_offsets_T = torch.zeros(1, dtype=torch.long, device=out_ND.device)
        else:
            per_token_T = torch.bincount(token_idx_N, minlength=num_tokens)
            bag_offsets_T = torch.cumsum(per_token_T, 0) - per_token_T
        return F.embedding_bag(rows_N, out_ND.float(), bag_offsets_T, mode="sum", per_sample_weights=weight_N.float())
    weighted_ND = out_ND.float() * weight_N.float()[:, None]
    return weighted_ND.new_zeros(num_tokens, out_ND.shape[1]).index_add(0, token_idx_N, weighted_ND)


class GroupedExperts(nn.Module):
    """E expert FFNs as 3-D weights: w_in [E, D, H], w_out [E, F, D]."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.activation = config.activation
        self.impl = config.expert_impl
        width = hidden_width(config, config.d_ff)
        self.w_in = nn.Parameter(torch.empty(config.num_experts, config.d_model, width))
        self.w_out = nn.Parameter(torch.empty(config.num_experts, config.d_ff, config.d_model))
        # GPT-OSS experts add a bias after each projection: b_in [E, H], b_out [E, D].
        self.b_in = nn.Parameter(torch.zeros(config.num_experts, width)) if config.expert_biases else None
        self.b_out = nn.Parameter(torch.zeros(config.num_experts, config.d_model)) if config.expert_biases else None
        self.dropout = nn.Dropout(config.expert_dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Per expert, the scale of nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.config.d_model), 1 / math.sqrt(self.config.d_model))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.config.d_ff), 1 / math.sqrt(self.config.d_ff))
        for bias in (self.b_in, self.b_out):
            if bias is not None:
                nn.init.zeros_(bias)

    def stacked_weights(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(w_in, w_out, b_in, b_out): every expert at once, for the decode's one C call."""
        return self.w_in, self.w_out, self.b_in, self.b_out

    @property
    def fusable(self) -> bool:
        """Whether the fused path (which knows no bias and no clamped SwiGLU) computes this."""
        return self.b_in is None and self.activation != "clamped_swiglu"

    def forward_per_assignment(
        self, x_TD: Tensor, token_idx_N: Tensor, expert_idx_N: Tensor, weight_N: Tensor
    ) -> Tensor:
        """y[t] = Σ over t's assignments of weight · FFN_e(x[t]), float32 [T, D], one
        row-times-expert-matrix product per assignment (N = T·k of them).

        NOTE: the decode fast path. For a handful of tokens the sort, the grouping and the
        grouped GEMM's bookkeeping cost more than the math. The expert weights are used as
        views (``w_in[e]``): gathering them into an [N, D, H] batch would copy every selected
        expert's weights once more per token, which costs more than the matmuls themselves.
        """
        config = self.config
        rows = []
        # NOTE: w_in[e] [D, H] and w_out[e] [F, D] are views of one expert's stored matrix (the
        # expert index is the outermost dimension; either set_expert_layout layout), so each
        # product reads the stored weights with no copy, through moekit.matvec's streaming
        # kernels in inference (torch's matmul otherwise).
        w_in_EDH, w_out_EFD = self.w_in, self.w_out
        if x_TD.shape[0] == 1 and matvec.applies_experts(x_TD, w_in_EDH, w_out_EFD):
            # One token (decoding): its k experts and their weighted sum in one C call (the
            # ops below, each product summed as moekit.matvec sums it, without their ~10 small
            # torch ops per layer and step).
            return matvec.experts_ffn(
                x_TD, w_in_EDH, w_out_EFD, expert_idx_N.tolist(), weight_N, config.activation,
                config.swiglu_alpha, config.swiglu_limit, self.b_in, self.b_out,
            )
        for token, expert in zip(token_idx_N.tolist(), expert_idx_N.tolist(), strict=True):
            h_1H = matvec.vecmat(x_TD[token : token + 1], w_in_EDH[expert])
            if self.b_in is not None:
                h_1H = h_1H + self.b_in[expert]
            act_1F = self.dropout(activate(h_1H, self.activation, config.swiglu_alpha, config.swiglu_limit))
            out_1D = matvec.vecmat(act_1F, w_out_EFD[expert])
            if self.b_out is not None:
                out_1D = out_1D + self.b_out[expert]
            rows.append(out_1D)
        return combine_assignments(torch.cat(rows, dim=0), token_idx_N, weight_N, x_TD.shape[0], self.fusable)

    def forward(self, x_ND: Tensor, group_ends_E: Tensor, counts: Sequence[int]) -> Tensor:
        """Rows grouped by expert (``counts[e]`` rows for expert e, in order) → [N, D]."""
        config = self.config
        h_NH = GroupedMatmul.apply(x_ND, self.w_in, group_ends_E, counts, self.impl)
        expert_of_row_N = None
        if self.b_in is not None:
            if self.b_in.shape[0] != len(counts):
                raise ValueError(
                    f"GroupedExperts has biases for {self.b_in.shape[0]} experts but runs {len(counts)}: "
                    "expert biases (MoEConfig.expert_biases=True) are not sharded by expert parallelism"
                )
            counts_E = torch.tensor(counts, device=x_ND.device)
            expert_of_row_N = torch.repeat_interleave(torch.arange(len(counts), device=x_ND.device), counts_E)
            h_NH = h_NH + self.b_in.index_select(0, expert_of_row_N)
        act_NF = self.dropout(activate(h_NH, self.activation, config.swiglu_alpha, config.swiglu_limit))
        out_ND = GroupedMatmul.apply(act_NF, self.w_out, group_ends_E, counts, self.impl)
        if self.b_out is not None:
            out_ND = out_ND + self.b_out.index_select(0, expert_of_row_N)
        return out_ND


EXPERT_LAYOUTS = ("cols", "rows")


def set_expert_layout(module: nn.Module, layout: str) -> int:
    """Lay every ``GroupedExperts``' ``w_in`` / ``w_out`` inside ``module`` out as ``layout``,
    in place (``param.data`` replaced; shapes, values and names unchanged); returns how many
    tensors moved. ``"cols"``: moekit's [E, I, O] row-major storage. ``"rows"``: each expert
    stored [O, I] (nn.Linear's layout, and transformers' experts') and viewed as [I, O].

    NOTE: for inference. Every path computes the same function on either layout (grouped
    GEMM and matmul take the transposed view as it is), but a decoded token reads each of its
    experts' matrices once, and moekit.matvec reads the "rows" layout as one sequential stream
    per thread: 1.3-1.6x the "cols" kernel's rate in bfloat16 on a 2-core AMD EPYC (about equal
    in float32). Their sums differ in order: a model and its offloaded copy compare bitwise only
    on the same layout (expert stores hold "cols")."""
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: use one of {', '.join(EXPERT_LAYOUTS)}")
    moved = 0
    with torch.no_grad():
        for experts in module.modules():
            if not isinstance(experts, GroupedExperts):
                continue
            for param in (experts.w_in, experts.w_out):
                if matvec.expert_layout(param) == layout:
                    continue
                if layout == "cols":
                    param.data = param.data.contiguous()
                else:
                    param.data = param.data.transpose(1, 2).contiguous().transpose(1, 2)
                moved += 1
    return moved


class ModuleExperts(nn.Module):
    """Any modules as experts, each mapping [n, D] -> [n, D]; ``moekit.MoE`` layers too."""

    def __init__(self, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(experts) == 0:
            raise ValueError("ModuleExperts needs at least one expert module, got 0")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(self.experts)

    def forward(self, x_ND: Tensor, group_ends_E: Tensor, counts: Sequence[int]) -> Tensor:
        outputs = []
        start = 0
        for expert, count in zip(self.experts, counts, strict=True):
            if count:
                outputs.append(expert(x_ND[start : start + count]))
            start += count
        if not outputs:  # no rows at all
            return torch.zeros_like(x_ND)
        return torch.cat(outputs, dim=0)


class DenseFFN(nn.Module):
    """One FFN applied to every row: the shared experts, and the dense baseline."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: str,
        dropout: float = 0.0,
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit
        width = 2 * d_ff if activation in GATED_ACTIVATIONS else d_ff
        self.w_in = nn.Parameter(torch.empty(d_model, width))
        self.w_out = nn.Parameter(torch.empty(d_ff, d_model))
        self.dropout = nn.Dropout(dropout)
        nn.init.uniform_(self.w_in, -1 / math.sqrt(d_model), 1 / math.sqrt(d_model))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(d_ff), 1 / math.sqrt(d_ff))

    def forward(self, x_ND: Tensor) -> Tensor:
        # One row in inference (decoding) streams the weights through moekit.matvec.
        act_NF = activate(matvec.vecmat(x_ND, self.w_in), self.activation, self.swiglu_alpha, self.swiglu_limit)
        return matvec.vecmat(self.dropout(act_NF), self.w_out)


class SharedExperts(nn.Module):
    """Experts every token goes through (DeepSeekMoE), as one dense FFN of width
    num_shared_experts · shared_expert_d_ff, optionally scaled by a per-token sigmoid gate
    (Qwen2-MoE's shared_expert_gate)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.ffn = DenseFFN(
            config.d_model, config.shared_d_ff, config.activation, config.expert_dropout,
            config.swiglu_alpha, config.swiglu_limit,
        )
        self.gate = nn.Linear(config.d_model, 1, bias=False) if config.shared_expert_gate else None

    def forward(self, x_TD: Tensor) -> Tensor:
        out_TD = self.ffn(x_TD)
        if self.gate is not None:
            out_TD = torch.sigmoid(self.gate(x_TD)) * out_TD
        return out_TD
