"""Generation speed of transformers MoE models, as loaded, after ``patch_moe``, and as moekit's LM.

For each family, one model with random weights (built from a transformers 5 config and
scaled to at least ``target_bytes`` of weights at the chosen dtype; tiny with ``quick``)
generates greedily, batch 1, through one loop (``moekit.inference.timed_generate``):

- **prefill** tokens/s: the prompt in one forward plus the first new token;
- **decode** tokens/s: every later new token, one forward each, with the KV cache.

Implementations, all in this process and with the same weights:

- ``transformers``: the model as ``from_config`` builds it (its default attention and experts
  implementations; the step asks for the last position's logits only, as ``generate`` does);
- ``patch_moe``: a deep copy of that model with every MoE block replaced by ``moekit.MoE``;
- ``moekit_lm``: moekit's own ``MoETransformerLM`` where the family converts
  (``interop.hf.from_hf_model``: Mixtral), with its preallocated ``KVCache`` and the last
  position's logits only (``logits_to_keep=1``), as the transformers step.
- ``llama_cpp``: llama.cpp, the reference for CPU inference, through llama-cpp-python (an
  optional package: "not installed" otherwise), for Mixtral: moekit's LM written as a GGUF file
  (``interop.gguf.write_gguf``) at the run's precision (f32, or bf16), run with as many threads
  as torch uses, the last position's logits only; the same step protocol and timer as the rest.

Rounds: every round runs each implementation once, the order rotated from round to round so
that drift within a round favours none; before the rounds each one runs a warm-up (the full
prompt, 4 new tokens). A figure is the median over rounds; the ``_vs_transformers`` figures
are medians of the per-round ratios to the transformers model of the same round (as
``bench layer`` takes them). The greedy tokens of every implementation are compared with the
transformers model's of the same round; a mismatch is reported with its first position.

Bandwidth: batch-1 decode reads (at least) every weight a token touches once, so
``bytes_per_token × decode tokens/s`` is the rate at which weights are read, to compare with
the machine's memory bandwidth measured in the same run (``memory_bandwidth_gbps``). The bytes
per decoded token come from the config (``weight_bytes_per_token``; docs/bench_generate.md)::

    bytes/token = b · ( D                                    one embedding row
                      + V·D + D                              output head, final norm
                      + Σ_layers [ 2·D + attention + ffn ] )  two norms per layer

    attention = D·H·h + 2·D·G·h + H·h·D  (q, k, v, o; G kv heads, h head_dim)
                + biases and q/k norms where the family has them (+ H sinks for GPT-OSS);
                for MLA (DeepSeek): D·r_q + r_q + r_q·H·(n+p) + D·(r_kv+p) + r_kv
                                    + r_kv·H·(n+v) + H·v·D
    ffn (MoE layer) = E·D router (+ E router bias, GPT-OSS)
                      + k·3·D·F        the k selected experts (gate, up, down)
                      (+ k·(2F + D)    their biases, GPT-OSS)
                      + shared experts (S·3·D·F_shared, + D for Qwen2-MoE's shared gate)
    ffn (dense layer) = 3·D·F_dense

with b the bytes of the dtype, plus 4·E per MoE layer for the float32 selection bias of
DeepSeek-V3 and GLM-4-MoE (kept in float32 as ``from_pretrained`` keeps it). It leaves out
the KV cache (its reads grow with the context) and activations: it is the weight traffic only.

Run: ``moekit bench generate`` (``moekit bench generate --help`` for options).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit import matvec
from moekit.experiments.bench.layer import cpu_busy_fraction, cpu_model_name, transformers_version
from moekit.hugepages import huge_page_empty, transparent_huge_pages
from moekit.inference.generate import GenerationResult, SamplingConfig, timed_generate
from moekit.interop.gguf import LlamaCppLM, llama_cpp_missing, write_gguf
from moekit.interop.hf import from_hf_model
from moekit.interop.patch import patch_moe
from moekit.models.lm import KVCache

TRANSFORMERS, PATCHED, MOEKIT_LM, LLAMA_CPP = "transformers", "patch_moe", "moekit_lm", "llama_cpp"
IMPLS = (TRANSFORMERS, PATCHED, MOEKIT_LM, LLAMA_CPP)
IMPL_LABELS = {
    TRANSFORMERS: "transformers as loaded",
    PATCHED: "transformers after patch_moe",
    MOEKIT_LM: "moekit MoETransformerLM (from_hf_model)",
    LLAMA_CPP: "llama.cpp (llama-cpp-python) on moekit's LM written as GGUF",
}
GGUF_TYPE_OF_DTYPE = {"float32": "f32", "bfloat16": "bf16"}  # llama.cpp at the same precision
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TARGET_BYTES = 10**9  # weights per model at full size: larger than any CPU cache, so decode streams from memory
WARMUP_NEW_TOKENS = 4
BANDWIDTH_BUFFER_BYTES = 2**30  # the probe's buffer: far larger than a last-level cache
QUICK_BANDWIDTH_BUFFER_BYTES = 2**27
WEIGHT_BUFFERS = ("e_score_correction_bias",)  # buffers read per token like weights (selection bias)
SELECTION_BIAS_FAMILIES = ("deepseek_v3", "glm4_moe")  # hold it, in float32 at any dtype


# --------------------------------------------------------------------------------------------
# The families: one transformers config each, at full and at --quick size
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateFamily:
    name: str  # config.model_type, what --families takes
    title: str
    config_class: str  # transformers class names
    model_class: str
    full: dict[str, Any]  # config fields at full size (num_hidden_layers is chosen to reach TARGET_BYTES)
    quick: dict[str, Any]  # config fields of the tiny model (2 layers)


# Shared by every full-size config: a Llama-sized vocabulary and 16 heads of 64 at d_model 1024.
FULL_COMMON = dict(vocab_size=32000, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4,
                   tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
QUICK_COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
FULL_MLA = dict(num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64,
                v_head_dim=64)
QUICK_MLA = dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                 v_head_dim=8)

FAMILIES: dict[str, GenerateFamily] = {
    family.name: family
    for family in (
        GenerateFamily(
            "mixtral", "Mixtral", "MixtralConfig", "MixtralForCausalLM",
            full=dict(intermediate_size=2048, num_local_experts=8, num_experts_per_tok=2),
            quick=dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
        ),
        GenerateFamily(
            "qwen2_moe", "Qwen2-MoE", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
            full=dict(intermediate_size=2048, moe_intermediate_size=512, shared_expert_intermediate_size=2048,
                      num_experts=32, num_experts_per_tok=4),
            quick=dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                       num_experts=6, num_experts_per_tok=2),
        ),
        GenerateFamily(
            "qwen3_moe", "Qwen3-MoE", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
            full=dict(intermediate_size=2048, moe_intermediate_size=512, num_experts=32, num_experts_per_tok=4,
                      head_dim=64, norm_topk_prob=True),
            quick=dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                       head_dim=8, norm_topk_prob=True),
        ),
        GenerateFamily(
            "olmoe", "OLMoE", "OlmoeConfig", "OlmoeForCausalLM",
            full=dict(intermediate_size=512, num_experts=32, num_experts_per_tok=4),
            quick=dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2),
        ),
        GenerateFamily(
            "deepseek_v2", "DeepSeek-V2", "DeepseekV2Config", "DeepseekV2ForCausalLM",
            full=dict(intermediate_size=2048, moe_intermediate_size=512, n_routed_experts=32, num_experts_per_tok=4,
                      n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                      topk_method="group_limited_greedy", routed_scaling_factor=1.5, **FULL_MLA),
            quick=dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                       n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                       topk_method="group_limited_greedy", routed_scaling_factor=1.5, **QUICK_MLA),
        ),
        GenerateFamily(
            "deepseek_v3", "DeepSeek-V3", "DeepseekV3Config", "DeepseekV3ForCausalLM",
            full=dict(intermediate_size=2048, moe_intermediate_size=512, n_routed_experts=32, num_experts_per_tok=4,
                      n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                      routed_scaling_factor=2.5, **FULL_MLA),
            quick=dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                       n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                       routed_scaling_factor=2.5, **QUICK_MLA),
        ),
        GenerateFamily(
            "glm4_moe", "GLM-4-MoE", "Glm4MoeConfig", "Glm4MoeForCausalLM",
            full=dict(intermediate_size=2048, moe_intermediate_size=512, n_routed_experts=32, num_experts_per_tok=4,
                      n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, head_dim=64,
                      routed_scaling_factor=1.8),
            quick=dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                       n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, head_dim=8,
                       routed_scaling_factor=1.8),
        ),
        GenerateFamily(
            "gpt_oss", "GPT-OSS", "GptOssConfig", "GptOssForCausalLM",
            full=dict(intermediate_size=1024, num_local_experts=16, num_experts_per_tok=4, head_dim=64,
                      sliding_window=128),
            quick=dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                       sliding_window=8),
        ),
    )
}
# NOTE: Qwen3-Next (its linear-attention layers run a slow pure-torch path without the fla
# kernels) and Switch Transformers (an encoder-decoder) are patchable but not benchmarked here.


def build_config(family: GenerateFamily, quick: bool, num_hidden_layers: int | None = None) -> Any:
    """The family's transformers config at --quick or full size (``num_hidden_layers`` overrides)."""
    import transformers

    fields = {**QUICK_COMMON, **family.quick} if quick else {**FULL_COMMON, **family.full}
    if num_hidden_layers is not None:
        fields["num_hidden_layers"] = num_hidden_layers
    return getattr(transformers, family.config_class)(**fields)


