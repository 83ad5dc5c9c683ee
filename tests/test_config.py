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
