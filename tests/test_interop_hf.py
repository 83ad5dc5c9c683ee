"""moekit against Hugging Face transformers, on models built from tiny configs (never the hub).

Verifies: every supported transformers MoE block converts to a ``moekit.MoE`` with the same
output to 1e-5 in eval mode (Mixtral, Qwen2-MoE with its gated shared expert and
norm_topk_prob both ways, Qwen3-MoE, OLMoE, DeepSeek-V3 with group-limited routing, the
score-correction bias, the routed scaling factor and shared experts, Switch with its
per-sequence capacity); a MixtralForCausalLM converts to a moekit LM and back with the same
logits (1e-4), also through a saved folder (sharded safetensors, either key layout); the
balance loss in transformers' convention equals ``load_balancing_loss_func``.

    pytest tests/test_interop_hf.py
"""

from __future__ import annotations

import json

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.interop.hf import (
    ConversionError,
    from_hf_block,
    from_hf_model,
    load_hf_checkpoint,
    mixtral_incompatibility,
    to_hf_model,
)
from moekit.losses import balance_loss, hf_balance_loss
from moekit.models.lm import LMConfig, MoETransformerLM

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _seed():
    """Inputs drawn in a test do not depend on which tests ran before it."""
    torch.manual_seed(0)


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """transformers leaves block weights uninitialized (torch.empty) outside a full model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def assert_block_matches(block: torch.nn.Module, x_BSD: torch.Tensor) -> MoE:
    block.eval()
    moe = from_hf_block(block).eval()
    with torch.no_grad():
        want = block(x_BSD.clone())
        want = want[0] if isinstance(want, tuple) else want
        got = moe(x_BSD.clone())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    return moe


def test_mixtral_block_matches():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    block = MixtralSparseMoeBlock(
        MixtralConfig(hidden_size=16, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
    )
    randomize(block)
    moe = assert_block_matches(block, torch.randn(2, 5, 16))
    assert moe.config.router == "topk" and moe.config.normalize_weights


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen2_moe_block_with_gated_shared_expert_matches(norm_topk_prob):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = Qwen2MoeConfig(
        hidden_size=16, moe_intermediate_size=8, shared_expert_intermediate_size=12, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=norm_topk_prob,
    )
    block = Qwen2MoeSparseMoeBlock(config)
    randomize(block)
    moe = assert_block_matches(block, torch.randn(2, 5, 16))
    assert moe.config.shared_expert_gate and moe.config.shared_d_ff == 12
    assert moe.config.normalize_weights is norm_topk_prob


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_block_matches(norm_topk_prob):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(
        hidden_size=16, moe_intermediate_size=8, num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob
    )
    block = Qwen3MoeSparseMoeBlock(config)
    randomize(block)
    assert_block_matches(block, torch.randn(3, 4, 16))


def test_olmoe_block_matches():
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    config = OlmoeConfig(hidden_size=16, intermediate_size=8, num_experts=8, num_experts_per_tok=2)
    block = OlmoeSparseMoeBlock(config)
    randomize(block)
    assert_block_matches(block, torch.randn(2, 5, 16))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_deepseek_v3_block_with_groups_bias_scaling_and_shared_experts_matches(norm_topk_prob):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(
        hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
        topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=norm_topk_prob,
    )
    block = DeepseekV3MoE(config)
    randomize(block)
    with torch.no_grad():
        # A bias large enough to change which experts are chosen (it is used for selection only).
        block.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    moe = assert_block_matches(block, torch.randn(2, 7, 16))
    assert moe.config.router == "aux_free" and moe.config.n_group == 4 and moe.config.topk_group == 2
    assert moe.config.routed_scaling_factor == 2.5 and moe.config.shared_d_ff == 16
    torch.testing.assert_close(moe.router.expert_bias, torch.linspace(-0.3, 0.3, 8))


def test_deepseek_v3_bias_changes_the_routing():
    """The check above cannot pass by accident: without the bias the outputs differ."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(
        hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
        n_shared_experts=1,
    )
    block = DeepseekV3MoE(config).eval()
    randomize(block)
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, 8))
    moe = from_hf_block(block).eval()
    moe.router.expert_bias.zero_()
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        assert not torch.allclose(moe(x), block(x), atol=1e-3)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_switch_block_with_per_sequence_capacity_matches(activation):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    config = SwitchTransformersConfig(
        d_model=16, d_ff=8, num_experts=4, expert_capacity=2, dense_act_fn=activation, router_bias=False,
        router_jitter_noise=0.0, dropout_rate=0.0,
    )
    block = SwitchTransformersSparseMLP(config)
    randomize(block)
    x = torch.randn(3, 9, 16)
    moe = assert_block_matches(block, x)
    # Capacity 2 per expert per sequence of 9 tokens over 4 experts: tokens must be dropped.
    with torch.no_grad():
        out = moe(x)
    assert (out.abs().sum(-1) == 0).sum() >= 3 * (9 - 2 * 4)


