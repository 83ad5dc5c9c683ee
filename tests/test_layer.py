"""The MoE layer against the naive per-token reference (tests/naive.py).

Verifies, in fp32 to 1e-5, outputs and gradients (input, router, experts, shared experts)
for every router, dropless and with capacity, every activation; the grouped-GEMM path
against the per-expert loop; the fused path against plain autograd; and the edge cases
(empty input, any leading shape, bf16, zero-stride upstream gradient, padding masks).

    pytest tests/test_layer.py
"""

from __future__ import annotations

import copy

import pytest
import torch

import moekit
from moekit import MoE, MoEConfig
from moekit.layer import NonFiniteRouterLogitsError
from tests import naive

ROUTERS = ["topk", "switch", "gshard", "noisy_topk", "expert_choice", "aux_free"]
ACTIVATIONS = ["swiglu", "gelu", "relu"]


def make_config(router: str, activation: str = "swiglu", **overrides) -> MoEConfig:
    top_k = {"switch": 1, "gshard": 2}.get(router, 2)
    values = dict(
        d_model=16,
        d_ff=8,
        num_experts=4,
        top_k=top_k,
        router=router,
        activation=activation,
        min_capacity=0,
        num_shared_experts=0,
    )
    if router == "gshard":
        values["second_expert_policy"] = "all"
    values.update(overrides)
    return MoEConfig(**values)