def build_model(config: Any, dtype: torch.dtype, device: str | torch.device = "cpu") -> nn.Module:
    """A causal LM with transformers' own random initialization, in ``dtype``, in eval mode
    (``device="meta"`` builds the structure without allocating it)."""
    import transformers

    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # NOTE: from_pretrained keeps the tensors a family lists in _keep_in_fp32_modules_strict
    # (DeepSeek-V3's and GLM-4-MoE's selection bias) in float32 at bfloat16; from_config does
    # not always, so do it here: the model is then the one a checkpoint would load as.
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if keep_fp32 and dtype != torch.float32:
        for module in model.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                if name in keep_fp32 and buffer is not None:
                    module._buffers[name] = buffer.float()
    return model.eval()


def format_bytes(count: int) -> str:
    """1.07 GB, or MB under 0.1 GB (the --quick models)."""
    return f"{count / 1e9:.2f} GB" if count >= 10**8 else f"{count / 1e6:.3f} MB"


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f}" if count >= 10**6 else f"{count / 1e6:.4f}"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights: its parameters and the buffers read like weights."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(WEIGHT_BUFFERS))
    return total


def config_for_target(family: GenerateFamily, dtype: torch.dtype, target_bytes: int = TARGET_BYTES) -> Any:
    """The full-size config with the fewest layers whose weights reach ``target_bytes``.

    Sized on the meta device (nothing is allocated): two layers' worth of weights, then the
    per-layer increment, which is constant after the first (a dense first layer in DeepSeek
    and GLM configs), then checked by building the chosen config.
    """

    def size(layers: int) -> int:
        return weight_bytes(build_model(build_config(family, quick=False, num_hidden_layers=layers), dtype, "meta"))

    base, per_layer = size(2), size(3) - size(2)
    layers = 2 + max(0, math.ceil((target_bytes - base) / per_layer))
    config = build_config(family, quick=False, num_hidden_layers=layers)
    assert weight_bytes(build_model(config, dtype, "meta")) >= target_bytes
    return config


