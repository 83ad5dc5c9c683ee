"""moekit experts inside a loaded ``transformers`` MoE model: ``patch_moe(model)``.

Every MoE block of a family moekit supports becomes an equivalent ``moekit.MoE`` (routing,
expert weights, shared experts, scaling and bias terms), in place; the family's own
attention, norms, caches and ``generate`` stay as they are. In eval mode and float32 the
patched model's logits equal the original's to ~1e-5 (tests/test_patch_moe.py).

    family (config.model_type)  transformers block          moekit layer
    mixtral                     MixtralSparseMoeBlock       topk, SwiGLU
    qwen2_moe                   Qwen2MoeSparseMoeBlock      topk + sigmoid-gated shared expert
    qwen3_moe                   Qwen3MoeSparseMoeBlock      topk
    qwen3_next                  Qwen3NextSparseMoeBlock     topk + sigmoid-gated shared expert
    olmoe                       OlmoeSparseMoeBlock         topk (no renormalization)
    deepseek_v2                 DeepseekV2Moe               topk, group-limited (max group score),
                                                            routed scaling, shared experts
    deepseek_v3                 DeepseekV3MoE               aux_free: sigmoid, score-correction bias,
                                                            group-limited, routed scaling, shared
    glm4_moe                    Glm4MoeMoE                  as deepseek_v3
    gpt_oss                     GptOssMLP                   topk with a router bias, experts with
                                                            biases and a clamped SwiGLU
    switch_transformers         SwitchTransformersSparseMLP switch top-1, per-sequence capacity

Any other module that looks like an MoE block (a child named ``experts`` next to a ``gate``
or ``router``, or a class name ending in MoE / MoeBlock / SparseMLP) is refused with the
family and the reason: nothing is silently left unconverted (``strict=False`` turns the
error into a warning and leaves that block as it was).

The patched layers hand their router logits to transformers' output recorder, so
``output_router_logits=True`` and the family's own auxiliary loss keep working; moekit's
``moekit.aux_loss(model)`` and ``moekit.routing_stats(model)`` work on the patched model too.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.experts import EXPERT_LAYOUTS, set_expert_layout
from moekit.hugepages import place_in_huge_pages
from moekit.inference.generate import GenerationResult, SamplingConfig, timed_generate
from moekit.interop.hf import (
    ConversionError,
    _activation,
    _block_config,
    _copy_grouped,
    _copy_shared,
    _copy_switch,
    _loss_coefs,
    from_hf_block,
)
from moekit.layer import MoE
from moekit.matvec import use_decode_linears
from moekit.routing import RoutingResult


class UnsupportedBlockError(ConversionError):
    """An MoE block that moekit cannot represent; the message names the family and why."""


@dataclass(frozen=True)
class PatchedBlock:
    """One replaced block: where it sat in the model, its family, and the moekit config."""

    path: str  # qualified module name, e.g. "model.layers.0.mlp"
    family: str  # the model's config.model_type, e.g. "mixtral"
    block: str  # the transformers class that was replaced
    config: MoEConfig


def _record_for_transformers(key: str, value: Tensor) -> None:
    """Hand ``value`` to transformers' output recorder when the running forward asked for ``key``
    (``output_router_logits=True``): what its hooks on the replaced router classes did."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without the recorder: nothing is collecting
        return
    collected = _active_collector.get()
    if collected is not None and key in collected:
        collected[key].append(value)


class PatchedMoE(MoE):
    """A ``moekit.MoE`` inside a transformers model.

    Besides the layer's output it gives transformers what the replaced block's router gave:
    the router logits, to the output recorder behind ``output_router_logits=True`` (so the
    family's own auxiliary loss still works), as [T, E] or, for Switch, [B, S, E].
    """

    router_logits_per_sequence = False  # Switch records [B, S, E]; the others [T, E]
    last_router_logits_TE: Tensor | None = None

    def route(self, x_TD: Tensor, capacity_factor: float | None) -> RoutingResult:
        routing = super().route(x_TD, capacity_factor)
        self.last_router_logits_TE = routing.logits_TE
        return routing

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        y = super().forward(x, token_mask)
        logits, self.last_router_logits_TE = self.last_router_logits_TE, None  # hold no graph
        if token_mask is None:
            if self.router_logits_per_sequence:
                logits = logits.reshape(*x.shape[:-1], self.config.num_experts)
            _record_for_transformers("router_logits", logits)
        return y