def grads_of(layer: MoE, x: torch.Tensor, y: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The gradient of <y, upstream> for x and every parameter of the layer, by name."""
    inputs = {"x": x, **dict(layer.named_parameters())}
    grads = torch.autograd.grad((y * upstream).sum(), list(inputs.values()), allow_unused=True)
    return dict(zip(inputs, grads, strict=True))


def assert_grads_equal(
    got: dict[str, torch.Tensor | None], want: dict[str, torch.Tensor | None], atol: float = 1e-5
) -> None:
    """Every name in both, compared one to one; a gradient missing on one side must be zero
    on the other (an expert that got no token)."""
    assert sorted(got) == sorted(want)
    for name in sorted(want):
        g, w = got[name], want[name]
        if w is None or g is None:
            present = w if g is None else g
            assert present is None or torch.count_nonzero(present) == 0, f"{name}: only one side has a gradient"
            continue
        torch.testing.assert_close(g, w, atol=atol, rtol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_matches_reference(layer: MoE, x: torch.Tensor, token_mask=None) -> dict[str, torch.Tensor | None]:
    x = x.clone().requires_grad_(True)
    y = layer(x, token_mask=token_mask)
    upstream = torch.randn_like(y)
    grads = grads_of(layer, x, y, upstream)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = naive.moe_forward(layer, x_ref, token_mask)
    ref_grads = grads_of(layer, x_ref, y_ref, upstream)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert_grads_equal(grads, ref_grads)
    return grads


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_matches_reference(router, capacity_factor, activation):
    torch.manual_seed(0)
    config = make_config(
        router, activation, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor
    )
    layer = MoE(config)
    if router == "aux_free":
        layer.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    # Training mode where the router is deterministic, eval mode where it is not.
    layer.train(router not in ("noisy_topk",))
    assert_matches_reference(layer, torch.randn(24, 16))


@pytest.mark.parametrize("priority", ["position", "score"])
def test_capacity_priorities_match_reference(priority):
    torch.manual_seed(1)
    config = make_config("topk", capacity_factor=0.5, drop_priority=priority, num_experts=4)
    layer = MoE(config).train()
    assert_matches_reference(layer, torch.randn(40, 16))
    assert moekit.routing_stats(layer)[""].dropped_fraction > 0.3


def test_shared_experts_with_gate_match_reference():
    torch.manual_seed(2)
    layer = MoE(make_config("topk", num_shared_experts=2, shared_expert_d_ff=4, shared_expert_gate=True))
    assert_matches_reference(layer, torch.randn(10, 16))


def test_group_limited_aux_free_matches_reference():
    torch.manual_seed(3)
    config = make_config(
        "aux_free", num_experts=8, top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.5
    )
    layer = MoE(config).train()
    layer.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    assert_matches_reference(layer, torch.randn(20, 16))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grouped_matches_loop(activation, fused):
    torch.manual_seed(4)
    config = make_config("topk", activation, num_experts=6, capacity_factor=0.75)
    grouped = MoE(config)
    loop = MoE(make_config("topk", activation, num_experts=6, capacity_factor=0.75, expert_impl="loop"))
    loop.load_state_dict(grouped.state_dict())
    grouped.fused = loop.fused = fused
    x = torch.randn(30, 16)
    outputs, grads = [], []
    for layer in (grouped, loop):
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        outputs.append(y)
        grads.append(grads_of(layer, xg, y, torch.ones_like(y)))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    assert_grads_equal(grads[0], grads[1])


def test_fused_matches_unfused_with_an_empty_expert():
    torch.manual_seed(5)
    layer = MoE(make_config("topk", num_experts=8, top_k=1))
    with torch.no_grad():
        layer.router.weight[3] = 0.0
        layer.router.weight[3, 0] = -100.0
    x = torch.randn(12, 16)
    x[:, 0] = 1.0  # expert 3's logit is -100 for every token: it gets none
    outputs, grads = [], []
    for fused in (True, False):
        layer.fused = fused
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        outputs.append(y)
        grads.append(grads_of(layer, xg, y, torch.ones_like(y)))
    assert moekit.routing_stats(layer)[""].tokens_per_expert[3] == 0
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=1e-6)
    assert_grads_equal(grads[0], grads[1], atol=1e-6)
    assert torch.count_nonzero(grads[0]["experts.w_out"][3]) == 0  # the empty expert gets zero gradient


def test_empty_input_forward_and_backward():
    for router in ROUTERS:
        layer = MoE(make_config(router, capacity_factor=1.0, num_shared_experts=1))
        x = torch.randn(0, 5, 16, requires_grad=True)
        y = layer(x)
        assert y.shape == (0, 5, 16)
        (y.sum() + moekit.aux_loss(layer)).backward()
        assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("shape", [(16,), (7, 16), (2, 3, 16), (2, 1, 3, 16)])
def test_any_leading_shape(shape):
    torch.manual_seed(6)
    layer = MoE(make_config("topk"))
    x = torch.randn(*shape)
    y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(-1, 16), layer(x.reshape(-1, 16)))


def test_sum_backward_with_zero_stride_gradient():
    torch.manual_seed(7)
    for fused in (True, False):
        layer = MoE(make_config("topk", num_shared_experts=1))
        layer.fused = fused
        x = torch.randn(9, 16, requires_grad=True)
        layer(x).sum().backward()  # upstream gradient is an expanded zero-stride tensor
        assert torch.isfinite(x.grad).all() and layer.experts.w_in.grad is not None


@pytest.mark.parametrize("router", ROUTERS)
def test_bf16_input_keeps_router_in_float32(router):
    torch.manual_seed(8)
    layer = MoE(make_config(router, capacity_factor=1.25)).to(torch.bfloat16)
    seen = {}
    original = layer.router.compute_logits

    def spy(x_TD):
        logits = original(x_TD)
        seen["dtype"] = logits.dtype
        return logits

    layer.router.compute_logits = spy
    x = torch.randn(4, 6, 16, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and seen["dtype"] == torch.float32
    (y.float().square().sum() + moekit.aux_loss(layer)).backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    # Close to the float32 layer with the same weights.
    reference = MoE(make_config(router, capacity_factor=1.25)).eval()
    reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    layer.eval()
    torch.testing.assert_close(layer(x).float(), reference(x.float()), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("router", ROUTERS)
def test_same_seed_gives_same_result(router):
    outputs = []
    for _ in range(2):
        torch.manual_seed(9)
        config = make_config(router, capacity_factor=1.0, drop_priority="random")
        if router == "gshard":
            config = make_config(router, capacity_factor=1.0, second_expert_policy="random")
        layer = MoE(config).train()
        x = torch.randn(20, 16)
        outputs.append((layer(x), moekit.aux_loss(layer)))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], atol=0, rtol=0)
    torch.testing.assert_close(outputs[0][1], outputs[1][1], atol=0, rtol=0)


@pytest.mark.parametrize("router", ["topk", "switch", "expert_choice", "aux_free"])
def test_padding_mask_excludes_tokens(router):
    torch.manual_seed(10)
    layer = MoE(make_config(router, capacity_factor=1.0)).train()
    x = torch.randn(3, 8, 16)
    mask = torch.rand(3, 8) > 0.4
    assert_matches_reference(layer, x, token_mask=mask)
    y = layer(x, token_mask=mask)
    assert torch.count_nonzero(y[~mask]) == 0
    masked_loss = moekit.aux_loss(layer)
    masked_stats = moekit.routing_stats(layer)[""]
    layer(x[mask])  # the same layer on only the real tokens
    torch.testing.assert_close(masked_loss, moekit.aux_loss(layer))
    assert masked_stats == moekit.routing_stats(layer)[""]
    assert masked_stats.num_tokens == int(mask.sum())
    # Garbage (even NaN) in padded positions changes nothing.
    x_garbage = x.clone()
    x_garbage[~mask] = float("nan")
    torch.testing.assert_close(layer(x_garbage, token_mask=mask)[mask], y[mask])


def test_dropped_token_gets_exactly_zero():
    torch.manual_seed(11)
    config = make_config("switch", num_experts=2, capacity_factor=0.5, min_capacity=0)
    layer = MoE(config).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0
    x = torch.randn(8, 16)
    x[:, 0] = 1.0  # every token prefers expert 0; capacity 2 keeps tokens 0 and 1
    y = layer(x)
    assert moekit.routing_stats(layer)[""].tokens_per_expert == [2, 0]
    assert torch.count_nonzero(y[2:]) == 0
    assert torch.count_nonzero(y[:2]) > 0


def test_eval_capacity_none_makes_output_independent_of_batch():
    torch.manual_seed(12)
    layer = MoE(make_config("topk", capacity_factor=0.5, eval_capacity_factor=None)).eval()
    x = torch.randn(16, 16)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(16)])
    torch.testing.assert_close(layer(x), alone, atol=1e-6, rtol=1e-6)
    layer.train()
    layer(x)
    assert moekit.routing_stats(layer)[""].capacity == 4


def test_aux_loss_only_in_training():
    torch.manual_seed(13)
    layer = MoE(make_config("topk"))
    x = torch.randn(10, 16)
    layer.train()
    layer(x)
    assert float(moekit.aux_loss(layer)) > 0
    layer.eval()
    layer(x)
    assert float(moekit.aux_loss(layer)) == 0.0


def test_aux_loss_sums_weighted_terms():
    torch.manual_seed(14)
    config = make_config("noisy_topk", balance_loss_coef=0.5, z_loss_coef=0.25)
    layer = MoE(config).train()
    layer(torch.randn(12, 16))
    terms = layer.last_aux_losses
    assert set(terms) == {"balance", "z", "importance", "load"}
    torch.testing.assert_close(moekit.aux_loss(layer), sum(terms.values()))


def test_non_finite_logits_raise():
    layer = MoE(make_config("topk"))
    x = torch.randn(4, 16)
    x[2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="router logits"):
        layer(x)
    unchecked = MoE(make_config("topk", check_finite=False))
    unchecked(x)  # the check can be turned off


@pytest.mark.parametrize("router", ["noisy_topk", "gshard", "expert_choice"])
def test_nan_input_raises_the_layers_error_in_training(router):
    # noisy_topk draws noise and evaluates a normal CDF on the logits in training; gshard's
    # "sample" policy draws Gumbel noise: the NaN must be reported before either happens.
    overrides = {"second_expert_policy": "sample"} if router == "gshard" else {}
    layer = MoE(make_config(router, **overrides)).train()
    x = torch.randn(6, 16)
    x[1, 0] = float("nan")
    with pytest.raises(NonFiniteRouterLogitsError, match="router logits contain NaN"):
        layer(x)
    unchecked = MoE(make_config(router, check_finite=False, **overrides)).train()
    y = unchecked(x)  # with the check off, the NaN propagates instead of raising
    assert torch.isnan(y).any()


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "aux_free"])
def test_deepcopy_after_training_forward(router):
    torch.manual_seed(21)
    layer = MoE(make_config(router, capacity_factor=1.0, num_shared_experts=1)).train()
    x = torch.randn(10, 16)
    layer(x)
    copied = copy.deepcopy(layer)  # the cached aux losses are graph tensors
    # The original's aux loss still backprops into its router; the copy has none of its own.
    assert moekit.aux_loss(layer).grad_fn is not None
    moekit.aux_loss(layer).backward()
    assert torch.count_nonzero(layer.router.weight.grad) > 0
    assert float(moekit.aux_loss(copied)) == 0.0
    assert moekit.routing_stats(copied) == moekit.routing_stats(layer)
    # Same weights and buffers, independent storage.
    assert copied.router.weight.data_ptr() != layer.router.weight.data_ptr()
    layer.eval(), copied.eval()
    torch.testing.assert_close(copied(x), layer(x), atol=0, rtol=0)
    # A training forward of the copy makes an aux loss that reaches the copy's router only.
    layer.router.weight.grad = None
    copied.train()(x)
    moekit.aux_loss(copied).backward()
    assert copied.router.weight.grad is not None and layer.router.weight.grad is None


def test_deepcopy_of_language_model_after_training_forward():
    from moekit.models.lm import LMConfig, MoETransformerLM

    torch.manual_seed(22)
    moe = MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2, router="noisy_topk", capacity_factor=1.25)
    model = MoETransformerLM(LMConfig(vocab_size=32, seq_len=8, n_layer=2, n_head=2, d_model=16, moe=moe)).train()
    idx = torch.randint(0, 32, (2, 8))
    _, loss = model(idx, idx)
    snapshot = copy.deepcopy(model)  # e.g. a best-model snapshot or an EMA copy
    assert moekit.aux_loss(model).grad_fn is not None
    (loss + moekit.aux_loss(model)).backward()
    model.eval(), snapshot.eval()
    torch.testing.assert_close(snapshot(idx)[0], model(idx)[0], atol=0, rtol=0)


@pytest.mark.slow
def test_hierarchical_moe_trains_and_collects_inner_losses():
    torch.manual_seed(15)
    inner = [MoE(make_config("topk", num_experts=3, top_k=1, d_ff=8)) for _ in range(2)]
    outer = MoE(make_config("topk", num_experts=2, top_k=1), experts=inner)
    head = torch.nn.Linear(16, 1)
    model = torch.nn.ModuleDict({"moe": outer, "head": head})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(64, 16)
    target = x[:, :1].sin() * 2
    losses = []
    for _ in range(60):
        y = head(outer(x))
        task = torch.nn.functional.mse_loss(y, target)
        assert len(moekit.layer.moe_layers(outer)) == 3
        inner_total = sum(m.last_aux_loss for m in inner if m.last_aux_loss is not None)
        torch.testing.assert_close(moekit.aux_loss(model), outer.last_aux_loss + inner_total)
        optimizer.zero_grad()
        (task + moekit.aux_loss(model)).backward()
        optimizer.step()
        losses.append(task.item())
    assert losses[-1] < 0.5 * losses[0]
    assert inner[0].experts.w_in.grad is not None
    assert set(moekit.routing_stats(model)) == {"moe", "moe.experts.experts.0", "moe.experts.experts.1"}


def test_module_experts_match_reference():
    torch.manual_seed(16)
    experts = [
        torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 16)) for _ in range(4)
    ]
    layer = MoE(make_config("topk", capacity_factor=1.0), experts=experts).train()
    grads = assert_matches_reference(layer, torch.randn(14, 16))
    # Gradients reached every expert module's weights (compared by name above).
    assert {name for name, grad in grads.items() if grad is not None} >= {
        f"experts.experts.{e}.{layer_idx}.weight" for e in range(4) for layer_idx in (0, 2)
    }


def test_hierarchical_moe_matches_reference():
    # Module experts that are MoE layers themselves: the naive reference calls each inner
    # layer's forward, whose own routing is checked against the reference elsewhere.
    torch.manual_seed(20)
    inner = [MoE(make_config("topk", num_experts=3, top_k=1, num_shared_experts=1)) for _ in range(2)]
    outer = MoE(make_config("topk", num_experts=2, top_k=1), experts=inner).eval()
    assert_matches_reference(outer, torch.randn(12, 16))


def test_expert_dropout_only_in_training():
    torch.manual_seed(17)
    layer = MoE(make_config("topk", expert_dropout=0.5))
    x = torch.randn(20, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), naive.moe_forward(layer, x), atol=1e-5, rtol=1e-5)
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(18)
    layer = MoE(make_config("topk"))
    # NOTE: aot_eager traces with dynamo and AOTAutograd (where graph breaks and custom
    # autograd.Functions are handled) without the minute-long C++ build of inductor.
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(2, 5, 16, requires_grad=True)
    y_eager = layer(x)
    g_eager = torch.autograd.grad(y_eager.square().sum(), [x, layer.experts.w_in])
    y_compiled = compiled(x)
    g_compiled = torch.autograd.grad(y_compiled.square().sum(), [x, layer.experts.w_in])
    torch.testing.assert_close(y_compiled, y_eager)
    for got, want in zip(g_compiled, g_eager, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_unaligned_sizes_fall_back_and_match_reference(activation):
    # grouped_mm needs 16-byte strides; d_model=6, d_ff=3 must take the loop and still be right.
    torch.manual_seed(19)
    layer = MoE(make_config("topk", activation, d_model=6, d_ff=3, num_shared_experts=1)).train()
    assert_matches_reference(layer, torch.randn(11, 6))
