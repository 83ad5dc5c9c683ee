"""Parameter arithmetic of MoE models: total vs active parameters.

Total counts every parameter once (tied embeddings once). Active counts what one token's
forward touches: of each MoE layer's routed experts only top_k of num_experts (for expert
choice, top_k is the average number of experts per token), everything else in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from moekit.layer import MoE


@dataclass
class ParameterCount:
    total: int
    active: int
    routed_experts: int  # all routed expert parameters (part of total)

    def to_dict(self) -> dict[str, int]:
        return {
            "total_params": self.total,
            "active_params": self.active,
            "routed_expert_params": self.routed_experts,
        }


def count_parameters(model: nn.Module) -> ParameterCount:
    total = sum(p.numel() for p in model.parameters())
    routed = 0
    inactive = 0.0
    outer_names: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, MoE) or any(name.startswith(outer + ".") for outer in outer_names):
            continue  # NOTE: a nested (hierarchical) MoE counts inside its outer layer's experts
        outer_names.append(name)
        expert_params = sum(p.numel() for p in module.experts.parameters())
        routed += expert_params
        config = module.config
        capacity_factor = config.capacity_factor or 1.0
        experts_per_token = config.top_k * (capacity_factor if config.router == "expert_choice" else 1.0)
        inactive += expert_params * (1 - min(1.0, experts_per_token / config.num_experts))
    return ParameterCount(total=total, active=round(total - inactive), routed_experts=routed)


# ---------------------------------------------------------------------------------------
# The cost of a whole architecture from its config: moekit params PRESET|config.json|RUN_DIR
# ---------------------------------------------------------------------------------------

COMPONENTS = ("embeddings", "attention", "dense_ffn", "routed_experts", "shared_experts", "routers", "norms")
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass
class ModelCost:
    """Parameters by component, what one token uses, forward FLOPs and weight memory.

    ``components`` counts every parameter once (tied embeddings once), as transformers'
    ``model.num_parameters()`` does (buffers such as DeepSeek-V3's score-correction bias are
    not parameters). Of the routed experts a token uses top_k of num_experts in each MoE
    layer; every other component is used in full.
    """

    name: str
    family: str
    components: dict[str, int]
    num_layers: int
    moe_layers: int
    num_experts: int
    top_k: int
    input_embedding: int  # the lookup table: parameters but no matmul FLOPs
    attention_width: int  # Σ over layers of heads·(qk head dim + v head dim): the context term of FLOPs
    expert_params: int  # parameters of one routed expert

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def active_components(self) -> dict[str, int]:
        active = dict(self.components)
        if self.num_experts:
            active["routed_experts"] = self.components["routed_experts"] * self.top_k // self.num_experts
        return active

    @property
    def active(self) -> int:
        return sum(self.active_components.values())

    def forward_flops_per_token(self, context: int) -> int:
        """2 FLOPs per multiply-add of every active weight that a token multiplies (the input
        embedding is a lookup, not a matmul), plus attention over ``context`` earlier tokens:
        2·context·(qk head dim + v head dim) per head and layer, the scores and the weighted sum
        of values (PaLM, Chowdhery et al. 2022, App. B: 2N + 4·L·H·Q·T for Q = head dim)."""
        return 2 * (self.active - self.input_embedding) + 2 * context * self.attention_width

    def memory_bytes(self) -> dict[str, float]:
        return {dtype: self.total * size for dtype, size in BYTES_PER_PARAM.items()}

    def explanation(self) -> str:
        """Why total parameters are not num_experts × the dense model's size, in plain words."""
        if not self.num_experts:
            return f"{self.name} is dense: every token uses all {self.total:,} parameters."
        routed = self.components["routed_experts"]
        shared = self.total - routed
        one_expert_model = shared + routed // self.num_experts
        return (
            f"Only the feed-forward experts are replicated: {routed:,} parameters ({routed / self.total:.0%}) "
            f"sit in {self.num_experts} routed experts per MoE layer ({self.moe_layers} of {self.num_layers} layers), "
            f"while the other {shared:,} (embeddings, attention, norms, routers, shared or dense FFNs) exist once "
            f"and every token uses them. A dense model with one expert per layer would have {one_expert_model:,}; "
            f"{self.num_experts} times that is {self.num_experts * one_expert_model:,}, but the total is "
            f"{self.total:,}, because the shared parts are not copied. Each token goes through {self.top_k} of "
            f"{self.num_experts} experts, so it uses {self.active:,} parameters ({self.active / self.total:.0%})."
        )

    def to_dict(self, context: int) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "total_params": self.total,
            "active_params": self.active,
            "components": dict(self.components),
            "active_components": self.active_components,
            "num_layers": self.num_layers,
            "moe_layers": self.moe_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "context": context,
            "forward_flops_per_token": self.forward_flops_per_token(context),
            "weight_memory_bytes": self.memory_bytes(),
        }


