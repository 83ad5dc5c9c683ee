"""A decoder-only Transformer language model whose feed-forward blocks are MoE layers.

Notable features:
- pre-norm blocks with RMSNorm, rotary position embeddings and causal attention through
  ``F.scaled_dot_product_attention``; a KV cache for sampling that gives the same tokens as
  recomputing the whole context
- the FFN of every ``moe_every``-th layer is a ``moekit.MoE`` (1 = every layer, Mixtral
  style; 2 = every other layer, Switch/GShard style), the others are dense
- ``arch="dense"`` builds the dense baseline of the same config: every MoE FFN becomes a
  dense FFN whose forward FLOPs per token equal the MoE's active FLOPs (top-k experts,
  shared experts and the router), so the two compare at equal active compute
- grouped-query attention (``n_kv_head``), so a Mixtral checkpoint is expressible
- tied or untied input/output embeddings; the config is a dataclass saved as config.json

Shape suffixes: B batch, S sequence, D d_model, H heads, K head dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit import matvec
from moekit.config import ConfigError, MoEConfig, is_finite_number, is_int, reject_unknown_fields
from moekit.experts import DenseFFN
from moekit.layer import MoE
from moekit.matvec import DecodeLinear
from moekit.routing import NonFiniteRouterLogitsError

ARCHS = ("moe", "dense")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError("LMConfig", field, value, allowed)


@dataclass
class LMConfig:
    """The language model. Each field's ``metadata["help"]`` says what it is and why its default;
    ``moekit train`` derives one flag per field from it (see ``moekit.cli.train``)."""

    vocab_size: int = field(default=256, metadata={
        "help": "tokens in the vocabulary (moekit train: the tokenizer's; 256 = bytes)"})
    seq_len: int = field(default=128, metadata={
        "help": "context length in tokens the model is trained at (rotary works beyond it)"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})
    # Mixtral: 8 key/value heads of 32.
    n_kv_head: int | None = field(default=None, metadata={
        "help": "key/value heads for grouped-query attention; must divide the heads; none = one per head"})
    d_model: int = field(default=128, metadata={"help": "model width"})
    arch: str = field(default="moe", metadata={
        "help": "moe, or dense: the baseline with the MoE's active FLOPs per token", "choices": ARCHS})
    moe_every: int = field(default=1, metadata={
        "help": "every n-th layer's FFN is MoE, the last of each group of n (1 = all, 2 = alternate)"})
    dense_d_ff: int | None = field(default=None, metadata={
        "help": "FFN width of the non-MoE layers; none = the width with the MoE's active FLOPs"})
    tie_embeddings: bool = field(default=True, metadata={"help": "share the input embedding with the output layer"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on attention and residual branches, in [0, 1)"})
    rope_theta: float = field(default=10000.0, metadata={"help": "base of the rotary position embedding"})
    norm_eps: float = field(default=1e-6, metadata={"help": "RMSNorm epsilon (Mixtral uses 1e-5)"})
    # Switch §2.4: initialization scaled down to variance 0.1/fan_in (std sqrt(0.1/d_model), 0.028 at
    # d_model 128) for stability; 0.02 is that scale, about a quarter of the fan-in std 1/sqrt(d_model).
    router_init_std: float = field(default=0.02, metadata={
        "help": "std of the routers' normal initialization (Switch scales it down: sqrt(0.1/d_model))"})
    # 16 experts of width 2·d_model, top-2: the active FFN width is 4·d_model like a GPT block.
    moe: MoEConfig = field(
        default_factory=lambda: MoEConfig(d_model=128, d_ff=256, num_experts=16, top_k=2, balance_loss_coef=0.02),
        metadata={"help": "the MoE layers (moe.d_model follows d_model)"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "moe_every"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                _fail(name, value, "must be an integer >= 1")
        if not isinstance(self.moe, MoEConfig):
            _fail("moe", self.moe, "must be a MoEConfig (or its dict)")
        if self.arch not in ARCHS:
            _fail("arch", self.arch, f"must be one of {ARCHS}")
        if self.d_model % self.n_head != 0:
            _fail("d_model", self.d_model, f"must be divisible by n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2 != 0:
            head_dim = self.d_model // self.n_head
            _fail("n_head", self.n_head, f"head dim d_model/n_head={head_dim} must be even for rotary embeddings")
        if self.n_kv_head is not None and (
            not is_int(self.n_kv_head) or self.n_kv_head < 1 or self.n_head % self.n_kv_head != 0
        ):
            _fail("n_kv_head", self.n_kv_head, f"must be None or an integer >= 1 that divides n_head={self.n_head}")
        if not is_finite_number(self.norm_eps) or not self.norm_eps > 0:
            _fail("norm_eps", self.norm_eps, "must be a finite number > 0")
        if not is_finite_number(self.rope_theta) or not self.rope_theta > 0:
            _fail("rope_theta", self.rope_theta, "must be a finite number > 0")
        if not is_finite_number(self.router_init_std) or not self.router_init_std >= 0:
            _fail("router_init_std", self.router_init_std, "must be a finite number >= 0")
        if self.moe.d_model != self.d_model:
            _fail("moe.d_model", self.moe.d_model, f"must equal d_model={self.d_model}")
        if self.dense_d_ff is not None and (not is_int(self.dense_d_ff) or self.dense_d_ff < 1):
            _fail("dense_d_ff", self.dense_d_ff, "must be None or an integer >= 1")
        if not is_finite_number(self.dropout) or not 0 <= self.dropout < 1:
            _fail("dropout", self.dropout, "must be in [0, 1)")
        if not isinstance(self.tie_embeddings, bool):
            _fail("tie_embeddings", self.tie_embeddings, "must be true or false")

    def with_changes(self, changes: dict[str, Any], moe_changes: dict[str, Any] | None = None) -> LMConfig:
        """This config with ``changes`` (LMConfig fields) and ``moe_changes`` (MoEConfig fields)
        applied and validated: the way ``moekit train`` builds its model from flags.

        Rules: ``moe.d_model`` follows ``d_model`` (one width, one field to set), and the router
        decides top_k when ``moe_changes`` does not give it (``MoEConfig.with_changes``).
        """
        lm_fields = {f.name for f in fields(self)} - {"moe"}
        unknown = sorted(set(changes) - lm_fields)
        if unknown:
            raise ValueError(f"LMConfig.with_changes: unknown fields {unknown} (give MoE fields as moe_changes)")
        moe_changes = dict(moe_changes or {})
        if "d_model" in moe_changes:
            raise ValueError("LMConfig.with_changes: moe.d_model follows d_model; change d_model instead")
        moe_changes["d_model"] = changes.get("d_model", self.d_model)
        return replace(self, **changes, moe=self.moe.with_changes(**moe_changes))

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.arch == "moe" and (layer_idx + 1) % self.moe_every == 0

    @property
    def matched_d_ff(self) -> int:
        """Width of a dense FFN (same activation) with the MoE layer's active forward FLOPs.

        Active FLOPs per token of one MoE FFN: k routed experts and the shared experts, each
        2·D·(H + F) multiply-adds for an FFN of width F (H = 2F for SwiGLU), plus the router's
        2·D·E. A dense FFN of width F' costs 2·D·(H' + F'); solving gives F'.
        """
        moe = self.moe
        hidden = moe.top_k * moe.d_ff + moe.shared_d_ff
        per_unit = 3 if moe.activation == "swiglu" else 2  # (H + F) / F
        router_units = moe.num_experts / per_unit
        return max(1, round(hidden + router_units))

    def ffn_width(self, layer_idx: int) -> int:
        if self.is_moe_layer(layer_idx):
            return self.moe.d_ff
        moe_position = (layer_idx + 1) % self.moe_every == 0
        if moe_position or self.dense_d_ff is None:
            return self.matched_d_ff
        return self.dense_d_ff

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LMConfig:
        reject_unknown_fields(cls, values)
        values = dict(values)
        if isinstance(values.get("moe"), dict):
            values["moe"] = MoEConfig.from_dict(values["moe"])
        return cls(**values)

    def as_dense(self) -> LMConfig:
        return replace(self, arch="dense")


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / rms(x) · g, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(seq_len: int, head_dim: int, theta: float, device: torch.device | None = None):
    """cos and sin of the rotary angles (Su et al. 2021, eq. 34): [S, K/2] each."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles_SK = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return angles_SK.cos(), angles_SK.sin()


