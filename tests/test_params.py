"""Parameter arithmetic of MoE models (moekit.models.cost, moekit params).

Verifies: the golden Mixtral 8x7B figures; every preset's formula against transformers' own
parameter count of the full-size architecture (built on the meta device: nothing allocated)
and against the published totals; scaled-down configs of every family against the
transformers model built from them; active parameters, FLOPs and memory at hand-computed
values; moekit run directories against ``count_parameters``; the CLI's --json.

    pytest tests/test_params.py
"""

from __future__ import annotations

import json

import pytest
import torch

from moekit.cli.main import main
from moekit.config import MoEConfig
from moekit.models.cost import cost_from_hf_config, cost_from_lm_config, count_parameters, load_cost
from moekit.models.lm import LMConfig, MoETransformerLM
from moekit.models.presets import PRESETS


def test_mixtral_8x7b_golden_figures():
    cost = load_cost("mixtral-8x7b")
    assert cost.total == 46_702_792_704
    assert cost.active == 12_879_925_248


@pytest.mark.parametrize(
    "preset,total_billions,active_billions",
    [
        # Published: Mixtral 8x22B 141B / 39B; DeepSeek-V3 671B / 37B; Qwen3-30B-A3B 30.5B / 3.3B;
        # OLMoE-1B-7B 6.9B / 1.3B; Switch-Base-128 7.4B.
        ("mixtral-8x22b", 141, 39),
        ("deepseek-v3", 671, 37),
        ("qwen3-30b-a3b", 30.5, 3.3),
        ("olmoe-1b-7b", 6.9, 1.3),
        ("switch-base-128", 7.4, None),
    ],
)
def test_presets_match_published_sizes(preset, total_billions, active_billions):
    cost = load_cost(preset)
    assert cost.total / 1e9 == pytest.approx(total_billions, rel=0.01)
    if active_billions is not None:
        assert cost.active / 1e9 == pytest.approx(active_billions, rel=0.03)


def hf_model_class(family: str):
    import transformers

    return {
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
        "switch_transformers": (
            transformers.SwitchTransformersConfig,
            transformers.SwitchTransformersForConditionalGeneration,
        ),
    }[family]


def transformers_count(values: dict) -> int:
    pytest.importorskip("transformers")
    config_class, model_class = hf_model_class(values["model_type"])
    config = config_class(**{k: v for k, v in values.items() if k != "model_type"})
    with torch.device("meta"):
        model = model_class(config)
    return model.num_parameters()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_formula_equals_transformers_full_size_count(preset):
    assert cost_from_hf_config(PRESETS[preset]).total == transformers_count(PRESETS[preset])


SMALL_CONFIGS = [
    {"model_type": "mixtral", "vocab_size": 97, "hidden_size": 24, "intermediate_size": 20, "num_hidden_layers": 3,
     "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 5, "num_experts_per_tok": 2,
     "tie_word_embeddings": True},
    {"model_type": "qwen2_moe", "vocab_size": 97, "hidden_size": 24, "intermediate_size": 40,
     "moe_intermediate_size": 8,
     "shared_expert_intermediate_size": 12, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
     "num_experts": 6, "num_experts_per_tok": 2, "decoder_sparse_step": 2, "mlp_only_layers": [3]},
    {"model_type": "qwen3_moe", "vocab_size": 97, "hidden_size": 24, "intermediate_size": 40,
     "moe_intermediate_size": 8,
     "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 10, "num_experts": 6,
     "num_experts_per_tok": 3, "mlp_only_layers": [1]},
    {"model_type": "olmoe", "vocab_size": 97, "hidden_size": 24, "intermediate_size": 8, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 6, "num_experts_per_tok": 2},
    {"model_type": "deepseek_v3", "vocab_size": 97, "hidden_size": 24, "intermediate_size": 40,
     "moe_intermediate_size": 8, "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4,
     "num_key_value_heads": 4, "q_lora_rank": 12, "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 2,
     "v_head_dim": 6, "n_routed_experts": 8, "n_shared_experts": 2, "num_experts_per_tok": 2, "n_group": 2,
     "topk_group": 1},
    {"model_type": "deepseek_v3", "vocab_size": 97, "hidden_size": 24, "intermediate_size": 40,
     "moe_intermediate_size": 8, "num_hidden_layers": 2, "first_k_dense_replace": 0, "num_attention_heads": 4,
     "num_key_value_heads": 4, "q_lora_rank": None, "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 2,
     "v_head_dim": 6, "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1,
     "topk_group": 1},
    {"model_type": "switch_transformers", "vocab_size": 97, "d_model": 24, "d_ff": 16, "d_kv": 6, "num_heads": 4,
     "num_layers": 4, "num_decoder_layers": 3, "num_sparse_encoder_layers": 2, "num_sparse_decoder_layers": 1,
     "num_experts": 4, "relative_attention_num_buckets": 8, "router_bias": True, "tie_word_embeddings": False},
]