def _ffn(d_model: int, d_ff: int, gated: bool) -> int:
    return (3 if gated else 2) * d_model * d_ff


def _gqa_attention(d_model: int, heads: int, kv_heads: int, head_dim: int, bias: bool = False) -> int:
    q_and_o = 2 * d_model * heads * head_dim
    k_and_v = 2 * d_model * kv_heads * head_dim
    return q_and_o + k_and_v + ((heads + 2 * kv_heads) * head_dim if bias else 0)


def _cost_decoder(name: str, c: dict, family: str) -> ModelCost:
    """Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3: decoder-only, RMSNorm, SwiGLU."""
    d_model, layers = c["hidden_size"], c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or d_model // heads
    vocab = c["vocab_size"]
    tie = bool(c.get("tie_word_embeddings", False))
    counts = dict.fromkeys(COMPONENTS, 0)
    counts["embeddings"] = vocab * d_model * (1 if tie else 2)
    counts["norms"] = (2 * layers + 1) * d_model
    attention_width = layers * heads * 2 * head_dim

    if family == "deepseek_v3":
        qk_dim = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
        q_rank, kv_rank = c.get("q_lora_rank"), c["kv_lora_rank"]
        # Multi-head latent attention (DeepSeek-V2 §2.1): low-rank q and kv with their own norms.
        if q_rank:
            attn = d_model * q_rank + q_rank * heads * qk_dim
            counts["norms"] += layers * q_rank
        else:
            attn = d_model * heads * qk_dim
        attn += d_model * (kv_rank + c["qk_rope_head_dim"])
        attn += kv_rank * heads * (c["qk_nope_head_dim"] + c["v_head_dim"])
        attn += heads * c["v_head_dim"] * d_model
        counts["norms"] += layers * kv_rank
        counts["attention"] = layers * attn
        attention_width = layers * heads * (qk_dim + c["v_head_dim"])
        num_experts, d_expert = c["n_routed_experts"], c["moe_intermediate_size"]
        moe_layer_ids = [i for i in range(layers) if i >= c.get("first_k_dense_replace", 0)]
        shared = c.get("n_shared_experts", 0) * _ffn(d_model, d_expert, True)
    else:
        bias = family == "qwen2_moe" and c.get("qkv_bias", True)
        counts["attention"] = layers * _gqa_attention(d_model, heads, kv_heads, head_dim, bias)
        if family == "qwen3_moe":
            counts["norms"] += layers * 2 * head_dim  # q_norm, k_norm over each head's features
        if family == "olmoe":
            counts["norms"] += layers * (heads + kv_heads) * head_dim  # q_norm, k_norm over all heads
        if family == "mixtral":
            num_experts, d_expert = c["num_local_experts"], c["intermediate_size"]
            moe_layer_ids = list(range(layers))
            shared = 0
        else:
            num_experts = c["num_experts"]
            d_expert = c["moe_intermediate_size"] if family != "olmoe" else c["intermediate_size"]
            step = c.get("decoder_sparse_step", 1)
            skip = set(c.get("mlp_only_layers") or [])
            moe_layer_ids = [i for i in range(layers) if i not in skip and num_experts > 0 and (i + 1) % step == 0]
            shared = 0
            if family == "qwen2_moe":
                shared = _ffn(d_model, c["shared_expert_intermediate_size"], True) + d_model  # + sigmoid gate
    moe_count = len(moe_layer_ids)
    expert_params = _ffn(d_model, d_expert, True)
    counts["routed_experts"] = moe_count * num_experts * expert_params
    counts["shared_experts"] = moe_count * shared
    counts["routers"] = moe_count * num_experts * d_model
    counts["dense_ffn"] = (layers - moe_count) * _ffn(d_model, c.get("intermediate_size", 0), True)
    return ModelCost(
        name, family, counts, layers, moe_count, num_experts, c["num_experts_per_tok"],
        vocab * d_model, attention_width, expert_params,
    )


def _sparse_layers(num_layers: int, num_sparse: int | None, step: int | None) -> int:
    """transformers' Switch rule: layer i is sparse when i % step == 1 (or step == 1)."""
    if step is None:
        step = num_layers // num_sparse if num_sparse else num_layers
    if step <= 0:
        return 0
    return sum(1 for i in range(num_layers) if i % step == 1 or step == 1)


