"""Invalid configurations and inputs fail at the boundary with a message naming the field,
the value and what is allowed.

    pytest tests/test_config.py
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"top_k": 0}, r"top_k=0 .*>= 1"),
        ({"top_k": 9}, r"top_k=9 .*num_experts=8"),
        ({"capacity_factor": 0.0}, r"capacity_factor=0.0 .*> 0"),
        ({"capacity_factor": -1}, r"capacity_factor=-1"),
        ({"eval_capacity_factor": float("nan")}, r"eval_capacity_factor=nan"),
        ({"router": "hash2"}, r"router='hash2' .*topk"),
        ({"activation": "tanh"}, r"activation='tanh' .*swiglu"),
        ({"second_expert_policy": "maybe"}, r"second_expert_policy='maybe'"),
        ({"drop_priority": "age"}, r"drop_priority='age'"),
        ({"router": "switch", "top_k": 2}, r"top_k=2 .*switch"),
        ({"router": "gshard", "top_k": 1}, r"top_k=1 .*gshard"),
        ({"router": "noisy_topk", "top_k": 8}, r"top_k=8 .*noisy_topk"),
        ({"router_jitter": 0.01}, r"router_jitter=0.01 .*switch"),
        ({"router": "switch", "top_k": 1, "router_jitter": 1.5}, r"router_jitter=1.5"),
        ({"expert_dropout": 1.0}, r"expert_dropout=1.0"),
        ({"min_capacity": -1}, r"min_capacity=-1"),
        ({"balance_loss_coef": -0.1}, r"balance_loss_coef=-0.1"),
        ({"n_group": 3}, r"n_group=3 .*num_experts=8"),
        ({"n_group": 2}, r"n_group=2 .*aux_free"),
        ({"router": "aux_free", "n_group": 4, "topk_group": 5}, r"topk_group=5"),
        ({"router": "aux_free", "n_group": 4, "topk_group": 1, "top_k": 4}, r"topk_group=1"),
        ({"shared_expert_gate": True}, r"shared_expert_gate=True .*num_shared_experts"),
        ({"d_model": 0}, r"d_model=0"),
        ({"num_experts": 2.5}, r"num_experts=2.5"),
        ({"expert_impl": "cuda"}, r"expert_impl='cuda'"),
    ],
)
def test_invalid_config_raises_naming_the_field(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(**{"num_experts": 8, "top_k": 2, **overrides})


def test_unknown_field_from_dict_raises():
    with pytest.raises(ValueError, match="unknown fields"):
        MoEConfig.from_dict({"num_expert": 8})
    assert MoEConfig.from_dict(MoEConfig().to_dict()) == MoEConfig()


def test_wrong_last_dimension_names_both_numbers():
    layer = MoE(MoEConfig(d_model=16, d_ff=8, num_experts=4))
    with pytest.raises(ValueError, match=r"last dimension is 12 but d_model=16"):
        layer(torch.randn(3, 12))


def test_bad_token_mask_raises():
    layer = MoE(MoEConfig(d_model=16, d_ff=8, num_experts=4))
    with pytest.raises(ValueError, match="token_mask has shape"):
        layer(torch.randn(3, 16), token_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        layer(torch.randn(3, 16), token_mask=torch.ones(3))


def test_expert_module_count_must_match():
    with pytest.raises(ValueError, match="3 expert modules .*num_experts=4"):
        MoE(MoEConfig(d_model=16, d_ff=8, num_experts=4), experts=[torch.nn.Identity()] * 3)


def test_mutated_config_is_rechecked_at_construction():
    config = MoEConfig(num_experts=8, top_k=2)
    config.top_k = 20
    with pytest.raises(ValueError, match="top_k=20"):
        MoE(config)


def test_config_error_keeps_owner_field_value_and_allowed():
    from moekit.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        MoEConfig(capacity_factor=float("inf"))
    err = caught.value
    assert (err.owner, err.field, err.allowed) == ("MoEConfig", "capacity_factor", "must be None (dropless) or a "
                                                   "finite number > 0")
    assert str(err) == "MoEConfig.capacity_factor=inf is invalid: " + err.allowed


def test_router_decides_top_k_unless_given():
    base = MoEConfig(num_experts=8, top_k=2)
    assert base.with_changes(router="switch").top_k == 1
    assert base.with_changes(router="switch", top_k=1).top_k == 1
    assert MoEConfig(num_experts=8, top_k=1).with_changes(router="gshard").top_k == 2
    assert base.with_changes(router="topk").top_k == 2  # no rule: unchanged
    with pytest.raises(ValueError, match=r"top_k=3 .*switch"):
        base.with_changes(router="switch", top_k=3)  # a given top_k is never silently replaced


def test_lm_with_changes_keeps_moe_d_model_equal_to_d_model():
    from moekit.models.lm import LMConfig

    config = LMConfig().with_changes({"d_model": 64, "n_layer": 2}, {"num_experts": 4})
    assert config.d_model == config.moe.d_model == 64 and config.moe.num_experts == 4 and config.n_layer == 2
    with pytest.raises(ValueError, match="unknown fields"):
        LMConfig().with_changes({"num_experts": 4})
    with pytest.raises(ValueError, match="follows d_model"):
        LMConfig().with_changes({}, {"d_model": 64})


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ({"rope_theta": float("inf")}, r"LMConfig.rope_theta=inf"),
        ({"norm_eps": float("nan")}, r"LMConfig.norm_eps=nan"),
        ({"dropout": float("nan")}, r"LMConfig.dropout=nan"),
        ({"n_layer": -2}, r"LMConfig.n_layer=-2"),
    ],
)
def test_lm_config_rejects_non_finite_and_negative_values(values, pattern):
    from moekit.models.lm import LMConfig

    with pytest.raises(ValueError, match=pattern):
        LMConfig(**values)


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ({"lr": float("nan")}, r"TrainConfig.lr=nan .*finite number > 0"),
        ({"lr": float("inf")}, r"TrainConfig.lr=inf"),
        ({"lr": 0.0}, r"TrainConfig.lr=0.0"),
        ({"max_minutes": float("nan")}, r"TrainConfig.max_minutes=nan"),
        ({"max_minutes": float("inf")}, r"TrainConfig.max_minutes=inf"),
        ({"max_minutes": 0}, r"TrainConfig.max_minutes=0"),
        ({"grad_clip": -1.0}, r"TrainConfig.grad_clip=-1.0"),
        ({"weight_decay": float("inf")}, r"TrainConfig.weight_decay=inf"),
        ({"beta2": 1.0}, r"TrainConfig.beta2=1.0"),
        ({"min_lr_ratio": -0.1}, r"TrainConfig.min_lr_ratio=-0.1"),
        ({"warmup_steps": -1}, r"TrainConfig.warmup_steps=-1"),
        ({"checkpoint_interval": 0}, r"TrainConfig.checkpoint_interval=0"),
        ({"seed": -1}, r"TrainConfig.seed=-1"),
        ({"bpe_vocab_size": 256}, r"TrainConfig.bpe_vocab_size=256"),
        ({"device": "gpu"}, r"TrainConfig.device='gpu'"),
        ({"batch_size": 2.0}, r"TrainConfig.batch_size=2.0"),
    ],
)
def test_train_config_is_validated_at_construction_and_from_disk(values, pattern):
    from dataclasses import asdict

    from moekit.training.config import TrainConfig

    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**values)
    with pytest.raises(ValueError, match=pattern):  # a config.json's train section, read back
        TrainConfig.from_dict({**asdict(TrainConfig()), **values})
