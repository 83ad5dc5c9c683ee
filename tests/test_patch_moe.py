"""``moekit.interop.patch_moe``: moekit experts inside loaded transformers MoE models.

Per family (tiny random models of transformers 5.23, seeded, never the hub): every patched
block's output equals the original block's to 1e-5 in float32, the whole model's logits
match, and greedy ``generate`` of 32 new tokens gives the same tokens before and after
patching. Also: the MoEConfig terms some families need (router bias, expert biases, clamped
SwiGLU for GPT-OSS; softmax group-limited routing with routed scaling for DeepSeek-V2)
against a naive per-token reference, and the refusals (unknown blocks, strict=False,
output_router_logits).

    pytest tests/test_patch_moe.py
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE, MoEConfig
from moekit.interop.patch import MoEWithRouterScores, UnsupportedBlockError, looks_like_moe_block, patch_moe

transformers = pytest.importorskip("transformers")

VOCAB = 97
DECODER = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=None,
)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def decoder_cases() -> dict[str, tuple[str, str, dict]]:
    """family → (config class, model class, config overrides): 2 layers, hidden 32, 4-8 experts."""
    return {
        "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                    dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                      dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                           num_experts=6, num_experts_per_tok=2)),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                           head_dim=8, norm_topk_prob=True)),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
                  dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
        "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                        dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                             n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=0,
                             routed_scaling_factor=2.5, **MLA)),
        "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                        dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                             n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=0,
                             topk_method="group_limited_greedy", routed_scaling_factor=1.5, **MLA)),
        "deepseek_v2_greedy": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                               dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                                    num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=0,
                                    topk_method="greedy", routed_scaling_factor=1.5, **MLA)),
        "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                     dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                          n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=0, head_dim=8,
                          routed_scaling_factor=1.8)),
        "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                    # swiglu_limit small enough that the clamps are active on these weights
                    dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                         sliding_window=8, swiglu_limit=0.5)),
        "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                       dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                            num_experts=8, num_experts_per_tok=2, head_dim=8, linear_num_value_heads=4,
                            linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                            layer_types=["linear_attention", "full_attention"])),
    }


def randomize(model: torch.nn.Module, seed: int = 1, std: float = 0.3) -> None:
    """Random weights (norms stay at 1) and a selection bias large enough to change routing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)


def build(family: str) -> torch.nn.Module:
    config_class, model_class, overrides = decoder_cases()[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**DECODER, **overrides})
    model = getattr(transformers, model_class)(config).eval()
    randomize(model)
    return model


def first_output(out):
    return out[0] if isinstance(out, tuple) else out


def assert_blocks_match(original: torch.nn.Module, patched_model: torch.nn.Module, patched) -> None:
    for record in patched:
        block = original.get_submodule(record.path)
        moe = patched_model.get_submodule(record.path)
        assert isinstance(moe, MoE) and type(block).__name__ == record.block
        x = torch.randn(3, 5, record.config.d_model)
        with torch.no_grad():
            want, got = first_output(block(x.clone())), first_output(moe(x.clone()))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def greedy(model: torch.nn.Module, prompt: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, **kwargs)


@pytest.mark.parametrize("family", sorted(decoder_cases()))
def test_patched_decoder_model_matches_blocks_logits_and_greedy_tokens(family):
    model = build(family)
    original = copy.deepcopy(model)
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    want_tokens = greedy(original, ids[:1])

    patched = patch_moe(model)

    assert len(patched) == 2 and all(record.family == family.removesuffix("_greedy") for record in patched)
    assert_blocks_match(original, model, patched)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)
    got_tokens = greedy(model, ids[:1])
    assert torch.equal(got_tokens, want_tokens)
    # The comparison means something only if the model does not just repeat one token.
    assert len(set(want_tokens[0, 7:].tolist())) >= 4


def test_patched_blocks_carry_each_familys_terms():
    configs = {family: patch_moe(build(family))[0].config for family in ("gpt_oss", "deepseek_v2", "glm4_moe")}
    gpt_oss = configs["gpt_oss"]
    assert gpt_oss.activation == "clamped_swiglu" and gpt_oss.swiglu_limit == 0.5
    assert gpt_oss.router_bias and gpt_oss.expert_biases
    v2 = configs["deepseek_v2"]
    assert (v2.router, v2.n_group, v2.topk_group, v2.group_score) == ("topk", 4, 2, "max")
    assert v2.routed_scaling_factor == 1.5 and not v2.normalize_weights
    glm = configs["glm4_moe"]
    assert (glm.router, glm.n_group, glm.routed_scaling_factor, glm.num_shared_experts) == ("aux_free", 2, 1.8, 1)