@pytest.mark.parametrize("values", SMALL_CONFIGS, ids=lambda v: v["model_type"])
def test_formula_equals_transformers_on_scaled_down_configs(values):
    assert cost_from_hf_config(values).total == transformers_count(values)


def test_active_params_and_components_at_hand_computed_values():
    values = {"model_type": "mixtral", "vocab_size": 10, "hidden_size": 4, "intermediate_size": 3,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "num_local_experts": 4,
              "num_experts_per_tok": 1, "tie_word_embeddings": False}
    cost = cost_from_hf_config(values)
    # embeddings 2·10·4; attention per layer q,o 4·4 each + k,v 4·2 each; experts 4·3·4·3 per layer;
    # routers 4·4 per layer; norms 2·4 per layer + 4.
    assert cost.components == {
        "embeddings": 80, "attention": 2 * 48, "dense_ffn": 0, "routed_experts": 2 * 144, "shared_experts": 0,
        "routers": 2 * 16, "norms": 20,
    }
    assert cost.total == 80 + 96 + 288 + 32 + 20
    assert cost.active == cost.total - 288 * 3 // 4
    # FLOPs: 2 per active weight except the input table (40), plus 2·context·(2·head dim) per head and layer.
    assert cost.forward_flops_per_token(context=5) == 2 * (cost.active - 40) + 2 * 5 * (2 * 2 * 2 * 2)
    assert cost.memory_bytes() == {"fp32": 4.0 * cost.total, "bf16": 2.0 * cost.total, "int8": 1.0 * cost.total,
                                   "int4": 0.5 * cost.total}


def test_explanation_names_why_total_is_not_experts_times_dense():
    text = load_cost("mixtral-8x7b").explanation()
    assert "46,702,792,704" in text and "not copied" in text
    assert "57,942,245,376" in text  # 8 x (shared + one expert per layer) = 8 x 7,242,780,672


@pytest.mark.parametrize("arch,moe_every,shared", [("moe", 1, 0), ("moe", 2, 1), ("dense", 1, 0)])
def test_moekit_config_counts_equal_the_built_model(arch, moe_every, shared):
    config = LMConfig(vocab_size=50, n_layer=4, n_head=2, n_kv_head=1, d_model=16, arch=arch, moe_every=moe_every,
                      tie_embeddings=False, moe=MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2,
                                                         num_shared_experts=shared))
    cost = cost_from_lm_config(config)
    counts = count_parameters(MoETransformerLM(config))
    assert (cost.total, cost.active) == (counts.total, counts.active)
    assert cost.components["routed_experts"] == counts.routed_experts


def test_run_directory_and_config_json_are_read(tmp_path):
    config = LMConfig(vocab_size=32, n_layer=1, n_head=2, d_model=8, moe=MoEConfig(d_model=8, d_ff=4))
    (tmp_path / "config.json").write_text(json.dumps({"model": config.to_dict(), "train": {}}))
    assert load_cost(str(tmp_path)).total == count_parameters(MoETransformerLM(config)).total
    hf_path = tmp_path / "hf.json"
    hf_path.write_text(json.dumps(PRESETS["olmoe-1b-7b"]))
    assert load_cost(str(hf_path)).total == load_cost("olmoe-1b-7b").total


@pytest.mark.parametrize("spec,message", [("nope-7b", "neither a preset"), ("{bad", "neither a preset")])
def test_unknown_model_is_rejected_naming_the_presets(spec, message):
    with pytest.raises(ValueError, match=message):
        load_cost(spec)


def test_unsupported_family_is_rejected(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        load_cost(str(path))


def test_cli_params_json(capsys):
    assert main(["params", "mixtral-8x7b", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["total_params"] == 46_702_792_704 and payload["active_params"] == 12_879_925_248
    assert set(payload["components"]) >= {"embeddings", "attention", "routed_experts", "shared_experts", "routers",
                                          "norms"}
    assert payload["weight_memory_bytes"]["bf16"] == 2 * 46_702_792_704
    assert main(["params", "no-such-model"]) == 2
