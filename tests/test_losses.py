"""Every auxiliary loss at a hand-computed value, and against the naive reference.

pytest tests/test_losses.py
"""

from __future__ import annotations

import math

import pytest
import torch

import moekit
from moekit import MoE, MoEConfig
from moekit.losses import balance_loss, cv_squared, router_entropy, z_loss
from tests import naive


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_uniform_routing_balance_loss_is_one(top_k):
    num_tokens, num_experts = 16, 8
    scores_TE = torch.full((num_tokens, num_experts), 1.0 / num_experts)
    selected_E = torch.full((num_experts,), num_tokens * top_k / num_experts)
    assert balance_loss(scores_TE, selected_E, top_k).item() == pytest.approx(1.0)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_all_tokens_on_one_expert_balance_loss_is_E_over_k(top_k):
    num_tokens, num_experts = 10, 8
    scores_TE = torch.zeros(num_tokens, num_experts)
    scores_TE[:, 0] = 1.0
    selected_E = torch.zeros(num_experts)
    selected_E[0] = num_tokens  # every token's first choice
    selected_E[1:top_k] = num_tokens  # the other choices get probability 0
    assert balance_loss(scores_TE, selected_E, top_k).item() == pytest.approx(num_experts / top_k)


def test_balance_loss_hand_computed():
    # E=2, T=2, k=1: n = [2, 0], P = [(0.75+0.25)/2, (0.25+0.75)/2] = [0.5, 0.5]
    scores_TE = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    loss = balance_loss(scores_TE, torch.tensor([2.0, 0.0]), 1)
    assert loss.item() == pytest.approx(2 / 2 * (2 * 0.5))


def test_zero_logits_z_loss_is_log_E_squared():
    for num_experts in (2, 8, 64):
        assert z_loss(torch.zeros(5, num_experts)).item() == pytest.approx(math.log(num_experts) ** 2)


def test_z_loss_hand_computed():
    logits_TE = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    expected = (math.log(1 + 3) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert z_loss(logits_TE).item() == pytest.approx(expected, rel=1e-6)


def test_cv_squared_hand_computed():
    assert cv_squared(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.5)  # var 2 / mean² 4
    assert cv_squared(torch.tensor([2.0, 2.0, 2.0])).item() == pytest.approx(0.0)
    assert cv_squared(torch.tensor([5.0])).item() == 0.0


def test_router_entropy_uniform_is_log_E():
    assert router_entropy(torch.full((3, 8), 1 / 8)).item() == pytest.approx(math.log(8))
    assert router_entropy(torch.eye(4)).item() == pytest.approx(0.0)


@pytest.mark.parametrize("router", ["topk", "switch", "gshard", "aux_free"])
def test_layer_balance_and_z_loss_match_reference(router):
    torch.manual_seed(0)
    top_k = 1 if router == "switch" else 2
    config = MoEConfig(
        d_model=16, d_ff=8, num_experts=4, top_k=top_k, router=router, balance_loss_coef=0.5,
        z_loss_coef=0.25, capacity_factor=0.5, min_capacity=0, second_expert_policy="all",
    )
    layer = MoE(config).train()
    x = torch.randn(20, 16)
    layer(x)
    assignments, probs_TE = naive.route(layer, x)
    expected_balance = naive.balance_loss(probs_TE, assignments, 4, top_k)  # before dropping
    logits_TE = x @ layer.router.weight.t()
    expected_z = torch.logsumexp(logits_TE, -1).square().mean().item()
    terms = layer.last_aux_losses
    assert terms["balance"].item() == pytest.approx(0.5 * expected_balance, rel=1e-5)
    assert terms["z"].item() == pytest.approx(0.25 * expected_z, rel=1e-5)


def test_noisy_topk_importance_and_load_match_paper_formulas():
    torch.manual_seed(1)
    config = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, router="noisy_topk")
    layer = MoE(config).train()
    with torch.no_grad():
        layer.router.noise_weight.normal_(0, 0.5)
    x = torch.randn(30, 8)
    torch.manual_seed(2)
    layer(x)
    torch.manual_seed(2)
    # Replay the noise draw: the router's first random call is its randn over [T, E].
    clean = x @ layer.router.weight.t()
    std = torch.nn.functional.softplus(x @ layer.router.noise_weight.t()) + 1e-2
    noisy = clean + torch.randn(30, 4) * std
    gates = torch.zeros(30, 4)
    load = torch.zeros(4)
    normal = torch.distributions.Normal(0.0, 1.0)
    for t in range(30):
        order = sorted(range(4), key=lambda e: -noisy[t, e].item())
        kept = noisy[t, order[:2]].softmax(-1)
        gates[t, order[0]], gates[t, order[1]] = kept[0], kept[1]
        for e in range(4):
            others = sorted((noisy[t, j].item() for j in range(4) if j != e), reverse=True)
            kth_excluding = others[1]  # k-th largest of the others, k = 2
            load[e] += normal.cdf((clean[t, e] - kth_excluding) / std[t, e])

    def cv2(v):
        return (v.var() / v.mean() ** 2).item()

    terms = layer.last_aux_losses
    assert terms["importance"].item() == pytest.approx(0.1 * cv2(gates.sum(0)), rel=1e-4)
    assert terms["load"].item() == pytest.approx(0.1 * cv2(load), rel=1e-4)
    # The load loss is differentiable in both the gate and the noise projection.
    terms["load"].backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.router.noise_weight.grad.abs().sum() > 0


def test_uniform_router_gives_loss_one_and_z_log_E_squared_in_layer():
    config = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, balance_loss_coef=1.0, z_loss_coef=1.0)
    layer = MoE(config).train()
    with torch.no_grad():
        layer.router.weight.zero_()  # all logits 0: uniform scores; ties split evenly below
    x = torch.randn(8, 8)
    layer(x)
    # top-k of equal scores picks experts 0 and 1 for every token: n = [8, 8, 0, 0], P = 1/4
    assert layer.last_aux_losses["balance"].item() == pytest.approx(4 / 16 * (8 * 0.25 + 8 * 0.25))
    assert layer.last_aux_losses["z"].item() == pytest.approx(math.log(4) ** 2)
    assert moekit.routing_stats(layer)[""].router_entropy == pytest.approx(math.log(4))