# --------------------------------------------------------------------------------------------
# Bytes of weights read per decoded token (from the config; formula in the module docstring)
# --------------------------------------------------------------------------------------------


def _field(config: Any, name: str, default: Any = None) -> Any:
    value = getattr(config, name, default)
    return default if value is None else value


def _attention_elements(config: Any) -> int:
    """Weights of one attention block (elements)."""
    d, heads = config.hidden_size, config.num_attention_heads
    if getattr(config, "kv_lora_rank", None):  # MLA: DeepSeek-V2/V3 (arXiv:2405.04434, section 2.1)
        q_lora, kv_lora = config.q_lora_rank, config.kv_lora_rank
        nope, rope, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        q = d * q_lora + q_lora + q_lora * heads * (nope + rope) if q_lora else d * heads * (nope + rope)
        kv = d * (kv_lora + rope) + kv_lora + kv_lora * heads * (nope + v)
        out = heads * v * d
        if config.attention_bias:
            q += q_lora if q_lora else 0
            kv += kv_lora + rope
            out += d
        return q + kv + out
    head_dim = _field(config, "head_dim", d // heads)
    q_width, kv_width = heads * head_dim, config.num_key_value_heads * head_dim
    elements = d * q_width + 2 * d * kv_width + q_width * d
    model_type = config.model_type
    if model_type == "qwen2_moe":
        qkv_bias, o_bias = bool(config.qkv_bias), False
    else:
        qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
        if model_type == "glm4_moe":
            o_bias = False  # GLM-4-MoE's attention_bias puts biases on q, k, v only
    elements += (q_width + 2 * kv_width) * qkv_bias + d * o_bias
    if model_type == "qwen3_moe" or (model_type == "glm4_moe" and config.use_qk_norm):
        elements += 2 * head_dim  # q_norm and k_norm over one head
    elif model_type == "olmoe":
        elements += q_width + kv_width  # q_norm and k_norm over all heads
    if model_type == "gpt_oss":
        elements += heads  # attention sinks, one per head
    return elements


def _layer_is_moe(config: Any, layer_idx: int) -> bool:
    model_type = config.model_type
    if model_type in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        return layer_idx >= config.first_k_dense_replace
    if model_type in ("qwen2_moe", "qwen3_moe"):
        return layer_idx not in (config.mlp_only_layers or []) and (layer_idx + 1) % config.decoder_sparse_step == 0
    return True


def _ffn_elements(config: Any, layer_idx: int) -> dict[str, int]:
    """Weights of one layer's FFN read per token, by part: router, experts, shared, dense_ffn."""
    d, model_type = config.hidden_size, config.model_type
    if not _layer_is_moe(config, layer_idx):
        bias = 2 * config.intermediate_size + d if getattr(config, "mlp_bias", False) else 0
        return {"dense_ffn": 3 * d * config.intermediate_size + bias}
    num_experts = next(_field(config, name) for name in ("num_local_experts", "num_experts", "n_routed_experts")
                       if _field(config, name))
    top_k = config.num_experts_per_tok
    d_ff = _field(config, "moe_intermediate_size", None) or config.intermediate_size
    parts = {"router": num_experts * d, "experts": top_k * 3 * d * d_ff, "shared": 0}
    if model_type == "gpt_oss":
        parts["router"] += num_experts  # the router's bias
    if model_type == "gpt_oss":
        parts["experts"] += top_k * (2 * d_ff + d)  # gate_up and down biases of the selected experts
    if model_type == "qwen2_moe":
        parts["shared"] = 3 * d * config.shared_expert_intermediate_size + d  # + the shared expert's sigmoid gate
    elif model_type in ("deepseek_v2", "deepseek_v3", "glm4_moe") and config.n_shared_experts:
        parts["shared"] = 3 * d * config.moe_intermediate_size * config.n_shared_experts
    return parts


def weight_bytes_per_token(config: Any, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of weights one decoded token reads (batch 1), by part, and their ``total``.

    Parts: embedding_row, head (output head + final norm), norms (two per layer), attention,
    router, experts (the top-k selected per layer), shared (shared experts), dense_ffn (the
    dense layers). Every weight at ``dtype``'s size, the selection bias in float32 (``build_model``).
    """
    d, vocab = config.hidden_size, config.vocab_size
    elements = {"embedding_row": d, "head": vocab * d + d, "norms": 0, "attention": 0, "router": 0, "experts": 0,
                "shared": 0, "dense_ffn": 0}
    for layer_idx in range(config.num_hidden_layers):
        elements["norms"] += 2 * d
        elements["attention"] += _attention_elements(config)
        for part, count in _ffn_elements(config, layer_idx).items():
            elements[part] += count
    size = torch.empty((), dtype=dtype).element_size()
    parts = {part: count * size for part, count in elements.items()}
    if config.model_type in SELECTION_BIAS_FAMILIES:
        # the selection-only bias (DeepSeek-V3 eq. 16), E values per MoE layer, kept in float32
        moe_layers = sum(_layer_is_moe(config, i) for i in range(config.num_hidden_layers))
        parts["router"] += moe_layers * config.n_routed_experts * 4
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------------------------
# The machine's memory bandwidth
# --------------------------------------------------------------------------------------------


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache of cpu0 (Linux sysfs), or None where it cannot be read."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text().strip().upper()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes) if sizes else None


def memory_bandwidth_gbps(buffer_bytes: int = BANDWIDTH_BUFFER_BYTES, runs: int = 3) -> list[float]:
    """Read bandwidth (GB/s, 1e9 bytes) of ``runs`` sums of a float32 buffer of ``buffer_bytes``.

    A sum reads every byte once and writes nothing, as batch-1 decode reads its weights; the
    buffer is written before timing, so no page is faulted in while the clock runs. Each run
    sums two buffers, one in ordinary 4 KiB pages and one in transparent huge pages where the
    kernel has them (``moekit.hugepages``), and counts the faster: the machine's bandwidth is
    the best streaming rate it gives.
    """
    if buffer_bytes < 4 or runs < 1:
        raise ValueError(f"buffer_bytes={buffer_bytes} and runs={runs} must be >= 4 and >= 1")
    probe = BandwidthProbe(buffer_bytes)
    return [probe.read() for _ in range(runs)]


class BandwidthProbe:
    """``memory_bandwidth_gbps``' buffers, allocated once, for probes taken next to each
    implementation's run (the machine's bandwidth moves from minute to minute)."""

    def __init__(self, buffer_bytes: int = BANDWIDTH_BUFFER_BYTES) -> None:
        self.buffers = [torch.ones(buffer_bytes // 4, dtype=torch.float32),
                        huge_page_empty((buffer_bytes // 4,), torch.float32)]
        self.buffers[1].fill_(1.0)

    def read(self) -> float:
        best = 0.0
        for buffer in self.buffers:
            start = time.perf_counter()
            buffer.sum()
            seconds = time.perf_counter() - start
            best = max(best, buffer.numel() * 4 / seconds / 1e9)
        return best


# --------------------------------------------------------------------------------------------
# One implementation's generation step
# --------------------------------------------------------------------------------------------

Step = Callable[[Tensor, Any], tuple[Tensor, Any]]


def transformers_step(model: nn.Module) -> Step:
    def step(input_ids_BS: Tensor, cache: Any) -> tuple[Tensor, Any]:
        # logits_to_keep=1: the last position's logits only, as transformers' generate asks
        out = model(input_ids=input_ids_BS, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    return step


def moekit_lm_step(lm: nn.Module) -> Step:
    def step(input_ids_BS: Tensor, cache: KVCache | None) -> tuple[Tensor, Any]:
        cache = KVCache(lm.config.n_layer) if cache is None else cache
        # logits_to_keep=1: the last position's logits only, as the transformers step
        logits_BSV, _ = lm(input_ids_BS, cache=cache, logits_to_keep=1)
        return logits_BSV[:, -1], cache

    return step


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class ImplResult:
    impl: str
    prefill_tokens_per_s: float  # median over rounds
    decode_tokens_per_s: float
    prefill_vs_transformers: float  # median of the per-round ratios to transformers' tokens/s
    decode_vs_transformers: float
    weight_read_gb_per_s: float  # bytes_per_token · decode tokens/s / 1e9
    # median over rounds of the run's weight read rate / the mean of the probes just before and
    # just after that run
    share_of_bandwidth: float | None
    identical_tokens: bool  # same greedy tokens as transformers in every round
    first_mismatch: int | None  # index of the first differing new token (None when identical)
    round_prefill_tokens_per_s: list[float]
    round_decode_tokens_per_s: list[float]
    tokens: list[int]  # the greedy tokens of the last round
    round_probe_gb_per_s: list[float] = field(default_factory=list)  # each run's bracketing probes' mean

    def to_dict(self) -> dict[str, Any]:
        return {
            "impl": self.impl,
            "label": IMPL_LABELS[self.impl],
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "prefill_vs_transformers": round(self.prefill_vs_transformers, 4),
            "decode_vs_transformers": round(self.decode_vs_transformers, 4),
            "weight_read_gb_per_s": round(self.weight_read_gb_per_s, 4),
            "share_of_bandwidth": None if self.share_of_bandwidth is None else round(self.share_of_bandwidth, 4),
            "identical_tokens": self.identical_tokens,
            "first_mismatch": self.first_mismatch,
            "round_prefill_tokens_per_s": [round(r, 3) for r in self.round_prefill_tokens_per_s],
            "round_decode_tokens_per_s": [round(r, 3) for r in self.round_decode_tokens_per_s],
            "round_probe_gb_per_s": [round(r, 3) for r in self.round_probe_gb_per_s],
            "tokens": self.tokens,
        }


@dataclass
class FamilyResult:
    family: GenerateFamily
    config: dict[str, Any]  # the fields that size the model
    weight_bytes: int
    bytes_per_token: dict[str, int]  # weight_bytes_per_token's parts and total
    attn_implementation: str | None
    experts_implementation: str | None
    results: list[ImplResult]
    skipped: dict[str, str]  # impl -> why it was not measured
    bandwidth_gbps: list[float]  # the probes taken during this family's rounds

    @property
    def identical_tokens(self) -> bool:
        return all(r.identical_tokens for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "title": self.family.title,
            "config": self.config,
            "weight_bytes": self.weight_bytes,
            "bytes_per_token": self.bytes_per_token,
            "attn_implementation": self.attn_implementation,
            "experts_implementation": self.experts_implementation,
            "identical_tokens": self.identical_tokens,
            "skipped": self.skipped,
            "round_bandwidth_gb_per_s": [round(b, 3) for b in self.bandwidth_gbps],
            "results": [r.to_dict() for r in self.results],
        }


def _sizing_fields(config: Any) -> dict[str, Any]:
    names = ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "moe_intermediate_size", "num_local_experts", "num_experts", "n_routed_experts",
             "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace")
    return {name: getattr(config, name) for name in names if getattr(config, name, None) is not None}


@dataclass
class GenerateBenchReport:
    families: list[FamilyResult]
    dtype: str
    prompt_tokens: int
    new_tokens: int
    rounds: int
    quick: bool
    seed: int
    bandwidth_gbps: list[float]  # every probe of the run
    bandwidth_buffer_bytes: int
    cpu_busy_before: float | None = None
    cpu: str = field(default_factory=cpu_model_name)
    threads: int = field(default_factory=torch.get_num_threads)
    cache_bytes: int | None = field(default_factory=last_level_cache_bytes)
    matvec: str = field(default_factory=matvec.status)
    huge_pages: str = field(default_factory=transparent_huge_pages)

    @property
    def bandwidth(self) -> float:
        return statistics.median(self.bandwidth_gbps)

    @property
    def identical_tokens(self) -> bool:
        return all(f.identical_tokens for f in self.families)

    def notes(self) -> list[str]:
        notes = []
        for f in self.families:
            for r in f.results:
                if not r.identical_tokens:
                    notes.append(
                        f"TOKENS DIFFER: {f.family.name} {r.impl} greedy tokens differ from transformers' from new "
                        f"token {r.first_mismatch} on"
                    )
        skipped: dict[tuple[str, str], list[str]] = {}
        for f in self.families:
            for impl, why in f.skipped.items():
                skipped.setdefault((impl, why), []).append(f.family.name)
        notes += [f"{impl} not measured for {', '.join(names)}: {why}" for (impl, why), names in skipped.items()]
        if self.cache_bytes is not None and self.bandwidth_buffer_bytes < 4 * self.cache_bytes:
            notes.append(
                f"the bandwidth probe's buffer ({self.bandwidth_buffer_bytes / 2**20:.0f} MiB) is under 4x the "
                f"last-level cache ({self.cache_bytes / 2**20:.0f} MiB): the figure may include cache hits"
            )
        if self.quick:
            notes.append("--quick runs tiny models (a smoke test): their figures say nothing about real sizes")
        if self.cpu_busy_before is not None and self.cpu_busy_before > 0.15:
            notes.append(
                f"other processes kept {100 * self.cpu_busy_before:.0f}% of the CPUs busy just before the run; "
                "timings are noisy (rerun on an idle machine, or raise --rounds)"
            )
        return notes

    def to_dict(self) -> dict[str, Any]:
        return {
            "bench": "generate",
            "quick": self.quick,
            "dtype": self.dtype,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "rounds": self.rounds,
            "seed": self.seed,
            "sampling": "greedy, batch 1",
            "cpu": self.cpu,
            "torch": torch.__version__,
            "transformers": transformers_version(),
            "threads": self.threads,
            "device": "cpu",
            "cpu_busy_before": self.cpu_busy_before,
            "matvec": self.matvec,
            "transparent_huge_pages": self.huge_pages,
            "memory_bandwidth": {
                "gb_per_s": round(self.bandwidth, 3),
                "runs_gb_per_s": [round(r, 3) for r in self.bandwidth_gbps],
                "buffer_bytes": self.bandwidth_buffer_bytes,
                "last_level_cache_bytes": self.cache_bytes,
                "method": "median of sums of a float32 buffer (read bandwidth), taken before and during the rounds; "
                "each run the faster of a buffer in 4 KiB pages and one in huge pages",
            },
            "identical_tokens": self.identical_tokens,
            "families": [f.to_dict() for f in self.families],
            "notes": self.notes(),
        }

    def table(self) -> str:
        header = ("family", "model", "implementation", "prefill tok/s", "x tf", "decode tok/s", "x tf",
                  "MB/token", "weights GB/s", "of bw", "tokens")
        rows: list[tuple[str, ...]] = []
        for f in self.families:
            config = f.config
            experts = next(config[n] for n in ("num_local_experts", "num_experts", "n_routed_experts") if n in config)
            model = (f"{format_bytes(f.weight_bytes)}, {config['num_hidden_layers']} layers, E={experts} "
                     f"k={config['num_experts_per_tok']}")
            for i, r in enumerate(f.results):
                share = "-" if r.share_of_bandwidth is None else f"{100 * r.share_of_bandwidth:.0f}%"
                rows.append((
                    f.family.name if i == 0 else "", model if i == 0 else "", r.impl,
                    f"{r.prefill_tokens_per_s:.1f}", f"{r.prefill_vs_transformers:.2f}x",
                    f"{r.decode_tokens_per_s:.2f}", f"{r.decode_vs_transformers:.2f}x",
                    _megabytes(f.bytes_per_token["total"]) if i == 0 else "", f"{r.weight_read_gb_per_s:.2f}", share,
                    "same" if r.identical_tokens else f"DIFFER at {r.first_mismatch}",
                ))
            if LLAMA_CPP in f.skipped:  # a row that says why (the note has the details)
                rows.append(("", "", LLAMA_CPP, *["-"] * 7, f.skipped[LLAMA_CPP].split(" (")[0]))
        widths = [max(len(row[j]) for row in [header, *rows]) for j in range(len(header))]

        def fmt(row: tuple[str, ...]) -> str:
            return "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()

        lines = [
            f"moekit bench generate on {self.cpu}: torch {torch.__version__}, transformers {transformers_version()}, "
            f"{self.dtype}, {self.threads} threads",
            f"batch 1, greedy: prompt {self.prompt_tokens} tokens (prefill), {self.new_tokens} new tokens (decode: "
            f"all but the first); median of {self.rounds} alternating rounds"
            + (" (--quick: tiny models)" if self.quick else ""),
            f"memory bandwidth: {self.bandwidth:.2f} GB/s (sum of a {self.bandwidth_buffer_bytes / 1e9:.2f} GB buffer, "
            f"median of {len(self.bandwidth_gbps)} runs); weights GB/s = MB/token x decode tok/s; of bw = median "
            "over rounds of a run's weight read rate over the mean of the probes taken just before and just after it",
            "x tf: median of per-round ratios to transformers as loaded; tokens: greedy tokens vs transformers'",
            f"moekit's batch-1 kernels (moekit.matvec): {self.matvec}; transparent huge pages: {self.huge_pages} "
            "(patch_moe and moekit_lm place their weights in them; transformers as loaded does not)",
            "",
            fmt(header),
            "  ".join("-" * w for w in widths),
            *(fmt(row) for row in rows),
        ]
        lines += [f"note: {note}" for note in self.notes()]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _first_mismatch(tokens: list[int], reference: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(tokens, reference, strict=False)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def _median_ratio(values: list[float], reference: list[float]) -> float:
    return statistics.median(v / r if r > 0 else float("nan") for v, r in zip(values, reference, strict=True))


def run_family(
    family: GenerateFamily,
    dtype: str,
    prompt_tokens: int,
    new_tokens: int,
    rounds: int,
    quick: bool,
    seed: int,
    bandwidth_buffer_bytes: int,
    log: Callable[[str], None],
) -> FamilyResult:
    """Build the family's model (and its patched copy, and moekit's LM where it converts),
    measure them in alternating rounds, and free them before returning."""
    torch_dtype = DTYPES[dtype]
    config = build_config(family, quick=True) if quick else config_for_target(family, torch_dtype)
    torch.manual_seed(seed)
    model = build_model(config, torch_dtype)
    size = weight_bytes(model)
    log(f"{family.name}: {format_bytes(size)} of weights ({config.num_hidden_layers} layers, {dtype}); patching a copy")
    patched = copy.deepcopy(model)
    patch_moe(patched)
    models: dict[str, nn.Module] = {TRANSFORMERS: model, PATCHED: patched}
    steps: dict[str, Step] = {TRANSFORMERS: transformers_step(model), PATCHED: transformers_step(patched)}
    skipped = {}
    llama_cpp_files = contextlib.ExitStack()  # llama.cpp's model, then its GGUF file
    if family.name == "mixtral":
        models[MOEKIT_LM] = from_hf_model(model).eval()
        steps[MOEKIT_LM] = moekit_lm_step(models[MOEKIT_LM])
        missing = llama_cpp_missing()
        if missing is None:
            log(f"{family.name}: writing moekit's LM as GGUF ({GGUF_TYPE_OF_DTYPE[dtype]}) for llama.cpp")
            n_ctx = prompt_tokens + new_tokens
            steps[LLAMA_CPP] = llama_cpp_runner(models[MOEKIT_LM], dtype, n_ctx, llama_cpp_files).step
        else:
            skipped[LLAMA_CPP] = missing
    else:
        skipped[MOEKIT_LM] = "only Mixtral converts to moekit's own LM (interop.hf.from_hf_model)"
    impls = list(steps)
    prompt_ids = torch.randint(0, config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(seed))
    prompt = prompt_ids.tolist()
    greedy = SamplingConfig(greedy=True)

    def generate(impl: str, count: int) -> GenerationResult:
        return timed_generate(steps[impl], prompt, count, greedy)

    for impl in impls:
        log(f"{family.name}: warm-up {impl}")
        generate(impl, min(new_tokens, WARMUP_NEW_TOKENS))
    figures: dict[str, list[GenerationResult]] = {impl: [] for impl in impls}
    probes = []
    paired: dict[str, list[float]] = {impl: [] for impl in impls}
    mismatch: dict[str, int | None] = dict.fromkeys(impls)
    probe = BandwidthProbe(bandwidth_buffer_bytes)
    for r in range(rounds):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]  # rotate who goes first
        # NOTE: a probe before every run and one after the round: each run is compared with the
        # bandwidth of its own minute (this machine's moves between ~30 and ~60 GB/s).
        before = probe.read()
        probes.append(before)
        for impl in order:
            figures[impl].append(generate(impl, new_tokens))
            after = probe.read()
            probes.append(after)
            paired[impl].append((before + after) / 2)
            before = after
        reference = figures[TRANSFORMERS][-1].tokens
        for impl in impls[1:]:
            position = _first_mismatch(figures[impl][-1].tokens, reference)
            if position is not None and mismatch[impl] is None:
                mismatch[impl] = position
        log(f"{family.name}: round {r + 1}/{rounds} " + ", ".join(
            f"{impl} {figures[impl][-1].decode_tokens_per_s:.2f} decode tok/s" for impl in impls))
    bytes_per_token = weight_bytes_per_token(config, torch_dtype)
    reference_prefill = [g.prefill_tokens_per_s for g in figures[TRANSFORMERS]]
    reference_decode = [g.decode_tokens_per_s for g in figures[TRANSFORMERS]]
    results = []
    for impl in impls:
        prefill = [g.prefill_tokens_per_s for g in figures[impl]]
        decode = [g.decode_tokens_per_s for g in figures[impl]]
        decode_median = statistics.median(decode)
        read = bytes_per_token["total"] * decode_median / 1e9
        results.append(ImplResult(
            impl=impl,
            prefill_tokens_per_s=statistics.median(prefill),
            decode_tokens_per_s=decode_median,
            prefill_vs_transformers=_median_ratio(prefill, reference_prefill),
            decode_vs_transformers=_median_ratio(decode, reference_decode),
            weight_read_gb_per_s=read,
            share_of_bandwidth=statistics.median(
                bytes_per_token["total"] * tokens_per_s / 1e9 / bandwidth
                for tokens_per_s, bandwidth in zip(decode, paired[impl], strict=True)
            ) if all(p > 0 for p in paired[impl]) else None,
            identical_tokens=mismatch[impl] is None,
            first_mismatch=mismatch[impl],
            round_prefill_tokens_per_s=prefill,
            round_decode_tokens_per_s=decode,
            tokens=figures[impl][-1].tokens,
            round_probe_gb_per_s=paired[impl],
        ))
    result = FamilyResult(
        family=family,
        config=_sizing_fields(config),
        weight_bytes=size,
        bytes_per_token=bytes_per_token,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        experts_implementation=getattr(model.config, "_experts_implementation", None),
        results=results,
        skipped=skipped,
        bandwidth_gbps=probes,
    )
    # At most one family's models alive at a time: drop them before the next family is built.
    models.clear()
    steps.clear()
    llama_cpp_files.close()
    del model, patched, probe
    gc.collect()
    return result


def llama_cpp_runner(lm: nn.Module, dtype: str, n_ctx: int, files: contextlib.ExitStack) -> LlamaCppLM:
    """llama.cpp on ``lm`` written as GGUF at ``dtype``'s precision, in a temporary folder that
    ``files`` removes (after closing llama.cpp) when it closes."""
    import tempfile

    folder = Path(files.enter_context(tempfile.TemporaryDirectory(prefix="moekit-bench-gguf-")))
    write_gguf(lm, folder / "model.gguf", {"kind": "none"}, GGUF_TYPE_OF_DTYPE[dtype])
    runner = LlamaCppLM(folder / "model.gguf", n_ctx=n_ctx, n_threads=torch.get_num_threads())
    files.callback(runner.close)
    return runner


def parse_families(names: Sequence[str] | None) -> list[GenerateFamily]:
    if names is None:
        return list(FAMILIES.values())
    unknown = [name for name in names if name not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"--families {','.join(names)} is invalid: choose from {', '.join(FAMILIES)}")
    return [FAMILIES[name] for name in dict.fromkeys(names)]


def bench_generate(
    families: Sequence[str] | None = None,
    dtype: str = "float32",
    prompt_tokens: int = 512,
    new_tokens: int = 128,
    rounds: int = 3,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> GenerateBenchReport:
    """Run the generation benchmark for ``families`` (all by default); the method is in the
    module docstring. Raises ValueError, naming the CLI flag, for bad arguments."""
    chosen = parse_families(families)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype} is invalid: choose from {', '.join(DTYPES)}")
    for flag, value, minimum in (("--prompt-tokens", prompt_tokens, 1), ("--new-tokens", new_tokens, 2),
                                 ("--rounds", rounds, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            why = " (decode is timed from the second new token on)" if flag == "--new-tokens" else ""
            raise ValueError(f"{flag} {value} is invalid: must be an integer >= {minimum}{why}")
    if transformers_version() is None:
        raise ValueError("moekit bench generate needs transformers (pip install transformers)")

    def log(message: str) -> None:
        if progress:
            print(f"moekit bench generate: {message}", file=sys.stderr, flush=True)

    busy = cpu_busy_fraction(0.1 if quick else 0.5)
    buffer_bytes = QUICK_BANDWIDTH_BUFFER_BYTES if quick else BANDWIDTH_BUFFER_BYTES
    log(f"memory bandwidth probe ({buffer_bytes / 1e9:.2f} GB buffer)")
    probes = memory_bandwidth_gbps(buffer_bytes, runs=3)
    results = []
    for family in chosen:
        result = run_family(family, dtype, prompt_tokens, new_tokens, rounds, quick, seed, buffer_bytes, log)
        probes += result.bandwidth_gbps
        results.append(result)
    report = GenerateBenchReport(
        results, dtype, prompt_tokens, new_tokens, rounds, quick, seed, probes, buffer_bytes, cpu_busy_before=busy
    )
    return report