class RotaryTables:
    """``rotary_tables`` for any range of positions, computed once and grown by doubling.

    NOTE: an entry depends only on its own position (arange(n)[p] is p for every n), so a
    slice of a longer table equals the table computed for that range: rows past ``seq_len``
    are computed when asked for, the same way as rows before it.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim, self.theta = head_dim, theta
        self._cos_SK: Tensor | None = None
        self._sin_SK: Tensor | None = None

    def __call__(self, start: int, end: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin of positions start..end-1: [end - start, K/2] each (float32)."""
        cos_SK = self._cos_SK
        if cos_SK is None or cos_SK.shape[0] < end or cos_SK.device != device:
            length = max(end, 2 * (cos_SK.shape[0] if cos_SK is not None else 0), 256)
            self._cos_SK, self._sin_SK = rotary_tables(length, self.head_dim, self.theta, device)
        assert self._cos_SK is not None and self._sin_SK is not None
        return self._cos_SK[start:end], self._sin_SK[start:end]


def apply_rotary(x_BHSK: Tensor, cos_SK: Tensor, sin_SK: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of each head's features by the position angle.

    This is the "rotate half" layout of transformers' Llama/Mixtral (``x·cos + rotate_half(x)·sin``
    with cos/sin repeated over both halves), so their q/k weights load without permutation.
    """
    half = x_BHSK.shape[-1] // 2
    x1, x2 = x_BHSK[..., :half], x_BHSK[..., half:]
    cos, sin = cos_SK.to(x_BHSK.dtype), sin_SK.to(x_BHSK.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values of the positions seen so far, per layer: [B, H, S, K] each.

    Each layer's keys and values live in a preallocated buffer [B, H, capacity, K]; a forward
    writes its positions in place and attends over a view of the first ``length`` positions.
    When a forward needs more positions than the buffer holds, the buffer is replaced by one
    of twice the size (one copy, so a long generation copies each position O(1) times on
    average, against a ``torch.cat`` of the whole cache per token). ``capacity`` is the first
    allocation (at least the first forward's length; None: ``MIN_CAPACITY``); give the prompt
    plus the new tokens to never grow. There is no upper limit other than memory.
    """

    MIN_CAPACITY = 256

    def __init__(self, n_layer: int, capacity: int | None = None) -> None:
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"KVCache capacity={capacity!r} is invalid: must be None or an integer >= 1")
        self.capacity = capacity
        self._keys: list[Tensor | None] = [None] * n_layer
        self._values: list[Tensor | None] = [None] * n_layer
        self._lengths = [0] * n_layer

    @property
    def length(self) -> int:
        """Positions cached before the current forward (read before any layer appends)."""
        return self.length_of(0)

    def length_of(self, layer_idx: int) -> int:
        return self._lengths[layer_idx]

    @property
    def keys(self) -> list[Tensor | None]:
        """Each layer's cached keys [B, H, length, K] (views of the buffers), None before its first forward."""
        return [None if k is None else k[:, :, :n] for k, n in zip(self._keys, self._lengths, strict=True)]

    @property
    def values(self) -> list[Tensor | None]:
        return [None if v is None else v[:, :, :n] for v, n in zip(self._values, self._lengths, strict=True)]

    def append(self, layer_idx: int, k_BHSK: Tensor, v_BHSK: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new positions after the cached ones; the keys and values of every
        position so far: [B, H, length + S, K] views of the layer's buffers."""
        past, seq = self._lengths[layer_idx], k_BHSK.shape[2]
        end = past + seq
        keys, values = self._room(layer_idx, end, k_BHSK)
        keys[:, :, past:end] = k_BHSK
        values[:, :, past:end] = v_BHSK
        self._lengths[layer_idx] = end
        return keys[:, :, :end], values[:, :, :end]

    def reserve(self, layer_idx: int, like_BHSK: Tensor) -> tuple[Tensor, Tensor, int]:
        """Room for one more position (a decoded token's, written by the caller): the layer's
        whole key and value buffers [B, H, capacity, K] (grown as ``append`` grows them, shaped
        and typed like ``like_BHSK``) and the position to write, which the length now counts."""
        position = self._lengths[layer_idx]
        keys, values = self._room(layer_idx, position + 1, like_BHSK)
        self._lengths[layer_idx] = position + 1
        return keys, values, position

    def _room(self, layer_idx: int, end: int, like_BHSK: Tensor) -> tuple[Tensor, Tensor]:
        """The layer's buffers, replaced by larger ones (the cached positions copied) when they
        hold fewer than ``end`` positions."""
        past = self._lengths[layer_idx]
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        if keys is None or values is None or keys.shape[2] < end:
            capacity = max(end, self.MIN_CAPACITY if self.capacity is None else self.capacity)
            if keys is not None:
                capacity = max(capacity, 2 * keys.shape[2])
            new_keys = like_BHSK.new_empty(*like_BHSK.shape[:2], capacity, like_BHSK.shape[3])
            new_values = like_BHSK.new_empty(*like_BHSK.shape[:2], capacity, like_BHSK.shape[3])
            if keys is not None and values is not None and past:
                new_keys[:, :, :past] = keys[:, :, :past]
                new_values[:, :, :past] = values[:, :, :past]
            self._keys[layer_idx], self._values[layer_idx] = keys, values = new_keys, new_values
        return keys, values


class CausalSelfAttention(nn.Module):
    def __init__(self, config: LMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.d_model // config.n_head
        # NOTE: rows are [q (n_head heads) | k (n_kv_head heads) | v (n_kv_head heads)], each head's
        # features in the "rotate half" order that Hugging Face's Llama/Mixtral checkpoints use.
        # DecodeLinear: an nn.Linear whose one-row inference forward streams its weight
        # (moekit.matvec), the decode step's time.
        self.qkv = DecodeLinear(config.d_model, (config.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.proj = DecodeLinear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x_BSD: Tensor, cos_SK: Tensor, sin_SK: Tensor, cache: KVCache | None) -> Tensor:
        batch, seq, d_model = x_BSD.shape
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x_BSD).split([d_model, kv_dim, kv_dim], dim=2)
        q_BHSK = q.view(batch, seq, self.n_head, self.head_dim).transpose(1, 2)
        k_BHSK = k.view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)
        v_BHSK = v.view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)
        q_BHSK, k_BHSK = apply_rotary(q_BHSK, cos_SK, sin_SK), apply_rotary(k_BHSK, cos_SK, sin_SK)
        past = 0
        if cache is not None:
            past = cache.length_of(self.layer_idx)
            k_BHSK, v_BHSK = cache.append(self.layer_idx, k_BHSK, v_BHSK)
        dropout = self.dropout if self.training else 0.0
        n_rep = self.n_head // self.n_kv_head
        if past > 0 and seq == 1 and dropout == 0.0:
            # Decode: one query per head sees every cached key, so no mask is needed, and with
            # grouped-query attention the n_rep query heads of kv head j are attended as n_rep
            # queries of that one head ([B, G, n_rep, K]): the cache is read as it is, never
            # repeated per query head.
            q_BGRK = q_BHSK.reshape(batch, self.n_kv_head, n_rep, self.head_dim)
            y = F.scaled_dot_product_attention(q_BGRK, k_BHSK, v_BHSK).reshape(batch, self.n_head, 1, self.head_dim)
            return self.proj(y.transpose(1, 2).reshape(batch, seq, d_model))
        if n_rep > 1:
            # Grouped-query attention (Ainslie et al. 2023): kv head j serves query heads
            # j·n_rep ... (j+1)·n_rep - 1, as transformers' repeat_kv does.
            k_BHSK = k_BHSK.repeat_interleave(n_rep, dim=1)
            v_BHSK = v_BHSK.repeat_interleave(n_rep, dim=1)
        if past == 0:
            y = F.scaled_dot_product_attention(q_BHSK, k_BHSK, v_BHSK, dropout_p=dropout, is_causal=True)
        else:
            # New queries sit at positions past..past+seq-1 and see every key up to their own.
            total = past + seq
            allowed_SS = torch.ones(seq, total, dtype=torch.bool, device=x_BSD.device).tril(past)
            y = F.scaled_dot_product_attention(q_BHSK, k_BHSK, v_BHSK, attn_mask=allowed_SS, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, d_model))


