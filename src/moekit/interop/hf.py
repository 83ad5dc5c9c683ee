"""Hugging Face ``transformers`` MoE blocks and Mixtral models, in moekit and back.

    from_hf_block(block)   MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock,
                           OlmoeSparseMoeBlock, DeepseekV3MoE, SwitchTransformersSparseMLP -> moekit.MoE
    from_hf_model(model)   MixtralForCausalLM -> MoETransformerLM with the same logits
    to_hf_model(lm)        MoETransformerLM -> MixtralForCausalLM with the same logits
    load_hf_checkpoint(d)  a local folder (config.json + safetensors shards) -> MoETransformerLM,
                           without building the transformers model (either key layout, see below)

Weight layouts (shape suffixes E experts, D d_model, F expert hidden size):
  transformers 5  experts.gate_up_proj [E, 2F, D] (gate rows first), experts.down_proj [E, D, F]
  checkpoints     block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) [F, D], w2 (down) [D, F]
  moekit          experts.w_in [E, D, 2F] = [gate | up], experts.w_out [E, F, D]
so w_in = gate_up_proj^T and w_out = down_proj^T per expert. Attention: moekit's fused
``qkv`` rows are [q_proj | k_proj | v_proj]; moekit's rotary embedding is the same "rotate
half" layout as transformers' Llama/Mixtral, so q/k weights are copied without permutation.

The balance loss: transformers' ``load_balancing_loss_func`` is top_k times moekit's
(``moekit.losses.hf_balance_loss``), so ``router_aux_loss_coef = balance_loss_coef / top_k``
keeps the same training objective in both directions.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.experts import set_expert_layout
from moekit.hugepages import place_in_huge_pages
from moekit.layer import MoE
from moekit.models.lm import LMConfig, MoETransformerLM

SUPPORTED_BLOCKS = (
    "MixtralSparseMoeBlock",
    "Qwen2MoeSparseMoeBlock",
    "Qwen3MoeSparseMoeBlock",
    "OlmoeSparseMoeBlock",
    "DeepseekV3MoE",
    "SwitchTransformersSparseMLP",
)


class ConversionError(ValueError):
    """A model or block that cannot be converted; the message names the field and why."""


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------


def _activation(act_fn: nn.Module, where: str, gated: bool) -> str:
    """moekit's activation for a transformers expert: gated experts (act(gate)·up) must use SiLU
    (SwiGLU); plain ones (act(x·wi)·wo) ReLU or exact GELU."""
    name = type(act_fn).__name__.lower()
    if gated and ("silu" in name or "swish" in name):
        return "swiglu"
    if not gated and name in ("relu", "reluactivation"):
        return "relu"
    if not gated and name == "geluactivation" and not getattr(act_fn, "use_gelu_python", False):
        return "gelu"
    allowed = "silu (gated experts)" if gated else "relu or gelu"
    raise ConversionError(f"{where}: activation {type(act_fn).__name__} has no moekit equivalent; allowed: {allowed}")


def _copy_grouped(moe: MoE, gate_up_EHD: Tensor, down_EDF: Tensor) -> None:
    moe.experts.w_in.copy_(gate_up_EHD.transpose(1, 2))
    moe.experts.w_out.copy_(down_EDF.transpose(1, 2))


def _copy_shared(moe: MoE, mlp: nn.Module) -> None:
    assert moe.shared_experts is not None
    ffn = moe.shared_experts.ffn
    ffn.w_in.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0).t())
    ffn.w_out.copy_(mlp.down_proj.weight.t())


def _loss_coefs(hf_config: Any, top_k: int) -> dict[str, float]:
    """moekit loss coefficients giving the same objective as a transformers config's."""
    if hf_config is None:
        return {}
    coefs: dict[str, float] = {}
    if getattr(hf_config, "router_aux_loss_coef", None) is not None:
        coefs["balance_loss_coef"] = float(hf_config.router_aux_loss_coef) * top_k
    coefs["z_loss_coef"] = float(getattr(hf_config, "router_z_loss_coef", 0.0) or 0.0)
    return coefs