class SwitchPatchedMoE(PatchedMoE):
    router_logits_per_sequence = True


class MoEWithRouterScores(PatchedMoE):
    """For decoder layers that unpack ``(hidden, router_scores)`` from their MLP (GPT-OSS):
    the second element is the [T, K] combine weights of this forward (float32, detached), as
    transformers' GptOssMLP returns them."""

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        y = super().forward(x, token_mask)
        assert self.last_stats is not None
        weights_TK = self.last_stats.scores_TE.topk(self.config.top_k, dim=-1).values
        return y, weights_TK / weights_TK.sum(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------
# Family adapters: block (+ the model's config) -> an equivalent moekit layer
# ---------------------------------------------------------------------------------------


def _build(config: MoEConfig, block: nn.Module, layer_class: type[PatchedMoE] = PatchedMoE) -> MoE:
    param = next(block.parameters())
    return layer_class(config).to(device=param.device, dtype=param.dtype)


@torch.no_grad()
def _convert_qwen3_next(block: nn.Module, hf_config: Any) -> MoE:
    """Qwen3-Next's block is Qwen2-MoE's: softmax top-k plus one sigmoid-gated shared expert."""
    gate, experts = block.gate, block.experts
    config = MoEConfig(
        d_model=gate.hidden_dim,
        d_ff=experts.intermediate_dim,
        num_experts=gate.num_experts,
        top_k=gate.top_k,
        activation=_activation(experts.act_fn, type(block).__name__, gated=True),
        normalize_weights=bool(gate.norm_topk_prob),
        num_shared_experts=1,
        shared_expert_d_ff=block.shared_expert.intermediate_size,
        shared_expert_gate=True,
        **_loss_coefs(hf_config, gate.top_k),
    )
    moe = _build(config, block)
    moe.router.weight.copy_(gate.weight)
    _copy_grouped(moe, experts.gate_up_proj, experts.down_proj)
    _copy_shared(moe, block.shared_expert)
    moe.shared_experts.gate.weight.copy_(block.shared_expert_gate.weight)
    return moe.train(block.training)


@torch.no_grad()
def _convert_glm4_moe(block: nn.Module, hf_config: Any) -> MoE:
    """GLM-4-MoE's block is DeepSeek-V3's: sigmoid scores, a selection-only score-correction
    bias, group-limited routing, routed scaling and shared experts."""
    gate, experts, kind = block.gate, block.experts, type(block).__name__
    if gate.num_experts // gate.num_group < 2:
        raise ConversionError(f"{kind}: n_group={gate.num_group} leaves fewer than 2 experts per group")
    config = MoEConfig(
        d_model=gate.hidden_dim,
        d_ff=experts.intermediate_dim,
        num_experts=gate.num_experts,
        top_k=gate.top_k,
        router="aux_free",
        activation=_activation(experts.act_fn, kind, gated=True),
        normalize_weights=bool(gate.norm_topk_prob),
        n_group=int(gate.num_group),
        topk_group=int(gate.topk_group),
        routed_scaling_factor=float(gate.routed_scaling_factor),
        num_shared_experts=int(block.config.n_shared_experts),
        shared_expert_d_ff=int(block.config.moe_intermediate_size),
        balance_loss_coef=0.0,  # balanced by the bias, not a loss (as DeepSeek-V3)
        z_loss_coef=0.0,
    )
    moe = _build(config, block)
    moe.router.weight.copy_(gate.weight)
    moe.router.expert_bias.copy_(gate.e_score_correction_bias)
    _copy_grouped(moe, experts.gate_up_proj, experts.down_proj)
    _copy_shared(moe, block.shared_experts)
    return moe.train(block.training)


@torch.no_grad()
def _convert_deepseek_v2(block: nn.Module, hf_config: Any) -> MoE:
    """DeepSeek-V2: softmax top-k without renormalization, times routed_scaling_factor;
    ``topk_method='group_limited_greedy'`` first keeps the topk_group groups with the best
    maximum score (moekit's group_score='max')."""
    gate, experts, kind = block.gate, block.experts, type(block).__name__
    n_shared = int(block.config.n_shared_experts or 0)
    values: dict[str, Any] = dict(
        d_model=gate.hidden_dim,
        d_ff=experts.intermediate_dim,
        num_experts=gate.num_experts,
        top_k=gate.top_k,
        router="topk",
        activation=_activation(experts.act_fn, kind, gated=True),
        normalize_weights=False,
        routed_scaling_factor=float(gate.routed_scaling_factor),
        num_shared_experts=n_shared,
        shared_expert_d_ff=int(block.config.moe_intermediate_size) if n_shared else None,
        **_loss_coefs(hf_config, gate.top_k),
    )
    if gate.topk_method == "group_limited_greedy":
        values.update(n_group=int(gate.num_group), topk_group=int(gate.topk_group), group_score="max")
    elif gate.topk_method != "greedy":
        raise ConversionError(
            f"{kind}: topk_method={gate.topk_method!r} has no moekit equivalent; "
            "allowed: 'greedy', 'group_limited_greedy'"
        )
    moe = _build(MoEConfig(**values), block)
    moe.router.weight.copy_(gate.weight)
    _copy_grouped(moe, experts.gate_up_proj, experts.down_proj)
    if n_shared:
        _copy_shared(moe, block.shared_experts)
    return moe.train(block.training)


@torch.no_grad()
def _convert_switch(block: nn.Module, hf_config: Any) -> MoE:
    """Switch: top-1 with the unrenormalized probability, a fixed capacity per sequence filled
    in token order, ReLU/GELU experts, and (``router_bias=True``) a bias on the router logits."""
    config, _ = _block_config(block, hf_config, allow_router_bias=True)
    moe = _build(config, block, SwitchPatchedMoE)
    _copy_switch(moe, block)
    return moe.train(block.training)


@torch.no_grad()
def _convert_gpt_oss(block: nn.Module, hf_config: Any) -> MoE:
    """GPT-OSS: router logits with a bias, softmax over the top-k logits (= the top-k of the
    full softmax, renormalized), experts with biases and a clamped SwiGLU whose gate and up
    columns are interleaved in ``gate_up_proj`` [E, D, 2F] (gate at even columns)."""
    router, experts = block.router, block.experts
    config = MoEConfig(
        d_model=router.hidden_dim,
        d_ff=experts.intermediate_size,
        num_experts=router.num_experts,
        top_k=router.top_k,
        router="topk",
        activation="clamped_swiglu",
        swiglu_alpha=float(experts.alpha),
        swiglu_limit=float(experts.limit),
        normalize_weights=True,
        router_bias=True,
        expert_biases=True,
        **_loss_coefs(hf_config, router.top_k),
    )
    moe = _build(config, block, MoEWithRouterScores)
    moe.router.weight.copy_(router.weight)
    moe.router.bias.copy_(router.bias)
    gate_up_EDH, bias_EH = experts.gate_up_proj, experts.gate_up_proj_bias
    moe.experts.w_in.copy_(torch.cat([gate_up_EDH[..., ::2], gate_up_EDH[..., 1::2]], dim=-1))
    moe.experts.b_in.copy_(torch.cat([bias_EH[..., ::2], bias_EH[..., 1::2]], dim=-1))
    moe.experts.w_out.copy_(experts.down_proj)
    moe.experts.b_out.copy_(experts.down_proj_bias)
    return moe.train(block.training)


def _via_from_hf_block(layer_class: type[PatchedMoE] = PatchedMoE) -> Callable[[nn.Module, Any], MoE]:
    """The blocks ``interop.hf.from_hf_block`` converts, as a ``layer_class`` with the same weights."""

    @torch.no_grad()
    def convert(block: nn.Module, hf_config: Any) -> MoE:
        moe = from_hf_block(block, hf_config)
        patched = layer_class(moe.config)
        patched.load_state_dict(moe.state_dict())
        param = next(block.parameters())
        return patched.to(device=param.device, dtype=param.dtype).train(block.training)

    return convert


@dataclass(frozen=True)
class Family:
    name: str  # config.model_type of the models that hold this block
    block: str  # the transformers class name of the MoE block
    convert: Callable[[nn.Module, Any], MoE]
    # The family's router runs its gate matmul in the activation dtype (bf16 logits, then
    # float32 softmax); moekit's routers run it in float32 unless told (Router.gate_in_activation_dtype).
    gate_in_activation_dtype: bool = False


FAMILIES: dict[str, Family] = {
    family.block: family
    for family in (
        Family("mixtral", "MixtralSparseMoeBlock", _via_from_hf_block(), gate_in_activation_dtype=True),
        Family("qwen2_moe", "Qwen2MoeSparseMoeBlock", _via_from_hf_block(), gate_in_activation_dtype=True),
        Family("qwen3_moe", "Qwen3MoeSparseMoeBlock", _via_from_hf_block(), gate_in_activation_dtype=True),
        Family("qwen3_next", "Qwen3NextSparseMoeBlock", _convert_qwen3_next, gate_in_activation_dtype=True),
        Family("olmoe", "OlmoeSparseMoeBlock", _via_from_hf_block(), gate_in_activation_dtype=True),
        Family("deepseek_v2", "DeepseekV2Moe", _convert_deepseek_v2),
        Family("deepseek_v3", "DeepseekV3MoE", _via_from_hf_block()),
        Family("glm4_moe", "Glm4MoeMoE", _convert_glm4_moe),
        Family("gpt_oss", "GptOssMLP", _convert_gpt_oss, gate_in_activation_dtype=True),
        Family("switch_transformers", "SwitchTransformersSparseMLP", _convert_switch),
    )
}

_MOE_CLASS_NAME = re.compile(r"(MoE|Moe|MoeBlock|SparseMLP|MoA)$")


def looks_like_moe_block(module: nn.Module) -> bool:
    """A transformers module that routes tokens to experts (supported or not)."""
    if isinstance(module, MoE):
        return False
    if type(module).__name__ in FAMILIES:
        return True
    children = dict(module.named_children())
    if "experts" in children and ("gate" in children or "router" in children):
        return True
    return bool(_MOE_CLASS_NAME.search(type(module).__name__))


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost MoE-looking modules (a block's own parts are not searched)."""
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if looks_like_moe_block(child):
                found.append((path, child))
            elif not isinstance(child, MoE):
                visit(path, child)

    visit("", model)
    return found


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def patch_moe(
    model: nn.Module, strict: bool = True, decode_linears: bool = True, huge_pages: bool = True,
    expert_layout: str = "rows",
) -> list[PatchedBlock]:
    """Replace every MoE block of a loaded transformers ``model`` with an equivalent
    ``moekit.MoE``, in place; returns what was replaced, in module order.

    For decoding on a CPU, by default it also turns the model's other ``nn.Linear`` modules
    (attention, output head) into ``moekit.matvec.DecodeLinear`` (the same parameters; only a
    one-row inference forward changes, to the streaming kernel) and moves its large CPU weights
    into transparent huge pages (``moekit.hugepages``). ``decode_linears=False`` and
    ``huge_pages=False`` leave those as they are. The experts keep transformers' layout, [O, I]
    per expert (``expert_layout="rows"``, ``moekit.experts.set_expert_layout``), which
    moekit.matvec decodes fastest; "cols" stores them as moekit's own layers do.

    A block moekit cannot represent (an unknown family, or a supported one with a setting
    moekit lacks) raises ``UnsupportedBlockError`` naming the module, the family and the
    reason, before anything is changed; with ``strict=False`` it is a warning instead and
    that block stays as it was. A model with no MoE block at all is an error.
    """
    if expert_layout not in EXPERT_LAYOUTS:
        allowed = ", ".join(EXPERT_LAYOUTS)
        raise ValueError(f"patch_moe: expert_layout={expert_layout!r} is invalid: use one of {allowed}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_moe expects an nn.Module (a loaded transformers model), got {type(model).__name__}")
    family_name = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    blocks = _find_blocks(model)
    if not blocks and not any(isinstance(m, MoE) for m in model.modules()):
        raise ConversionError(f"patch_moe: {type(model).__name__} ({family_name}) has no MoE block")
    hf_config = getattr(model, "config", None)
    replacements: list[tuple[str, Family, MoE]] = []
    problems: list[str] = []
    for path, block in blocks:
        kind = type(block).__name__
        family = FAMILIES.get(kind)
        if family is None:
            supported = ", ".join(f"{f.name} ({f.block})" for f in FAMILIES.values())
            problems.append(f"{path}: {family_name} block {kind} has no moekit adapter; supported: {supported}")
            continue
        try:
            moe = family.convert(block, _text_config(hf_config))
        except (ConversionError, ValueError) as error:
            problems.append(f"{path}: {family.name} block {kind} cannot be represented: {error}")
            continue
        replacements.append((path, family, moe))
    if problems and strict:
        raise UnsupportedBlockError("patch_moe: " + "; ".join(problems) + " (strict=False leaves them unconverted)")
    for problem in problems:
        warnings.warn(f"patch_moe left a block unconverted: {problem}", stacklevel=2)
    patched = []
    for path, family, moe in replacements:
        # Route as the replaced block did, rounding included: at bf16 the gate's logits in
        # bf16 (Mixtral, Qwen, OLMoE, GPT-OSS) or float32 (DeepSeek, GLM, Switch).
        moe.router.gate_in_activation_dtype = family.gate_in_activation_dtype
        set_expert_layout(moe, expert_layout)
        _replace(model, path, moe)
        patched.append(PatchedBlock(path, family.name, family.block, moe.config))
    if decode_linears:
        use_decode_linears(model)
    if huge_pages:
        place_in_huge_pages(model)
    return patched


def _text_config(config: Any) -> Any:
    """The config that holds the MoE fields (multimodal models nest it as text_config)."""
    return getattr(config, "text_config", None) or config


# ---------------------------------------------------------------------------------------
# Generation from a local transformers folder
# ---------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_patched_folder(
    folder: str | Path, dtype: str = "float32", device: str = "cpu", strict: bool = True
) -> tuple[nn.Module, Any, list[PatchedBlock]]:
    """A local transformers causal-LM folder (config.json + safetensors + tokenizer.json),
    loaded offline in ``dtype`` on ``device`` and patched with ``patch_moe``: returns
    (model in eval mode, ``tokenizers.Tokenizer``, what was patched)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: must be one of {sorted(DTYPES)}")
    config_path, tokenizer_path = folder / "config.json", folder / "tokenizer.json"
    if not config_path.is_file():
        raise ConversionError(f"{config_path}: missing; {folder} is not a Hugging Face model folder")
    if not tokenizer_path.is_file():
        raise ConversionError(f"{tokenizer_path}: missing; the folder needs a tokenizers-format tokenizer.json")
    model_type = json.loads(config_path.read_text()).get("model_type")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], local_files_only=True)
    except (ValueError, KeyError) as error:
        raise ConversionError(f"{folder}: model_type={model_type!r} does not load as a causal LM: {error}") from error
    model = model.to(device).eval()
    patched = patch_moe(model, strict=strict)
    return model, Tokenizer.from_file(str(tokenizer_path)), patched


def _eos_token_ids(model: nn.Module) -> tuple[int, ...]:
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def generate_from_folder(
    folder: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    sampling: SamplingConfig | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    stop_at_eos: bool = True,
) -> tuple[GenerationResult, list[PatchedBlock]]:
    """Load a local transformers MoE folder, patch its MoE blocks with moekit, and generate
    after ``prompt`` (greedy by default; ``SamplingConfig(greedy=False, temperature, top_p,
    seed)`` samples). Returns the result (text, tokens, prefill and decode tokens/s measured
    separately) and the patched blocks."""
    sampling = SamplingConfig() if sampling is None else sampling
    model, tokenizer, patched = load_patched_folder(folder, dtype, device)
    prompt_ids = tokenizer.encode(prompt).ids
    if not prompt_ids:
        raise ValueError(f"prompt={prompt!r} encodes to no tokens")

    def step(input_ids_BS: Tensor, cache: Any) -> tuple[Tensor, Any]:
        # logits_to_keep=1: the output head at the last position only, as transformers' generate
        out = model(input_ids=input_ids_BS, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    result = timed_generate(
        step,
        prompt_ids,
        max_new_tokens,
        sampling,
        device=device,
        eos_token_ids=_eos_token_ids(model) if stop_at_eos else (),
        decode=tokenizer.decode,
    )
    return result, patched
