"""Router behaviour beyond the reference comparison: randomness only in training, GShard's
second-expert policies at their expected rates, expert choice's exact capacity, and the
aux-loss-free bias moving load toward balance.

    pytest tests/test_routing.py
"""

from __future__ import annotations

import math

import pytest
import torch

import moekit
from moekit import MoE, MoEConfig


def gshard_layer(policy: str, threshold: float = 0.2) -> MoE:
    config = MoEConfig(
        d_model=8, d_ff=8, num_experts=4, top_k=2, router="gshard",
        second_expert_policy=policy, second_expert_threshold=threshold,
    )
    layer = MoE(config)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, 0] = torch.tensor([1.2, 0.1, 0.0, -0.5])
    return layer


def identical_tokens(num_tokens: int) -> torch.Tensor:
    x = torch.zeros(num_tokens, 8)
    x[:, 0] = 1.0
    return x


def second_weight(layer: MoE) -> float:
    probs = torch.tensor([1.2, 0.1, 0.0, -0.5]).softmax(-1)
    top2 = probs.topk(2).values
    return (top2[1] / top2.sum()).item()


@pytest.mark.parametrize(("policy", "rate"), [("random", 2.0), ("threshold_random", 1 / 0.5)])
def test_gshard_random_policies_keep_second_expert_at_expected_rate(policy, rate):
    torch.manual_seed(0)
    layer = gshard_layer(policy, threshold=0.5).train()
    num_tokens = 20000
    layer(identical_tokens(num_tokens))
    g2 = second_weight(layer)  # ≈ 0.25 for these logits
    expected = min(1.0, rate * g2)  # random: 2·g2; threshold_random: g2 / threshold
    kept = moekit.routing_stats(layer)[""].tokens_per_expert[1]
    sigma = math.sqrt(expected * (1 - expected) / num_tokens)
    assert abs(kept / num_tokens - expected) < 4 * sigma
    assert 0.2 < expected < 0.9  # the test is not vacuous


def test_gshard_sample_policy_draws_second_expert_in_proportion():
    torch.manual_seed(1)
    layer = gshard_layer("sample").train()
    num_tokens = 20000
    layer(identical_tokens(num_tokens))
    probs = torch.tensor([1.2, 0.1, 0.0, -0.5]).softmax(-1)
    counts = moekit.routing_stats(layer)[""].tokens_per_expert
    assert counts[0] == num_tokens  # the first expert is the argmax, always kept
    rest = probs[1:] / probs[1:].sum()
    for expert in (1, 2, 3):
        expected = rest[expert - 1].item()
        sigma = math.sqrt(expected * (1 - expected) / num_tokens)
        assert abs(counts[expert] / num_tokens - expected) < 4 * sigma


@pytest.mark.parametrize("policy", ["random", "threshold_random", "sample", "all"])
def test_gshard_policies_are_deterministic_in_eval(policy):
    layer = gshard_layer(policy).eval()
    layer(identical_tokens(1000))
    assert moekit.routing_stats(layer)[""].tokens_per_expert == [1000, 1000, 0, 0]


def test_gshard_all_policy_always_keeps_second():
    layer = gshard_layer("all").train()
    layer(identical_tokens(500))
    assert moekit.routing_stats(layer)[""].tokens_per_expert == [500, 500, 0, 0]


@pytest.mark.parametrize(
    ("num_tokens", "capacity_factor", "top_k"), [(40, 1.0, 2), (33, 2.0, 1), (5, 4.0, 2)]
)
def test_expert_choice_gives_every_expert_exactly_C_tokens(num_tokens, capacity_factor, top_k):
    torch.manual_seed(2)
    config = MoEConfig(
        d_model=8, d_ff=8, num_experts=4, top_k=top_k, router="expert_choice",
        capacity_factor=capacity_factor, min_capacity=0,
    )
    layer = MoE(config).train()
    layer(torch.randn(num_tokens, 8))
    stats = moekit.routing_stats(layer)[""]
    capacity = min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / 4))
    assert stats.capacity == capacity
    assert stats.tokens_per_expert == [capacity] * 4


def test_switch_jitter_touches_router_input_only_in_training():
    torch.manual_seed(3)
    config = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=1, router="switch", router_jitter=0.1)
    layer = MoE(config)
    layer.fused = False
    seen = {}
    original = layer.router.compute_logits

    def spy(x_TD):
        seen["router_input"] = x_TD.clone()
        return original(x_TD)

    layer.router.compute_logits = spy
    layer.experts.register_forward_hook(lambda m, args, out: seen.__setitem__("expert_input", args[0]))
    x = torch.randn(50, 8)
    layer.train()
    layer(x)
    ratio = seen["router_input"] / x
    assert not torch.allclose(ratio, torch.ones_like(ratio))
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6
    # Experts see exact rows of x (no jitter).
    rows = seen["expert_input"]
    assert all(any(torch.equal(row, x_row) for x_row in x) for row in rows)
    layer.eval()
    layer(x)
    assert torch.equal(seen["router_input"], x)