def _block_config(block: nn.Module, hf_config: Any, allow_router_bias: bool = False) -> tuple[MoEConfig, str]:
    """``allow_router_bias``: a Switch router's bias becomes ``MoEConfig.router_bias`` (patch_moe);
    ``from_hf_block`` keeps refusing it, as the bias-free converter it has always been."""
    kind = type(block).__name__
    if kind == "SwitchTransformersSparseMLP":
        router = block.router
        if router.classifier.bias is not None and not allow_router_bias:
            raise ConversionError(f"{kind}: router_bias=True has no moekit equivalent (the router has no bias)")
        expert = block.experts["expert_0"]
        values = dict(
            d_model=router.classifier.in_features,
            d_ff=expert.wi.out_features,
            num_experts=router.num_experts,
            top_k=1,
            router="switch",
            activation=_activation(expert.act, kind, gated=False),
            expert_capacity=int(router.expert_capacity),
            routing_group="sequence",
            drop_priority="position",
            min_capacity=0,
            router_jitter=float(router.jitter_noise),
            expert_dropout=float(expert.dropout.p),
            router_bias=router.classifier.bias is not None,
            **_loss_coefs(hf_config, 1),
        )
        return MoEConfig(**values), kind
    if kind not in SUPPORTED_BLOCKS:
        raise ConversionError(f"from_hf_block: {kind} is not supported; supported blocks: {SUPPORTED_BLOCKS}")
    gate, experts = block.gate, block.experts
    top_k = gate.top_k
    values = dict(
        d_model=gate.hidden_dim,
        d_ff=experts.intermediate_dim,
        num_experts=gate.num_experts,
        top_k=top_k,
        activation=_activation(experts.act_fn, kind, gated=True),
        normalize_weights=bool(getattr(gate, "norm_topk_prob", True)),  # Mixtral always renormalizes
        **_loss_coefs(hf_config, top_k),
    )
    if kind == "MixtralSparseMoeBlock" and block.jitter_noise > 0:
        # NOTE: Mixtral's jitter multiplies the input of router *and* experts in training; moekit's
        # jitter is Switch's (router input only), so it is not carried over. Eval is unaffected.
        warnings.warn(
            f"{kind}: router_jitter_noise={block.jitter_noise} is not carried over (training-only noise)",
            stacklevel=3,
        )
    if kind == "Qwen2MoeSparseMoeBlock":
        values.update(
            num_shared_experts=1,
            shared_expert_d_ff=block.shared_expert.intermediate_size,
            shared_expert_gate=True,
        )
    if kind == "DeepseekV3MoE":
        config = block.config
        values.update(
            router="aux_free",
            n_group=int(gate.num_group),
            topk_group=int(gate.topk_group),
            routed_scaling_factor=float(gate.routed_scaling_factor),
            num_shared_experts=int(config.n_shared_experts),
            shared_expert_d_ff=int(config.moe_intermediate_size),
            z_loss_coef=0.0,
            balance_loss_coef=0.0,  # DeepSeek-V3 balances with the bias, not a loss
        )
        if gate.num_experts // gate.num_group < 2:
            raise ConversionError(f"{kind}: n_group={gate.num_group} leaves fewer than 2 experts per group")
    return MoEConfig(**values), kind


def _copy_switch(moe: MoE, block: nn.Module) -> None:
    """A Switch block's router (and its bias, if any) and experts into ``moe``."""
    classifier = block.router.classifier
    moe.router.weight.copy_(classifier.weight)
    if classifier.bias is not None:
        moe.router.bias.copy_(classifier.bias)
    experts = [block.experts[f"expert_{e}"] for e in range(moe.config.num_experts)]
    moe.experts.w_in.copy_(torch.stack([expert.wi.weight.t() for expert in experts]))
    moe.experts.w_out.copy_(torch.stack([expert.wo.weight.t() for expert in experts]))