def test_switch_router_bias_is_rejected_by_name():
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    block = SwitchTransformersSparseMLP(SwitchTransformersConfig(d_model=8, d_ff=8, num_experts=2, router_bias=True))
    with pytest.raises(ValueError, match="router_bias"):
        from_hf_block(block)


def test_gated_gelu_experts_are_rejected_naming_the_activation():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=8, intermediate_size=8, num_local_experts=2,
                                                hidden_act="gelu"))
    with pytest.raises(ValueError, match="GELUActivation.*silu"):
        from_hf_block(block)


def test_loss_coefficients_follow_the_transformers_config():
    from transformers import MixtralConfig, SwitchTransformersConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    config = MixtralConfig(hidden_size=8, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2,
                           router_aux_loss_coef=0.02)
    moe = from_hf_block(MixtralSparseMoeBlock(config), hf_config=config)
    # transformers' balance loss is k times moekit's: the same objective needs k times the coefficient.
    assert moe.config.balance_loss_coef == pytest.approx(0.04) and moe.config.z_loss_coef == 0.0
    switch = SwitchTransformersConfig(d_model=8, d_ff=8, num_experts=2, router_z_loss_coef=0.003,
                                      router_aux_loss_coef=0.01)
    moe = from_hf_block(SwitchTransformersSparseMLP(switch), hf_config=switch)
    assert moe.config.balance_loss_coef == pytest.approx(0.01) and moe.config.z_loss_coef == pytest.approx(0.003)


def test_unsupported_block_is_rejected_naming_the_supported_ones():
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock"):
        from_hf_block(torch.nn.Linear(4, 4))


def test_fixed_capacity_per_sequence_drops_by_position():
    """Hand-computed: every token prefers expert 0; capacity 2 per sequence keeps positions
    0 and 1 of each sequence and drops the rest (output 0), in eval as in training."""
    config = MoEConfig(
        d_model=4, d_ff=4, num_experts=2, top_k=1, router="switch", activation="relu",
        expert_capacity=2, routing_group="sequence", min_capacity=0,
    )
    moe = MoE(config)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[5.0, 5, 5, 5], [-5.0, -5, -5, -5]]))
        moe.experts.w_in.fill_(0.1)  # positive weights and inputs: a kept token's output is > 0
        moe.experts.w_out.fill_(0.1)
    x = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5  # expert 0 wins for every token
    for mode in (moe.eval, moe.train):
        mode()
        with torch.no_grad():
            routed = moe(x).abs().sum(-1) > 0
        assert routed.tolist() == [[True, True, False, False], [True, True, False, False]]
        assert sorted(moe.last_stats.kept_token_idx_N.tolist()) == [0, 1, 4, 5]
    batch_config = MoEConfig(**{**config.to_dict(), "routing_group": "batch"})
    batch_moe = MoE(batch_config).eval()
    batch_moe.load_state_dict(moe.state_dict())
    with torch.no_grad():
        assert (batch_moe(x).abs().sum(-1) > 0).tolist() == [[True, True, False, False], [False] * 4]


@pytest.mark.parametrize("field,value", [("expert_capacity", 0), ("routing_group", "token")])
def test_capacity_knobs_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**{field: value})


def test_hf_balance_loss_equals_transformers_and_is_k_times_ours():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    logits_TE = torch.randn(32, 8)
    for top_k in (1, 2, 3):
        scores_TE = logits_TE.softmax(-1)
        chosen_TK = scores_TE.topk(top_k, dim=-1).indices
        selected_E = torch.bincount(chosen_TK.reshape(-1), minlength=8).float()
        want = load_balancing_loss_func((logits_TE,), 8, top_k)
        torch.testing.assert_close(hf_balance_loss(scores_TE, selected_E, top_k), want)
        torch.testing.assert_close(hf_balance_loss(scores_TE, selected_E, top_k), top_k * balance_loss(
            scores_TE, selected_E, top_k))
    # At perfect balance: ours 1, transformers' k.
    uniform_TE = torch.full((8, 4), 0.25)
    assert hf_balance_loss(uniform_TE, torch.full((4,), 4.0), 2).item() == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------