def _cost_switch(name: str, c: dict) -> ModelCost:
    """Switch Transformers (T5 encoder-decoder, ReLU FFNs, every other FFN an MoE)."""
    d_model, d_ff, vocab = c["d_model"], c["d_ff"], c["vocab_size"]
    heads, d_kv = c["num_heads"], c["d_kv"]
    enc = c["num_layers"]
    dec = c.get("num_decoder_layers") or enc
    num_experts = c["num_experts"]
    enc_sparse = _sparse_layers(enc, c.get("num_sparse_encoder_layers"), c.get("encoder_sparse_step"))
    dec_sparse = _sparse_layers(dec, c.get("num_sparse_decoder_layers"), c.get("decoder_sparse_step"))
    attention = 4 * d_model * heads * d_kv
    gated = "gated" in c.get("feed_forward_proj", "relu")
    expert_params = _ffn(d_model, d_ff, gated)
    counts = dict.fromkeys(COMPONENTS, 0)
    tie = bool(c.get("tie_word_embeddings", True))
    # NOTE: transformers 5 ties shared, encoder and decoder embeddings and lm_head all through
    # tie_word_embeddings: untied, it holds four tables.
    counts["embeddings"] = vocab * d_model * (1 if tie else 4)
    # Self-attention in every block, cross-attention in decoder blocks, and one relative
    # position bias table per stack (in its first block).
    counts["attention"] = (enc + 2 * dec) * attention + 2 * c.get("relative_attention_num_buckets", 32) * heads
    counts["norms"] = (2 * enc + 3 * dec + 2) * d_model
    sparse = enc_sparse + dec_sparse
    counts["routed_experts"] = sparse * num_experts * expert_params
    counts["routers"] = sparse * num_experts * (d_model + (1 if c.get("router_bias") else 0))
    counts["dense_ffn"] = (enc + dec - sparse) * expert_params
    return ModelCost(
        name, "switch_transformers", counts, enc + dec, sparse, num_experts, 1, vocab * d_model,
        (enc + 2 * dec) * heads * 2 * d_kv, expert_params,
    )


HF_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "switch_transformers")


def cost_from_hf_config(config: dict, name: str | None = None) -> ModelCost:
    """The cost of a transformers MoE architecture from its config.json fields."""
    family = config.get("model_type")
    if family not in HF_FAMILIES:
        raise ValueError(f"config model_type={family!r} is not supported: use one of {HF_FAMILIES}")
    name = name or config.get("_name_or_path") or family
    try:
        if family == "switch_transformers":
            return _cost_switch(name, config)
        return _cost_decoder(name, config, family)
    except KeyError as error:
        raise ValueError(f"config of model_type={family!r} lacks the field {error.args[0]!r}") from error


def cost_from_lm_config(config: Any, name: str = "moekit") -> ModelCost:
    """The cost of a moekit ``LMConfig``, counted on the model itself (built on the meta
    device, so nothing is allocated) and split by parameter name."""
    import torch

    from moekit.models.lm import MoETransformerLM

    with torch.device("meta"):
        model = MoETransformerLM(config)
    counts = dict.fromkeys(COMPONENTS, 0)
    for param_name, param in model.named_parameters():
        if param_name.startswith(("embed.", "lm_head.")):
            key = "embeddings"
        elif ".attn." in param_name:
            key = "attention"
        elif "norm" in param_name:
            key = "norms"
        elif ".ffn.router." in param_name:
            key = "routers"
        elif ".ffn.experts." in param_name:
            key = "routed_experts"
        elif ".ffn.shared_experts." in param_name:
            key = "shared_experts"
        else:
            key = "dense_ffn"
        counts[key] += param.numel()
    moe = config.moe
    moe_count = sum(1 for i in range(config.n_layer) if config.is_moe_layer(i))
    head_dim = config.d_model // config.n_head
    return ModelCost(
        name, f"moekit/{config.arch}", counts, config.n_layer, moe_count, moe.num_experts if moe_count else 0,
        moe.top_k, config.vocab_size * config.d_model, config.n_layer * config.n_head * 2 * head_dim,
        counts["routed_experts"] // max(1, moe_count * moe.num_experts),
    )


def load_cost(spec: str) -> ModelCost:
    """A preset name, a transformers config.json (or its folder), or a moekit run directory."""
    import json
    from pathlib import Path

    from moekit.models.presets import PRESETS

    if spec in PRESETS:
        return cost_from_hf_config(PRESETS[spec], spec)
    path = Path(spec)
    if path.is_dir():
        if (path / "config.json").exists():
            payload = json.loads((path / "config.json").read_text())
            if "model" in payload and "train" in payload:  # a moekit run directory
                from moekit.models.lm import LMConfig

                return cost_from_lm_config(LMConfig.from_dict(payload["model"]), str(path))
            return cost_from_hf_config(payload, str(path))
        raise ValueError(f"{path}: has no config.json (expected a moekit run directory or a transformers folder)")
    if path.is_file():
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not a JSON file ({error})") from error
        if "model" in payload and "train" in payload:
            from moekit.models.lm import LMConfig

            return cost_from_lm_config(LMConfig.from_dict(payload["model"]), str(path))
        return cost_from_hf_config(payload, str(path))
    raise ValueError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file or directory")