@torch.no_grad()
def from_hf_block(block: nn.Module, hf_config: Any = None) -> MoE:
    """A ``moekit.MoE`` computing what the transformers MoE ``block`` computes (eval mode).

    ``hf_config`` (the model's transformers config), when given, also carries the auxiliary
    loss coefficients over (``router_aux_loss_coef`` becomes ``balance_loss_coef · top_k``).
    """
    config, kind = _block_config(block, hf_config)
    moe = MoE(config)
    param = next(block.parameters())
    moe.to(device=param.device, dtype=param.dtype)
    if kind == "SwitchTransformersSparseMLP":
        _copy_switch(moe, block)
        return moe.train(block.training)
    moe.router.weight.copy_(block.gate.weight)
    _copy_grouped(moe, block.experts.gate_up_proj, block.experts.down_proj)
    if kind == "Qwen2MoeSparseMoeBlock":
        _copy_shared(moe, block.shared_expert)
        moe.shared_experts.gate.weight.copy_(block.shared_expert_gate.weight)
    if kind == "DeepseekV3MoE":
        _copy_shared(moe, block.shared_experts)
        moe.router.expert_bias.copy_(block.gate.e_score_correction_bias)
    return moe.train(block.training)


# ---------------------------------------------------------------------------------------
# Mixtral models
# ---------------------------------------------------------------------------------------


