"""Naive reference implementation of the MoE layer: the spec the fast paths are tested against.

Everything here is a Python loop over tokens, experts and assignments, with no sorting
tricks, no grouped GEMM and no custom autograd: slow and obviously right. It reads the
parameters of a ``moekit.MoE`` so outputs and gradients can be compared one to one.
Randomness (jitter, noise, GShard's random second expert) is not modelled: compare in
eval mode, or in training mode with deterministic settings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ffn(x_D, w_in_DH, w_out_FD, activation):
    h = x_D @ w_in_DH
    if activation == "swiglu":
        width = h.shape[-1] // 2
        act = F.silu(h[..., :width]) * h[..., width:]
    elif activation == "gelu":
        act = F.gelu(h)
    else:
        act = F.relu(h)
    return act @ w_out_FD


def route(layer, x_TD):
    """A list of (token, expert, weight, rank, score) and the per-token probability rows."""
    cfg = layer.config
    E, k = cfg.num_experts, cfg.top_k
    W = layer.router.weight.float()
    T = x_TD.shape[0]
    assignments = []
    if cfg.router == "expert_choice":
        logits = x_TD.float() @ W.t()
        probs = logits.softmax(-1)
        cf = layer.active_capacity_factor
        C = max(cfg.min_capacity, math.ceil((1.0 if cf is None else cf) * T * k / E))
        C = min(C, T)
        for e in range(E):
            ranked = sorted(range(T), key=lambda t: -probs[t, e].item())
            for rank, t in enumerate(ranked[:C]):
                assignments.append((t, e, probs[t, e], rank, probs[t, e].item()))
        assignments.sort(key=lambda a: a[0])
        return assignments, probs
    rows = []
    for t in range(T):
        logits = x_TD[t].float() @ W.t()
        if cfg.router == "aux_free":
            scores = logits.sigmoid()
            biased = [(scores[e] + layer.router.expert_bias[e]).item() for e in range(E)]
            allowed = list(range(E))
            if cfg.n_group > 1:
                per = E // cfg.n_group
                group_score = []
                for g in range(cfg.n_group):
                    best = sorted(biased[g * per : (g + 1) * per], reverse=True)[: min(2, per)]
                    group_score.append(sum(best))
                groups = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
                allowed = [e for e in range(E) if e // per in groups]
            chosen = sorted(allowed, key=lambda e: -biased[e])[:k]
            weights = [scores[e] for e in chosen]
            if cfg.normalize_weights:
                total = sum(weights)
                weights = [w / total for w in weights]
            weights = [w * cfg.routed_scaling_factor for w in weights]
            rows.append(scores / scores.sum())
        else:
            probs = logits.softmax(-1)
            rows.append(probs)
            chosen = sorted(range(E), key=lambda e: -probs[e].item())[:k]
            if cfg.router == "noisy_topk":
                kept = torch.stack([logits[e] for e in chosen]).softmax(-1)
                weights = [kept[j] for j in range(k)]
            else:
                weights = [probs[e] for e in chosen]
                normalize = cfg.router == "gshard" or (cfg.router == "topk" and cfg.normalize_weights)
                if normalize:
                    total = sum(weights)
                    weights = [w / total for w in weights]
        for rank, (e, w) in enumerate(zip(chosen, weights, strict=True)):
            assignments.append((t, e, w, rank, rows[-1][e].item()))
    return assignments, torch.stack(rows) if rows else x_TD.new_zeros(0, E)


def apply_capacity(layer, assignments, T):
    cfg = layer.config
    cf = layer.active_capacity_factor
    if cf is None or cfg.router == "expert_choice":
        return assignments
    C = max(cfg.min_capacity, math.ceil(cf * T * cfg.top_k / cfg.num_experts))
    if cfg.drop_priority == "position":
        ordered = sorted(range(len(assignments)), key=lambda i: (assignments[i][3], assignments[i][0]))
    elif cfg.drop_priority == "score":
        ordered = sorted(range(len(assignments)), key=lambda i: -assignments[i][4])
    else:
        raise ValueError("random priority has no deterministic reference")
    taken = [0] * cfg.num_experts
    keep = set()
    for i in ordered:
        e = assignments[i][1]
        if taken[e] < C:
            taken[e] += 1
            keep.add(i)
    return [a for i, a in enumerate(assignments) if i in keep]


def moe_forward(layer, x, token_mask=None):
    """y = Σ_assignments w · FFN_e(x_t) (+ shared experts), token by token."""
    cfg = layer.config
    x_TD = x.reshape(-1, cfg.d_model)
    valid = (
        list(range(x_TD.shape[0]))
        if token_mask is None
        else [i for i, m in enumerate(token_mask.reshape(-1).tolist()) if m]
    )
    xv = x_TD[valid] if valid else x_TD[:0]
    T = xv.shape[0]
    assignments, _ = route(layer, xv)
    assignments = apply_capacity(layer, assignments, T)
    experts = layer.experts
    out_rows = [torch.zeros(cfg.d_model, dtype=torch.float32) for _ in range(T)]
    for t, e, w, _, _ in assignments:
        if hasattr(experts, "w_in"):
            expert_out = ffn(xv[t], experts.w_in[e], experts.w_out[e], cfg.activation)
        else:
            expert_out = experts.experts[e](xv[t : t + 1])[0]
        out_rows[t] = out_rows[t] + w * expert_out.float()
    y = torch.stack(out_rows).to(x.dtype) if T else xv.new_zeros(0, cfg.d_model)
    if layer.shared_experts is not None:
        shared = layer.shared_experts
        rows = []
        for t in range(T):
            out = ffn(xv[t], shared.ffn.w_in, shared.ffn.w_out, cfg.activation)
            if shared.gate is not None:
                out = torch.sigmoid(xv[t] @ shared.gate.weight[0]) * out
            rows.append(out)
        if rows:
            y = y + torch.stack(rows)
    full = [torch.zeros(cfg.d_model, dtype=x.dtype) for _ in range(x_TD.shape[0])]
    for j, i in enumerate(valid):
        full[i] = y[j]
    if not full:
        return y.reshape(x.shape)
    return torch.stack(full).reshape(x.shape)


def balance_loss(probs_TE, assignments_before_capacity, num_experts, top_k):
    T = probs_TE.shape[0]
    n = [0] * num_experts
    for _, e, _, _, _ in assignments_before_capacity:
        n[e] += 1
    P = [probs_TE[:, e].sum().item() / T for e in range(num_experts)]
    return num_experts / (T * top_k) * sum(n[e] * P[e] for e in range(num_experts))