def test_gpt_oss_block_returns_hidden_and_router_scores_as_its_decoder_layer_unpacks():
    model = build("gpt_oss")
    block = copy.deepcopy(model.model.layers[0].mlp)
    patch_moe(model)
    moe = model.model.layers[0].mlp
    assert isinstance(moe, MoEWithRouterScores)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        (want_y, want_scores), (got_y, got_scores) = block(x), moe(x)
    torch.testing.assert_close(got_y, want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_scores, want_scores, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("router_bias", [False, True])
def test_switch_encoder_decoder_sparse_mlps_match_and_generate_the_same_tokens(router_bias):
    config = transformers.SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        num_experts=4, expert_capacity=3, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=None, router_bias=router_bias,
    )
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    randomize(model, std=0.6)  # T5-style stacks collapse to one repeated token at smaller scales
    original = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (2, 9), generator=generator)
    decoder_ids = torch.randint(2, VOCAB, (2, 6), generator=generator)
    want_tokens = greedy(original, ids[:1])

    patched = patch_moe(model)

    assert {record.family for record in patched} == {"switch_transformers"}
    assert [record.path.split(".")[0] for record in patched] == ["encoder", "decoder"]
    assert all(record.config.expert_capacity == 3 and record.config.routing_group == "sequence" for record in patched)
    assert all(record.config.router_bias is router_bias for record in patched)
    assert_blocks_match(original, model, patched)
    with torch.no_grad():
        want = original(input_ids=ids, decoder_input_ids=decoder_ids).logits
        got = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got_tokens = greedy(model, ids[:1])
    assert torch.equal(got_tokens, want_tokens) and len(set(want_tokens[0, 1:].tolist())) >= 3
    # Switch's router z-loss and aux loss read the recorded [B, S, E] router logits.
    labels = torch.randint(2, VOCAB, (2, 6), generator=generator)
    with torch.no_grad():
        want_out = original(input_ids=ids, labels=labels, output_router_logits=True)
        got_out = model(input_ids=ids, labels=labels, output_router_logits=True)
    for name in ("encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss", "loss"):
        torch.testing.assert_close(getattr(got_out, name), getattr(want_out, name), atol=1e-5, rtol=1e-5)
    assert float(want_out.encoder_z_loss) > 0


def test_patching_twice_replaces_nothing_more_and_keeps_the_outputs():
    model = build("qwen3_moe")
    ids = torch.randint(2, VOCAB, (1, 5))
    patch_moe(model)
    with torch.no_grad():
        before = model(ids).logits
    assert patch_moe(model) == []
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)


# ---------------------------------------------------------------------------------------
# Refusals: nothing is silently left unconverted
# ---------------------------------------------------------------------------------------


def tiny_jamba() -> torch.nn.Module:
    config = transformers.JambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0,
        attn_layer_period=1, attn_layer_offset=0, mamba_d_state=4, mamba_expand=2, use_mamba_kernels=False,
    )
    return transformers.JambaForCausalLM(config).eval()


def test_unknown_moe_block_is_an_error_naming_family_and_block():
    model = tiny_jamba()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedBlockError, match=r"model\.layers\.0\.feed_forward: jamba block JambaSparseMoeBlock "
                       r"has no moekit adapter; supported: mixtral"):
        patch_moe(model)
    # Nothing was changed.
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())


def test_strict_false_warns_and_leaves_the_block_unconverted():
    model = tiny_jamba()
    with pytest.warns(UserWarning, match="left a block unconverted: model.layers.0.feed_forward: jamba"):
        assert patch_moe(model, strict=False) == []
    assert type(model.model.layers[0].feed_forward).__name__ == "JambaSparseMoeBlock"


def test_supported_family_with_a_setting_moekit_lacks_names_the_reason():
    model = build("deepseek_v2")
    model.model.layers[1].mlp.gate.topk_method = "noaux_tc"
    message = r"layers\.1\.mlp: deepseek_v2 block DeepseekV2Moe .*topk_method='noaux_tc'"
    with pytest.raises(UnsupportedBlockError, match=message):
        patch_moe(model)
    assert not any(isinstance(m, MoE) for m in model.modules())
    with pytest.warns(UserWarning, match="topk_method"):
        patched = patch_moe(model, strict=False)
    assert [record.path for record in patched] == ["model.layers.0.mlp"]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_output_router_logits_and_the_familys_aux_loss_survive_patching(family):
    model = build(family)
    original = copy.deepcopy(model)
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = original(ids, labels=ids, output_router_logits=True)
    patch_moe(model)
    with torch.no_grad():
        got = model(ids, labels=ids, output_router_logits=True)
    assert len(got.router_logits) == len(want.router_logits) == 2
    for got_logits, want_logits in zip(got.router_logits, want.router_logits, strict=True):
        torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    assert float(want.aux_loss) > 0
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    # The router gets the aux loss's gradient through the patched layer.
    model.train()
    model(ids, labels=ids, output_router_logits=True).aux_loss.backward()
    assert model.model.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_a_model_without_moe_blocks_is_an_error():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM \(llama\) has no MoE block"):
        patch_moe(transformers.LlamaForCausalLM(config))
    with pytest.raises(TypeError, match="nn.Module"):
        patch_moe("model")  # type: ignore[arg-type]