def _get(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def lm_config_from_mixtral(config: Any) -> LMConfig:
    """The moekit LMConfig of a transformers MixtralConfig (or its config.json dict)."""
    model_type = _get(config, "model_type")
    if model_type != "mixtral":
        raise ConversionError(
            f"config.model_type={model_type!r}: only 'mixtral' checkpoints convert to a moekit LM "
            "(the other families convert block by block with from_hf_block)"
        )
    required = ("hidden_size", "num_attention_heads", "intermediate_size", "num_local_experts",
                "num_experts_per_tok", "num_hidden_layers", "vocab_size", "max_position_embeddings")
    for name in required:
        value = _get(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConversionError(f"config.{name}={value!r}: must be an integer >= 1")
    hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
    if hidden % heads != 0:
        raise ConversionError(f"config.hidden_size={hidden}: must be divisible by num_attention_heads={heads}")
    head_dim = _get(config, "head_dim")
    if head_dim not in (None, hidden // heads):
        raise ConversionError(f"config.head_dim={head_dim}: moekit needs head_dim = hidden_size / num_attention_heads")
    if _get(config, "sliding_window") is not None:
        raise ConversionError(
            f"config.sliding_window={_get(config, 'sliding_window')}: moekit attends to the whole context; "
            "only sliding_window=None converts"
        )
    if _get(config, "hidden_act", "silu") != "silu":
        raise ConversionError(f"config.hidden_act={_get(config, 'hidden_act')!r}: only silu (SwiGLU) converts")
    rope = _get(config, "rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"config.rope_parameters.rope_type={rope.get('rope_type')!r}: only 'default' converts")
    rope_theta = rope.get("rope_theta", _get(config, "rope_theta", 1e6))
    top_k = _get(config, "num_experts_per_tok")
    aux_coef = _get(config, "router_aux_loss_coef", 0.001)
    moe = MoEConfig(
        d_model=hidden,
        d_ff=_get(config, "intermediate_size"),
        num_experts=_get(config, "num_local_experts"),
        top_k=top_k,
        router="topk",
        activation="swiglu",
        normalize_weights=True,
        balance_loss_coef=float(aux_coef) * top_k,
        z_loss_coef=0.0,
    )
    return LMConfig(
        vocab_size=_get(config, "vocab_size"),
        seq_len=_get(config, "max_position_embeddings"),
        n_layer=_get(config, "num_hidden_layers"),
        n_head=heads,
        n_kv_head=_get(config, "num_key_value_heads") or heads,
        d_model=hidden,
        arch="moe",
        moe_every=1,
        tie_embeddings=bool(_get(config, "tie_word_embeddings", False)),
        dropout=0.0,
        rope_theta=float(rope_theta),
        norm_eps=float(_get(config, "rms_norm_eps", 1e-5)),
        moe=moe,
    )


def mixtral_incompatibility(config: LMConfig) -> list[str]:
    """Why a moekit LM is not expressible as a transformers Mixtral (empty when it is)."""
    moe = config.moe
    reasons = []
    if config.arch != "moe":
        reasons.append(f"arch={config.arch!r} (Mixtral has an MoE FFN in every layer)")
    if config.moe_every != 1:
        reasons.append(f"moe_every={config.moe_every} (Mixtral has an MoE FFN in every layer, so it must be 1)")
    if moe.router != "topk":
        reasons.append(f"moe.router={moe.router!r} (Mixtral routes with softmax top-k: 'topk')")
    if moe.activation != "swiglu":
        reasons.append(f"moe.activation={moe.activation!r} (Mixtral experts are SwiGLU)")
    if not moe.normalize_weights:
        reasons.append("moe.normalize_weights=False (Mixtral renormalizes the top-k weights)")
    if moe.num_shared_experts:
        reasons.append(f"moe.num_shared_experts={moe.num_shared_experts} (Mixtral has no shared experts)")
    if moe.capacity_factor is not None or moe.eval_capacity_factor is not None or moe.expert_capacity is not None:
        reasons.append("a finite expert capacity (Mixtral is dropless)")
    # Fields Mixtral's block has no place for: exporting would drop them silently.
    if moe.routed_scaling_factor != 1.0:
        reasons.append(f"moe.routed_scaling_factor={moe.routed_scaling_factor} (Mixtral's gates are not scaled: 1.0)")
    if moe.router_bias:
        reasons.append("moe.router_bias=True (Mixtral's router has no bias)")
    if moe.expert_biases:
        reasons.append("moe.expert_biases=True (Mixtral's experts have no biases)")
    if moe.n_group != 1:
        reasons.append(f"moe.n_group={moe.n_group} (Mixtral has no group-limited routing: 1)")
    return reasons


def mixtral_config_from_lm(config: LMConfig) -> Any:
    from transformers import MixtralConfig

    reasons = mixtral_incompatibility(config)
    if reasons:
        raise ConversionError("this model is not expressible as a transformers Mixtral: " + "; ".join(reasons))
    moe = config.moe
    return MixtralConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=moe.d_ff,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads,
        hidden_act="silu",
        max_position_embeddings=config.seq_len,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        sliding_window=None,
        num_experts_per_tok=moe.top_k,
        num_local_experts=moe.num_experts,
        router_aux_loss_coef=moe.balance_loss_coef / moe.top_k,
        router_jitter_noise=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _moekit_state_from_fused(get: Any, config: LMConfig) -> dict[str, Tensor]:
    """moekit state dict from transformers-5 names (``get(name)`` returns a tensor)."""
    state = {"embed.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    if not config.tie_embeddings:
        state["lm_head.weight"] = get("lm_head.weight")
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight"), get(p + "self_attn.v_proj.weight")]
        )
        state[f"blocks.{i}.attn.proj.weight"] = get(p + "self_attn.o_proj.weight")
        state[f"blocks.{i}.attn_norm.weight"] = get(p + "input_layernorm.weight")
        state[f"blocks.{i}.ffn_norm.weight"] = get(p + "post_attention_layernorm.weight")
        state[f"blocks.{i}.ffn.router.weight"] = get(p + "mlp.gate.weight")
        state[f"blocks.{i}.ffn.experts.w_in"] = get(p + "mlp.experts.gate_up_proj").transpose(1, 2).contiguous()
        state[f"blocks.{i}.ffn.experts.w_out"] = get(p + "mlp.experts.down_proj").transpose(1, 2).contiguous()
    return state


@torch.no_grad()
def from_hf_model(model: nn.Module, expert_layout: str = "rows") -> MoETransformerLM:
    """A moekit LM with the same logits as a transformers ``MixtralForCausalLM``, its experts
    stored as ``expert_layout`` (``moekit.experts.set_expert_layout``: by default "rows",
    transformers' own [O, I] per expert, which moekit.matvec decodes fastest)."""
    if type(model).__name__ != "MixtralForCausalLM":
        raise ConversionError(f"from_hf_model: expected a MixtralForCausalLM, got {type(model).__name__}")
    config = lm_config_from_mixtral(model.config)
    hf_state = model.state_dict()
    lm = MoETransformerLM(config)
    state = _moekit_state_from_fused(lambda name: hf_state[name], config)
    lm.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    _check_complete(lm, state)
    lm = lm.to(next(model.parameters()).dtype).train(model.training)
    set_expert_layout(lm, expert_layout)
    place_in_huge_pages(lm)  # a converted model is for running: weights in huge pages (moekit.hugepages)
    return lm


def _check_complete(lm: MoETransformerLM, state: dict[str, Tensor]) -> None:
    expected = {name for name, _ in lm.named_parameters()}
    missing = sorted(expected - set(state))
    if missing:
        raise ConversionError(f"weights missing for {missing[:5]}")


@torch.no_grad()
def to_hf_model(lm: MoETransformerLM) -> nn.Module:
    """A transformers ``MixtralForCausalLM`` with the same logits as the moekit LM.

    Raises ``ConversionError`` (a ValueError) naming every field that Mixtral cannot express.
    """
    from transformers import MixtralForCausalLM

    config = lm.config
    hf = MixtralForCausalLM(mixtral_config_from_lm(config)).to(next(lm.parameters()).dtype)
    state = lm.state_dict()
    q_dim = config.d_model
    kv_dim = config.kv_heads * (config.d_model // config.n_head)
    target = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not config.tie_embeddings:
        target["lm_head.weight"] = state["lm_head.weight"]
    for i in range(config.n_layer):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        q, k, v = state[b + "attn.qkv.weight"].split([q_dim, kv_dim, kv_dim])
        target[p + "self_attn.q_proj.weight"] = q
        target[p + "self_attn.k_proj.weight"] = k
        target[p + "self_attn.v_proj.weight"] = v
        target[p + "self_attn.o_proj.weight"] = state[b + "attn.proj.weight"]
        target[p + "input_layernorm.weight"] = state[b + "attn_norm.weight"]
        target[p + "post_attention_layernorm.weight"] = state[b + "ffn_norm.weight"]
        target[p + "mlp.gate.weight"] = state[b + "ffn.router.weight"]
        target[p + "mlp.experts.gate_up_proj"] = state[b + "ffn.experts.w_in"].transpose(1, 2)
        target[p + "mlp.experts.down_proj"] = state[b + "ffn.experts.w_out"].transpose(1, 2)
    hf_params = dict(hf.named_parameters())
    for name, value in target.items():
        hf_params[name].copy_(value)
    unset = sorted(set(hf_params) - set(target))
    if unset:
        raise ConversionError(f"to_hf_model: no moekit weights for {unset[:5]}")
    return hf.train(lm.training)


# ---------------------------------------------------------------------------------------
# Local checkpoint folders
# ---------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path}: unreadable JSON ({error})") from error


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index}: no weight_map naming the safetensors shards")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise ConversionError(f"{index}: names shards that are missing from {folder}: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{folder}: no *.safetensors weights (only safetensors checkpoints are read)")
    return files


def _load_tensors(files: list[Path]) -> tuple[dict[str, Tensor], dict[str, Path]]:
    """Every tensor of the shards, and the file each came from (for error messages)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, Tensor] = {}
    source: dict[str, Path] = {}
    for file in files:
        try:
            loaded = load_file(str(file))
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise ConversionError(f"{file}: unreadable safetensors file, truncated or corrupt ({error})") from error
        tensors.update(loaded)
        source.update(dict.fromkeys(loaded, file))
    return tensors, source


def _expected_shapes(config: LMConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every weight a Mixtral folder of ``config`` holds, in both key layouts."""
    D, F, E, V = config.d_model, config.moe.d_ff, config.moe.num_experts, config.vocab_size
    kv_dim = config.kv_heads * (D // config.n_head)
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (D, D), p + "self_attn.k_proj.weight": (kv_dim, D),
            p + "self_attn.v_proj.weight": (kv_dim, D), p + "self_attn.o_proj.weight": (D, D),
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate.weight": (E, D), p + "block_sparse_moe.gate.weight": (E, D),
            p + "mlp.experts.gate_up_proj": (E, 2 * F, D), p + "mlp.experts.down_proj": (E, D, F),
        })
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes.update({q + "w1.weight": (F, D), q + "w3.weight": (F, D), q + "w2.weight": (D, F)})
    return shapes


def _check_shapes(tensors: dict[str, Tensor], source: dict[str, Path], config: LMConfig, folder: Path) -> None:
    """A tensor whose shape disagrees with config.json is an error naming the file and tensor."""
    for name, shape in _expected_shapes(config).items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise ConversionError(
                f"{source[name]}: tensor {name} has shape {list(tensors[name].shape)} but {folder / 'config.json'} "
                f"implies {list(shape)} (hidden_size={config.d_model}, intermediate_size={config.moe.d_ff}, "
                f"num_local_experts={config.moe.num_experts}, vocab_size={config.vocab_size})"
            )


def _legacy_to_fused(tensors: dict[str, Tensor], config: LMConfig, folder: Path | None = None) -> dict[str, Tensor]:
    """Per-expert ``block_sparse_moe.experts.{e}.w1/w2/w3`` keys (the original Mixtral release)
    merged into transformers-5 ``mlp.experts.gate_up_proj`` / ``down_proj``."""
    out = {}
    for name, value in tensors.items():
        if ".block_sparse_moe.experts." not in name:
            out[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = value
    for i in range(config.n_layer):
        p = f"model.layers.{i}.block_sparse_moe.experts."
        if not any(name.startswith(p) for name in tensors):
            continue
        experts = range(config.moe.num_experts)
        names = [f"{p}{e}.{w}.weight" for e in experts for w in ("w1", "w2", "w3")]
        missing = [name for name in names if name not in tensors]
        if missing:
            where = folder if folder is not None else "the checkpoint"
            raise ConversionError(
                f"{where}: expert weight {missing[0]} not found in the safetensors files"
                + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
            )
        gate_EFD = torch.stack([tensors[f"{p}{e}.w1.weight"] for e in experts])
        up_EFD = torch.stack([tensors[f"{p}{e}.w3.weight"] for e in experts])
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([gate_EFD, up_EFD], dim=1)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([tensors[f"{p}{e}.w2.weight"] for e in experts])
    return out


def mixtral_folder_config(folder: Path) -> tuple[LMConfig, dict]:
    """The moekit LMConfig of a local transformers Mixtral folder, and its config.json as a dict;
    a missing, unreadable or invalid config.json is a ``ConversionError`` naming it."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ConversionError(f"{config_path}: missing; {folder} is not a Hugging Face model folder")
    hf_config = _read_json(config_path)
    if not isinstance(hf_config, dict):
        raise ConversionError(f"{config_path}: expected a JSON object")
    try:
        return lm_config_from_mixtral(hf_config), hf_config
    except ConversionError as error:
        raise ConversionError(f"{config_path}: {error}") from error
    except ValueError as error:  # a ConfigError: a size that is not a size
        raise ConversionError(f"{config_path}: does not describe a valid model ({error})") from error


@torch.no_grad()
def load_hf_checkpoint(folder: str | Path) -> tuple[MoETransformerLM, dict]:
    """A moekit LM from a local transformers Mixtral folder (config.json + safetensors shards);
    returns the model (float32) and the folder's config.json as a dict.

    The folder is checked before anything is built: an unreadable or truncated shard, a
    missing tensor, or a tensor whose shape disagrees with config.json is a ``ConversionError``
    naming the file and the tensor."""
    folder = Path(folder)
    config, hf_config = mixtral_folder_config(folder)
    tensors, source = _load_tensors(_safetensors_files(folder))
    _check_shapes(tensors, source, config, folder)
    tensors = _legacy_to_fused(tensors, config, folder)

    def get(name: str) -> Tensor:
        if name not in tensors:
            raise ConversionError(f"{folder}: weight {name} not found in the safetensors files")
        return tensors[name]

    lm = MoETransformerLM(config)
    state = _moekit_state_from_fused(get, config)
    _check_complete(lm, state)
    lm.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return lm.eval(), hf_config


# ---------------------------------------------------------------------------------------
# Run directories <-> Hugging Face folders
# ---------------------------------------------------------------------------------------


def hf_tokenizer_payload(folder: str | Path, vocab_size: int) -> dict:
    """The run-directory tokenizer entry for a Hugging Face folder: its tokenizer.json, or
    moekit's byte tokenizer for a 256-token vocabulary."""
    path = Path(folder) / "tokenizer.json"
    if path.exists():
        return {"kind": "bpe", "tokenizer": json.loads(path.read_text())}
    if vocab_size == 256:
        return {"kind": "bytes"}
    raise ConversionError(
        f"{path}: missing, and vocab_size={vocab_size} is not moekit's byte vocabulary (256): "
        "text cannot be tokenized for this model"
    )


def load_run_or_hf_folder(source: str | Path) -> tuple[MoETransformerLM, dict]:
    """A model and its run payload (model, train, tokenizer) from a moekit run directory or a
    local Hugging Face Mixtral folder."""
    from dataclasses import asdict

    from moekit.training.checkpoint import CONFIG_FILE, CheckpointError, load_model_from_run
    from moekit.training.config import TrainConfig

    source = Path(source)
    config_path = source / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"{config_path}: missing; --from needs a moekit run directory or a Hugging Face folder")
    payload = json.loads(config_path.read_text())
    if "model" in payload and "train" in payload:
        return load_model_from_run(source)
    model, _ = load_hf_checkpoint(source)
    return model, {
        "model": model.config.to_dict(),
        "train": asdict(TrainConfig()),
        "tokenizer": hf_tokenizer_payload(source, model.config.vocab_size),
    }


def import_hf_folder(folder: str | Path, out: str | Path) -> Path:
    """Write a moekit run directory (config.json + checkpoint/) for a local HF Mixtral folder."""
    from dataclasses import asdict

    from moekit.training.checkpoint import CONFIG_FILE, CheckpointError, save_checkpoint, write_json_atomic
    from moekit.training.config import TrainConfig

    out = Path(out)
    if (out / CONFIG_FILE).exists():
        raise CheckpointError(f"{out / CONFIG_FILE}: {out} already holds a run; choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not an empty directory; choose another --out")
    lm, _ = load_hf_checkpoint(folder)
    tokenizer = hf_tokenizer_payload(folder, lm.config.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / CONFIG_FILE, {"model": lm.config.to_dict(), "train": asdict(TrainConfig()), "tokenizer": tokenizer}
    )
    save_checkpoint(out, lm, {"imported_from": str(Path(folder).resolve())})
    return out


def is_run_directory(path: Path) -> bool:
    """A moekit run directory: its config.json has model and train sections (a run writes
    config.json before its first checkpoint)."""
    from moekit.training.checkpoint import CONFIG_FILE

    try:
        payload = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(payload, dict) and "model" in payload and "train" in payload


def check_export_folder(run_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """Where ``export_run`` may write: a new or empty folder, a non-empty one only with
    ``force``; never a file, the run itself, any moekit run directory or a folder inside one
    (a run is never overwritten)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--hf {out}: is a file, not a folder (nothing was written)")
    resolved = out.resolve()
    for folder in (resolved, *resolved.parents):  # the folder itself, or a run it lies inside
        if folder == Path(run_dir).resolve() or (folder.is_dir() and is_run_directory(folder)):
            where = "is" if folder == resolved else f"lies inside {folder}, which is"
            raise ConversionError(
                f"--hf {out}: {where} a moekit run directory; export writes a separate folder and never into a "
                "run (nothing was written, --force or not)"
            )
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConversionError(
            f"--hf {out}: the folder is not empty; pass --force to write config.json and the weights into it, "
            "or choose a new folder (nothing was written)"
        )
    return out


def export_run(run_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write a run's latest checkpoint as a folder that
    ``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads (a BPE tokenizer goes
    along as tokenizer.json; the byte tokenizer needs none: token id = byte value).

    ``out`` is checked first (``check_export_folder``): nothing is written into a file, a
    moekit run directory, or a non-empty folder unless ``force``."""
    from moekit.training.checkpoint import load_model_from_run

    out = check_export_folder(run_dir, out, force)
    lm, payload = load_model_from_run(run_dir)
    reasons = mixtral_incompatibility(lm.config)
    if reasons:
        raise ConversionError(f"{run_dir}: not expressible as a transformers Mixtral: " + "; ".join(reasons))
    hf = to_hf_model(lm.eval())
    hf.save_pretrained(out)
    tokenizer = payload.get("tokenizer", {"kind": "bytes"})
    if tokenizer.get("kind") == "bpe":
        (out / "tokenizer.json").write_text(json.dumps(tokenizer["tokenizer"]))
    return out