class Block(nn.Module):
    def __init__(self, config: LMConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn: nn.Module
        if config.is_moe_layer(layer_idx):
            self.ffn = MoE(config.moe)
        else:
            self.ffn = DenseFFN(config.d_model, config.ffn_width(layer_idx), config.moe.activation)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x_BSD: Tensor, cos_SK: Tensor, sin_SK: Tensor, cache: KVCache | None) -> Tensor:
        if cache is not None and x_BSD.shape[0] * x_BSD.shape[1] == 1 and not self.training:
            halves = self._decode_attention(x_BSD, cos_SK, sin_SK, cache)
            if halves is not None:
                x_BSD, h_BSD = halves
                return x_BSD + self.ffn(h_BSD)
        x_BSD = x_BSD + self.resid_dropout(self.attn(self.attn_norm(x_BSD), cos_SK, sin_SK, cache))
        return x_BSD + self.resid_dropout(self.ffn(self.ffn_norm(x_BSD)))

    def _attention_call_cache_like(self, x_11D: Tensor, cache: KVCache) -> Tensor | None:
        """Whether a decoded token's attention half runs in ``matvec.attention_block`` (no
        biases, one norm epsilon, a cache with room for this layer, the call's own checks): an
        empty tensor shaped and typed as this layer's cache buffers (``KVCache.reserve``'s
        ``like``) when it does, None when torch runs it."""
        attn = self.attn
        if (attn.qkv.bias is not None or attn.proj.bias is not None or attn.layer_idx >= len(cache._keys)
                or self.attn_norm.eps != self.ffn_norm.eps):
            return None
        like_BHSK = attn.qkv.weight.new_empty(1, attn.n_kv_head, 0, attn.head_dim)
        keys, values = cache._keys[attn.layer_idx], cache._values[attn.layer_idx]
        if not matvec.applies_attention_block(x_11D, attn.qkv.weight, attn.proj.weight,
                                              like_BHSK if keys is None else keys,
                                              like_BHSK if values is None else values):
            return None
        return like_BHSK

    def _decode_attention(
        self, x_11D: Tensor, cos_1K: Tensor, sin_1K: Tensor, cache: KVCache
    ) -> tuple[Tensor, Tensor] | None:
        """One decoded token's attention half (norm, attention, residual, the FFN's norm) in one
        ``moekit.matvec.attention_block`` call; None where it does not apply (torch runs it).

        NOTE: the same function as the PyTorch ops above, summed in another order: a decode
        step's many small ops cost more than its attention weights take to stream
        (docs/bench_generate.md). The ``attn`` and norm modules are not called for such a token,
        so forward hooks registered on them do not run for it (``matvec.set_enabled(False)``
        restores the module calls)."""
        attn = self.attn
        qkv, proj = attn.qkv.weight, attn.proj.weight
        like_BHSK = self._attention_call_cache_like(x_11D, cache)
        if like_BHSK is None:
            return None
        keys, values, position = cache.reserve(attn.layer_idx, like_BHSK)
        x_D, h_D = matvec.attention_block(
            x_11D, qkv, proj, self.attn_norm.weight, self.ffn_norm.weight, self.attn_norm.eps, cos_1K[0], sin_1K[0],
            keys, values, position, attn.n_head,
        )
        return x_D.view_as(x_11D), h_D.view_as(x_11D)