def test_moe_detection_covers_supported_blocks_and_ignores_dense_mlps():
    model = build("qwen2_moe")
    kinds = {type(m).__name__ for m in model.modules() if looks_like_moe_block(m)}
    assert kinds == {"Qwen2MoeSparseMoeBlock"}


# ---------------------------------------------------------------------------------------
# The MoEConfig terms the families needed, against a naive per-token reference
# ---------------------------------------------------------------------------------------


def naive_forward(layer: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """A loop over tokens and their experts: router bias, softmax top-k or group-limited top-k,
    routed scaling, expert biases, every activation."""
    cfg = layer.config
    experts, router = layer.experts, layer.router
    out = []
    for x_D in x_TD:
        logits_E = x_D.float() @ router.weight.float().t()
        if router.bias is not None:
            logits_E = logits_E + router.bias
        probs_E = logits_E.softmax(-1)
        allowed = list(range(cfg.num_experts))
        if cfg.n_group > 1:
            per = cfg.num_experts // cfg.n_group
            group_best = [probs_E[g * per : (g + 1) * per].max().item() for g in range(cfg.n_group)]
            groups = sorted(range(cfg.n_group), key=lambda g: -group_best[g])[: cfg.topk_group]
            allowed = [e for e in allowed if e // per in groups]
        chosen = sorted(allowed, key=lambda e: -probs_E[e].item())[: cfg.top_k]
        weights = [probs_E[e] for e in chosen]
        if cfg.normalize_weights:
            weights = [w / sum(weights) for w in weights]
        y_D = torch.zeros_like(x_D)
        for e, w in zip(chosen, weights, strict=True):
            h = x_D @ experts.w_in[e] + (experts.b_in[e] if experts.b_in is not None else 0)
            gate, up = h.chunk(2)
            if cfg.activation == "clamped_swiglu":
                gate, up = gate.clamp(max=cfg.swiglu_limit), up.clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
                act = (up + 1) * gate * torch.sigmoid(cfg.swiglu_alpha * gate)
            else:
                act = F.silu(gate) * up
            expert_out = act @ experts.w_out[e] + (experts.b_out[e] if experts.b_out is not None else 0)
            y_D = y_D + w * cfg.routed_scaling_factor * expert_out
        out.append(y_D)
    return torch.stack(out)


def randomized_layer(config: MoEConfig) -> MoE:
    layer = MoE(config)
    randomize(layer, seed=5, std=0.4)
    return layer


@pytest.mark.parametrize("training", [False, True])
def test_router_bias_expert_biases_and_clamped_swiglu_match_the_naive_reference(training):
    config = MoEConfig(d_model=8, d_ff=6, num_experts=4, top_k=2, activation="clamped_swiglu", swiglu_alpha=1.3,
                       swiglu_limit=0.4, router_bias=True, expert_biases=True, z_loss_coef=0.0)
    layer = randomized_layer(config).train(training)
    x = torch.randn(11, 8, requires_grad=True)
    got = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    want = naive_forward(layer, x_ref)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Gradients of every parameter and of the input, biases included.
    got.square().sum().backward()
    got_grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    naive_forward(layer, x_ref).square().sum().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(got_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    # The clamp is active here (the check can fail): a looser limit changes the output.
    loose = MoE(dataclasses.replace(config, swiglu_limit=50.0)).train(training)
    loose.load_state_dict(layer.state_dict())
    assert not torch.allclose(loose(x.detach()), got.detach(), atol=1e-4)


def test_softmax_group_limited_routing_with_scaling_matches_the_naive_reference():
    config = MoEConfig(d_model=8, d_ff=6, num_experts=8, top_k=2, router="topk", n_group=4, topk_group=1,
                       group_score="max", normalize_weights=False, routed_scaling_factor=2.0)
    layer = randomized_layer(config).eval()
    x = torch.randn(13, 8)
    torch.testing.assert_close(layer(x), naive_forward(layer, x), atol=1e-5, rtol=1e-5)
    # Group limiting changes which experts are picked for some token (the check can fail).
    ungrouped = MoE(dataclasses.replace(config, n_group=1, topk_group=1)).eval()
    ungrouped.load_state_dict(layer.state_dict())
    assert not torch.allclose(ungrouped(x), layer(x), atol=1e-4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"group_score": "mean"}, r"group_score='mean' .*top2_sum"),
        ({"swiglu_limit": 0.0}, r"swiglu_limit=0.0 .*> 0"),
        ({"swiglu_alpha": float("inf")}, r"swiglu_alpha=inf"),
        ({"router_bias": 1}, r"router_bias=1 .*True or False"),
        ({"n_group": 2, "group_score": "top2_sum"}, r"n_group=2 .*group_score='max'"),
    ],
)
def test_new_config_fields_are_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(num_experts=8, **overrides)