def test_noisy_topk_noise_only_in_training():
    config = MoEConfig(d_model=8, d_ff=8, num_experts=6, top_k=2, router="noisy_topk")
    layer = MoE(config)
    x = torch.randn(30, 8)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), atol=0, rtol=0)
    layer.train()
    torch.manual_seed(4)
    a = layer(x)
    b = layer(x)
    assert not torch.equal(a, b)


@pytest.mark.slow
def test_aux_free_bias_moves_load_toward_balance():
    torch.manual_seed(5)
    config = MoEConfig(
        d_model=8, d_ff=8, num_experts=8, top_k=2, router="aux_free", bias_update_rate=0.01,
        balance_loss_coef=0.0,
    )
    layer = MoE(config).train()
    with torch.no_grad():
        layer.router.weight.mul_(0.3)
        layer.router.weight[0] += 0.4  # experts 0 skews the load
    x = torch.randn(512, 8)
    x[:, :] += 0.5
    layer(x)
    initial = moekit.routing_stats(layer)[""].load_imbalance
    before = layer.router.expert_bias.clone()
    layer(x)  # forward alone never moves the bias
    assert torch.equal(layer.router.expert_bias, before)
    for _ in range(150):
        layer(x)
        moekit.update_expert_bias(layer)
    final = moekit.routing_stats(layer)[""].load_imbalance
    assert initial > 1.8
    assert final < 1.25
    assert layer.router.expert_bias[0] < 0  # the overloaded expert was pushed down


def test_aux_free_bias_update_counts_forwards_since_last_step():
    layer = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=1, router="aux_free"))
    layer.train()
    layer(torch.randn(10, 8))
    layer(torch.randn(6, 8))
    assert layer.router.load_since_update.sum().item() == 16
    moekit.update_expert_bias(layer)
    assert layer.router.load_since_update.sum().item() == 0
    layer.eval()
    layer(torch.randn(10, 8))
    assert layer.router.load_since_update.sum().item() == 0  # eval does not count


@pytest.mark.parametrize("router", ["topk", "switch", "gshard", "noisy_topk", "expert_choice", "aux_free"])
def test_router_projection_is_one_named_parameter(router):
    top_k = 1 if router == "switch" else 2
    layer = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=top_k, router=router))
    params = dict(layer.named_parameters())
    assert params["router.weight"].shape == (4, 8)
    # The aux-free selection bias is state (saved with the weights), never a trained parameter.
    assert ("router.expert_bias" in layer.state_dict()) == (router == "aux_free")
    assert "router.expert_bias" not in params


@pytest.mark.parametrize("router", ["topk", "switch", "gshard", "noisy_topk", "expert_choice", "aux_free"])
def test_router_logits_are_float32_under_bf16_autocast(router):
    # `moekit train --bf16` runs the forward under torch.autocast, which would run the gate's
    # matmul in bf16 even on float32 inputs; selective precision needs the logits computed in
    # float32: the same bits as without autocast, for float32 and bf16 inputs alike.
    top_k = 1 if router == "switch" else 2
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=64, d_ff=8, num_experts=8, top_k=top_k, router=router)).eval()
    x_TD = torch.randn(16, 64)
    reference_TE = layer.router.compute_logits(x_TD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_TE = layer.router.compute_logits(x_TD)
        from_bf16_TE = layer.router.compute_logits(x_TD.bfloat16())
        routed = layer.route(x_TD, None)
    assert logits_TE.dtype == torch.float32 and torch.equal(logits_TE, reference_TE)
    assert torch.equal(from_bf16_TE, layer.router.compute_logits(x_TD.bfloat16().float()))
    assert routed.logits_TE.dtype == torch.float32 and torch.equal(routed.logits_TE, reference_TE)
    # Without the guard, bf16 autocast rounds the logits (the check has teeth).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded_TE = torch.nn.functional.linear(x_TD, layer.router.weight)
    assert rounded_TE.dtype == torch.bfloat16 and not torch.equal(rounded_TE.float(), reference_TE)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_finite_check_flags_exactly_the_non_finite_logits(bad):
    # The check sums the logits in float64: huge finite logits whose float32 sum would overflow
    # pass, one NaN or inf among them does not, and +inf with -inf (a NaN sum) does not either.
    from moekit.layer import NonFiniteRouterLogitsError

    layer = MoE(MoEConfig(d_model=4, d_ff=8, num_experts=4, top_k=2))
    huge_TE = torch.full((8, 4), 3e38)
    layer.router.compute_logits = lambda x_TD: huge_TE  # type: ignore[method-assign]
    assert not torch.isfinite(huge_TE.sum())  # float32 would overflow here
    layer.router.checked_logits(torch.zeros(8, 4))  # finite: no error
    if bad is None:
        huge_TE[0, 0], huge_TE[1, 1] = float("inf"), float("-inf")
    else:
        huge_TE[3, 2] = bad
    with pytest.raises(NonFiniteRouterLogitsError):
        layer.router.checked_logits(torch.zeros(8, 4))