# Mixtral models
# ---------------------------------------------------------------------------------------


def tiny_mixtral(tie: bool = False, kv_heads: int = 2):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        initializer_range=0.2,
    )
    return MixtralForCausalLM(config).eval()


def hf_logits(model, idx):
    with torch.no_grad():
        return model(input_ids=idx).logits


@pytest.mark.parametrize("tie,kv_heads", [(False, 2), (True, 4), (False, 1)])
def test_mixtral_model_converts_both_ways_with_the_same_logits(tie, kv_heads):
    hf = tiny_mixtral(tie, kv_heads)
    idx = torch.randint(0, 64, (2, 11))
    want = hf_logits(hf, idx)
    lm = from_hf_model(hf).eval()
    assert lm.config.kv_heads == kv_heads and lm.config.tie_embeddings is tie
    with torch.no_grad():
        got, _ = lm(idx)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    back = to_hf_model(lm).eval()
    torch.testing.assert_close(hf_logits(back, idx), want, atol=1e-4, rtol=1e-4)


def test_moekit_lm_to_hf_and_back_keeps_logits():
    config = LMConfig(vocab_size=40, seq_len=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32, tie_embeddings=False,
                      moe=MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2))
    torch.manual_seed(1)
    lm = MoETransformerLM(config).eval()
    idx = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        want, _ = lm(idx)
    hf = to_hf_model(lm).eval()
    torch.testing.assert_close(hf_logits(hf, idx), want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        again, _ = from_hf_model(hf).eval()(idx)
    torch.testing.assert_close(again, want, atol=1e-5, rtol=1e-5)
    assert hf.config.router_aux_loss_coef == pytest.approx(config.moe.balance_loss_coef / 2)


def test_lm_not_expressible_as_mixtral_names_every_reason():
    config = LMConfig(moe_every=2, moe=MoEConfig(d_model=128, d_ff=64, router="switch", top_k=1, num_shared_experts=1))
    reasons = mixtral_incompatibility(config)
    assert any("moe_every" in r for r in reasons) and any("router" in r for r in reasons)
    assert any("shared" in r for r in reasons)
    with pytest.raises(ValueError, match="moe_every=2.*router='switch'"):
        to_hf_model(MoETransformerLM(config))


def test_fields_mixtral_cannot_hold_are_refused_not_dropped():
    # A scaled gate, router or expert biases, group-limited routing: a Mixtral export would
    # silently compute something else.
    config = LMConfig(moe=MoEConfig(d_model=128, d_ff=64, routed_scaling_factor=2.0, router_bias=True,
                                    expert_biases=True))
    reasons = mixtral_incompatibility(config)
    for field_name in ("routed_scaling_factor=2.0", "router_bias", "expert_biases"):
        assert any(field_name in r for r in reasons), field_name
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        to_hf_model(MoETransformerLM(config))
    assert mixtral_incompatibility(LMConfig()) == []


def test_saved_folder_loads_without_transformers_model(tmp_path):
    hf = tiny_mixtral()
    idx = torch.randint(0, 64, (1, 9))
    want = hf_logits(hf, idx)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()  # sharded
    lm, config = load_hf_checkpoint(tmp_path / "hf")
    with torch.no_grad():
        got, _ = lm(idx)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_legacy_per_expert_key_layout_loads(tmp_path):
    """The original Mixtral release names experts block_sparse_moe.experts.{e}.w1/w2/w3."""
    from safetensors.torch import save_file

    hf = tiny_mixtral()
    idx = torch.randint(0, 64, (1, 9))
    want = hf_logits(hf, idx)
    legacy = {}
    for name, value in hf.state_dict().items():
        if ".mlp.experts.gate_up_proj" in name:
            prefix = name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts.")
            gate, up = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                legacy[f"{prefix}{e}.w1.weight"] = gate[e].contiguous()
                legacy[f"{prefix}{e}.w3.weight"] = up[e].contiguous()
        elif ".mlp.experts.down_proj" in name:
            prefix = name.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts.")
            for e in range(value.shape[0]):
                legacy[f"{prefix}{e}.w2.weight"] = value[e].contiguous()
        else:
            legacy[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = value.contiguous()
    folder = tmp_path / "legacy"
    folder.mkdir()
    save_file(legacy, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf.config.to_dict()))
    lm, _ = load_hf_checkpoint(folder)
    with torch.no_grad():
        got, _ = lm(idx)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_non_mixtral_folder_is_rejected_naming_the_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(ConversionError, match="qwen3_moe"):
        load_hf_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------
# moekit export / import
# ---------------------------------------------------------------------------------------


def write_run(path, config: LMConfig, tokenizer: dict | None = None) -> MoETransformerLM:
    from dataclasses import asdict

    from moekit.training.checkpoint import save_checkpoint, write_json_atomic
    from moekit.training.config import TrainConfig

    torch.manual_seed(0)
    model = MoETransformerLM(config)
    path.mkdir(parents=True)
    payload = {"model": config.to_dict(), "train": asdict(TrainConfig()), "tokenizer": tokenizer or {"kind": "bytes"}}
    write_json_atomic(path / "config.json", payload)
    save_checkpoint(path, model, {})
    return model.eval()


def test_export_loads_in_transformers_with_identical_logits_and_imports_back(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from moekit.cli.main import main
    from moekit.training.checkpoint import load_model_from_run

    config = LMConfig(vocab_size=256, seq_len=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32, tie_embeddings=True,
                      moe=MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2))
    lm = write_run(tmp_path / "run", config)
    assert main(["export", str(tmp_path / "run"), "--hf", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        want, _ = lm(idx)
    torch.testing.assert_close(hf_logits(hf, idx), want, atol=1e-5, rtol=1e-5)

    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, payload = load_model_from_run(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(idx)[0], want, atol=1e-5, rtol=1e-5)
    assert payload["tokenizer"] == {"kind": "bytes"}
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "back"), "--prompt", "ab", "--tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ab")


def test_export_of_a_run_mixtral_cannot_express_fails_naming_why(tmp_path, capsys):
    from moekit.cli.main import main

    config = LMConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=2, d_model=16, moe_every=2,
                      moe=MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=1, router="switch"))
    write_run(tmp_path / "run", config)
    assert main(["export", str(tmp_path / "run"), "--hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "moe_every=2" in err and "router='switch'" in err
    assert not (tmp_path / "hf").exists()


def test_import_carries_a_bpe_tokenizer_both_ways(tmp_path):
    pytest.importorskip("tokenizers")
    from moekit.interop.hf import export_run, import_hf_folder
    from moekit.training.checkpoint import load_model_from_run
    from moekit.training.data import BPETokenizer

    tokenizer = BPETokenizer.train("hello world, hello moe. " * 50, 300)
    config = LMConfig(vocab_size=tokenizer.vocab_size, seq_len=16, n_layer=1, n_head=2, d_model=16,
                      moe=MoEConfig(d_model=16, d_ff=8, num_experts=2, top_k=1))
    write_run(tmp_path / "run", config, tokenizer.to_dict())
    export_run(tmp_path / "run", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    import_hf_folder(tmp_path / "hf", tmp_path / "back")
    _, payload = load_model_from_run(tmp_path / "back")
    assert payload["tokenizer"] == tokenizer.to_dict()


def test_import_without_a_tokenizer_for_a_large_vocabulary_is_rejected(tmp_path):
    from moekit.interop.hf import import_hf_folder

    tiny_mixtral().save_pretrained(tmp_path / "hf")  # vocab 64, no tokenizer.json
    with pytest.raises(ConversionError, match="tokenizer.json"):
        import_hf_folder(tmp_path / "hf", tmp_path / "run")


def test_grouped_query_attention_kv_cache_gives_the_same_tokens():
    config = LMConfig(vocab_size=50, seq_len=12, n_layer=2, n_head=4, n_kv_head=2, d_model=16,
                      moe=MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2))
    torch.manual_seed(0)
    lm = MoETransformerLM(config).eval()
    assert lm.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 4, 16)
    prompt = torch.randint(0, 50, (2, 5))
    cached = lm.generate(prompt, 20, temperature=0, use_cache=True)
    uncached = lm.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("field,value", [("n_kv_head", 3), ("n_kv_head", 0), ("norm_eps", 0.0)])
def test_lm_attention_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        LMConfig(n_head=4, **{field: value})