class MoETransformerLM(nn.Module):
    """Decoder-only LM; ``forward(idx_BS, targets_BS=None) -> (logits_BSV, loss | None)``.

    The loss is the mean next-token cross-entropy (nats per token) without the auxiliary
    losses; add ``moekit.aux_loss(model)`` for training.
    """

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        # One draw from the global generator, the same whatever the FFN: every weight below is
        # then initialized from generators seeded by it (``_init_weights``), so a dense and an
        # MoE model built after the same torch.manual_seed share their non-expert weights
        # exactly (paired comparisons), although their modules consume different amounts of
        # the global stream while they are constructed.
        init_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())  # on CPU also under a meta device
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = DecodeLinear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = RotaryTables(config.d_model // config.n_head, config.rope_theta)
        self._init_weights(init_seed)

    def _init_weights(self, init_seed: int) -> None:
        # GPT-2 style: N(0, 0.02) for embeddings and attention projections, residual output
        # projections scaled by 1/sqrt(2·n_layer) so the residual stream does not grow with depth.
        # Two streams: the non-expert weights (embeddings, attention) from one, the FFNs (dense
        # FFN, experts, router, shared experts) from the other, so the first does not depend on
        # the FFN's size.
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        device = self.embed.weight.device
        if device.type == "meta":  # nothing to draw: the weights are loaded later
            return
        non_expert = torch.Generator(device=device).manual_seed(init_seed)
        ffn_stream = torch.Generator(device=device).manual_seed(init_seed + 1)

        def normal_(tensor: Tensor, std: float, generator: torch.Generator) -> None:
            nn.init.normal_(tensor, std=std, generator=generator)

        normal_(self.embed.weight, std, non_expert)
        if not self.config.tie_embeddings:
            normal_(self.lm_head.weight, std, non_expert)
        for block in self.blocks:
            normal_(block.attn.qkv.weight, std, non_expert)
            normal_(block.attn.proj.weight, residual_std, non_expert)
        for block in self.blocks:
            ffn = block.ffn
            experts = ffn.experts if isinstance(ffn, MoE) else ffn
            if hasattr(experts, "w_in"):
                normal_(experts.w_in, std, ffn_stream)
                normal_(experts.w_out, residual_std, ffn_stream)
            if isinstance(ffn, MoE):
                normal_(ffn.router.weight, self.config.router_init_std, ffn_stream)
                if ffn.shared_experts is not None:
                    normal_(ffn.shared_experts.ffn.w_in, std, ffn_stream)
                    normal_(ffn.shared_experts.ffn.w_out, residual_std, ffn_stream)

    def forward(
        self,
        idx_BS: Tensor,
        targets_BS: Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits [B, S, V] and the loss when ``targets_BS`` is given.

        ``cache`` continues from the positions it holds (any number, also past ``seq_len``).
        ``logits_to_keep=n`` computes the output head at the last n positions only ([B, n, V];
        0 = all), as transformers' argument of that name: generation needs the last one, and
        the head is the largest matmul of a prefill.
        """
        if idx_BS.dim() != 2:
            raise ValueError(f"token ids must be [batch, seq], got shape {tuple(idx_BS.shape)}")
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep={logits_to_keep!r} is invalid: must be an integer >= 0 (0 = all)")
        if targets_BS is not None and logits_to_keep:
            raise ValueError("logits_to_keep applies without targets: the loss needs every position's logits")
        seq = idx_BS.shape[1]
        past = cache.length if cache is not None else 0
        cos_SK, sin_SK = self.rotary(past, past + seq, idx_BS.device)
        x_BSD = self.embed(idx_BS)
        decoded = self._decode_blocks_in_one_call(x_BSD, cos_SK, sin_SK, cache)
        if decoded is not None:
            x_BSD = decoded
        else:
            for block in self.blocks:
                x_BSD = block(x_BSD, cos_SK, sin_SK, cache)
        if logits_to_keep:
            x_BSD = x_BSD[:, -logits_to_keep:]
        logits_BSV = self.lm_head(self.norm(x_BSD))
        loss = None
        if targets_BS is not None:
            loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())
        return logits_BSV, loss

    def _decode_blocks_in_one_call(
        self, x_11D: Tensor, cos_1K: Tensor, sin_1K: Tensor, cache: KVCache | None
    ) -> Tensor | None:
        """One decoded token through every block in one ``moekit.matvec.lm_decode`` call: each
        block's attention half (``Block._decode_attention``'s C call) and MoE layer (``MoE``'s
        one-call path), the same calls and roundings without the Python between them (~0.25 ms
        a layer: at a few ms of weights per layer, a tenth of a step). None (the blocks run one
        by one) unless every block takes both one-call paths with one shared MoE config and has
        no forward hook of its own or on its MoE layer; each MoE layer records its routing as
        it would have. Hooks on the attention and norm modules do not run, as in the per-block
        path."""
        if cache is None or self.training or x_11D.shape[0] * x_11D.shape[1] != 1 or not matvec.available():
            return None
        x_TD = x_11D.reshape(1, -1)
        first: MoE | None = None
        first_stacked: tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None = None
        checked = []
        for block in self.blocks:
            moe = block.ffn
            if (
                type(block) is not Block or not isinstance(moe, MoE) or moe.shared_experts is not None
                or block._forward_hooks or block._forward_pre_hooks or moe._forward_hooks or moe._forward_pre_hooks
                or "forward" in vars(block) or "forward" in vars(moe)
                or not moe._one_call_decode_applies(x_TD, moe.active_capacity_factor)
                or (moe.router.bias is not None and (moe.router.bias.dtype != moe.router.weight.dtype
                                                     or not moe.router.bias.is_contiguous()))
            ):
                return None
            stacked = moe.stacked_experts(x_TD)
            if stacked is None:
                return None
            if first is None or first_stacked is None:
                first, first_stacked = moe, stacked
            elif (
                moe.config != first.config or block.attn_norm.eps != self.blocks[0].attn_norm.eps
                or moe.router.gate_in_activation_dtype != first.router.gate_in_activation_dtype
                or (moe.router.bias is None) != (first.router.bias is None)
                or moe.router.weight.dtype != first.router.weight.dtype
                or stacked[0].dtype != first_stacked[0].dtype
                or matvec.expert_layout(stacked[0]) != matvec.expert_layout(first_stacked[0])
                or stacked[0].stride() != first_stacked[0].stride() or stacked[1].stride() != first_stacked[1].stride()
                or (stacked[2] is None) != (first_stacked[2] is None)
            ):
                return None
            like_BHSK = block._attention_call_cache_like(x_11D, cache)
            if like_BHSK is None:
                return None
            checked.append((block, like_BHSK, stacked))
        if first is None:
            return None
        positions = {cache.length_of(block.attn.layer_idx) for block, _, _ in checked}
        if len(positions) != 1:  # the layers hold different lengths: the per-block path copes
            return None
        layers = []
        position = positions.pop()
        for block, like_BHSK, (w_in, w_out, b_in, b_out) in checked:
            keys, values, _ = cache.reserve(block.attn.layer_idx, like_BHSK)
            moe = block.ffn
            layers.append(matvec.DecodeLayer(
                block.attn.qkv.weight, block.attn.proj.weight, block.attn_norm.weight.float().contiguous(),
                block.ffn_norm.weight.float().contiguous(), keys, values, moe.router.weight, moe.router.bias,
                w_in, w_out, b_in, b_out,
            ))
        config = first.config
        result = matvec.lm_decode(
            x_TD, layers, self.blocks[0].attn_norm.eps, cos_1K[0], sin_1K[0], position, self.blocks[0].attn.n_head,
            first.router.gate_in_activation_dtype and x_TD.dtype == torch.bfloat16, config.check_finite,
            config.top_k, config.normalize_weights, config.routed_scaling_factor, config.activation,
            config.swiglu_alpha, config.swiglu_limit,
        )
        if isinstance(result, int):
            raise NonFiniteRouterLogitsError(
                f"router logits of block {result} contain NaN or inf: check the layer input and router weights "
                "(MoEConfig.check_finite=False skips this check)"
            )
        x_D, routed = result
        for (block, _, _), token in zip(checked, routed, strict=True):
            block.ffn.record_routed_token(token, ran_stacked=True)
        return x_D.to(x_11D.dtype).view_as(x_11D)

    @torch.no_grad()
    def generate(
        self,
        idx_BS: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` continuations; temperature 0 is greedy decoding."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 0")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} is invalid: must be >= 0")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} is invalid: must be >= 1 or None")
        # NOTE: positions beyond the trained context are never used: when the context would
        # exceed seq_len, it restarts from its last seq_len // 2 tokens (re-encoded from
        # position 0). The cached and uncached paths follow the same rule, so they agree.
        seq_len = self.config.seq_len
        tokens = idx_BS
        start = max(0, tokens.shape[1] - seq_len)
        # The context never exceeds seq_len (restarts below), nor the prompt plus the new tokens.
        capacity = max(1, min(seq_len, tokens.shape[1] - start + max_new_tokens))
        cache = KVCache(self.config.n_layer, capacity) if use_cache else None
        step_input = tokens[:, start:]
        for _ in range(max_new_tokens):
            if tokens.shape[1] - start > seq_len:
                start = tokens.shape[1] - seq_len // 2
                cache = KVCache(self.config.n_layer, capacity) if use_cache else None
                step_input = tokens[:, start:]
            if cache is None:
                logits_BSV, _ = self(tokens[:, start:], logits_to_keep=1)
            else:
                logits_BSV, _ = self(step_input, cache=cache, logits_to_keep=1)
            logits_BV = logits_BSV[:, -1, :].float()
            if temperature == 0:
                next_B1 = logits_BV.argmax(dim=-1, keepdim=True)
            else:
                logits_BV = logits_BV / temperature
                if top_k is not None:
                    kth = logits_BV.topk(min(top_k, logits_BV.shape[-1])).values[:, -1:]
                    logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
                next_B1 = torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator)
            tokens = torch.cat([tokens, next_B1], dim=1)
            step_input = next_B1
        return tokens
