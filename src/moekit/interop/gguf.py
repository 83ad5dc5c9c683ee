"""A moekit LM as a GGUF file that llama.cpp (and what builds on it: ollama, llama-cpp-python) runs.

    write_gguf(lm, "my.gguf")                 an MoETransformerLM (any vocabulary)
    export_run_gguf("runs/my", "my.gguf")     a run's latest checkpoint, with its tokenizer
    llama_cpp_incompatibility(lm.config)      why a config cannot be written (empty when it can)
    LlamaCppLM("my.gguf").step                llama-cpp-python behind the KV-cache step protocol

llama.cpp runs Mixtral with its ``llama`` architecture: RMSNorm, rotary embeddings, grouped-query
attention and, when ``llama.expert_count`` is set, an MoE FFN in every layer whose router is a
softmax over all experts, the top ``expert_used_count`` kept and their weights renormalized to
sum 1, each expert a SwiGLU FFN. That is moekit's LM with the ``topk`` router: the file holds the
same weights, and llama.cpp computes the same logits (to float rounding). A dense moekit LM
(``arch="dense"``, SwiGLU) is a plain Llama and is written without experts.

Tensor layout (numpy shape; GGUF lists the dimensions the other way round). Shape suffixes:
V vocabulary, D d_model, H heads, G kv heads, K head dim, E experts, F expert hidden size.

    token_embd            [V, D]     embed.weight
    output_norm, output   [D], [V, D] norm.weight, lm_head.weight (left out when tied: llama.cpp
                                     then uses token_embd, as for Llama checkpoints)
    blk.N.attn_norm       [D]
    blk.N.attn_q / _k     [H·K, D] / [G·K, D]   rows of attn.qkv, PERMUTED (below)
    blk.N.attn_v          [G·K, D]
    blk.N.attn_output     [D, H·K]   attn.proj.weight
    blk.N.ffn_norm        [D]
    blk.N.ffn_gate_inp    [E, D]     ffn.router.weight (kept float32 at f16/bf16, as llama.cpp's
                                     converter keeps it: moekit's router math is float32 too)
    blk.N.ffn_gate_exps   [E, F, D]  ffn.experts.w_in[:, :, :F] transposed  (w_in = [gate | up])
    blk.N.ffn_up_exps     [E, F, D]  ffn.experts.w_in[:, :, F:] transposed
    blk.N.ffn_down_exps   [E, D, F]  ffn.experts.w_out transposed

Rotary order. moekit rotates the pair (i, i + K/2) of each head (the "rotate half" layout of
transformers' Llama/Mixtral, ``models.lm.apply_rotary``); llama.cpp's ``llama`` architecture
rotates the pair (2i, 2i + 1) (GPT-J style, the layout of Meta's original checkpoints). Both
use the angle pos·θ^(-2i/K) for pair i, so moving row i + K/2 next to row i in every head of the
q and k projections gives llama.cpp the same attention scores: row 2i of the written head is
moekit's row i, row 2i + 1 is moekit's row i + K/2 (``rope_interleave``, undone by
``rope_uninterleave``). v is not rotated and not permuted.

Vocabulary. llama.cpp needs a tokenizer in the file. moekit's tokenizers are byte-level (UTF-8
bytes, 256 ids; or a byte-level BPE trained with ``tokenizers``), which is llama.cpp's ``gpt2``
tokenizer with the GPT-2 pre-tokenizer: token i of the byte vocabulary is the GPT-2 character of
byte i (``gpt2_byte_chars``), with no merges, so llama.cpp tokenizes text to the same ids as
moekit and detokenizes id i to byte i; a BPE run writes its own tokens and merges. Ids the model
has beyond its tokenizer's (a padded or random-weight vocabulary) become unused placeholder
tokens. moekit's text has no end-of-text token; the file names byte 0 (NUL) as llama.cpp's
end of generation, a byte moekit's data never contains (``training.data.read_text`` refuses it),
and asks for no BOS/EOS to be added to prompts (moekit adds none). (llama.cpp logs "special_eos_id is
not in special_eog_ids" when it loads such a file: it recognizes end tokens by their text, like
"<|endoftext|>", and then adds the named one itself; the warning is harmless.)

Nothing here imports ``gguf`` or ``llama_cpp`` at module import: both are optional packages.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moekit.interop.hf import ConversionError, is_run_directory
from moekit.layer import MoE
from moekit.models.lm import LMConfig, MoETransformerLM

GGUF_TYPES = ("f32", "f16", "bf16")  # what --gguf-type takes: the weights' precision in the file
ARCH = "llama"
# Routers whose eval-mode routing is llama.cpp's (softmax over all experts, top k, renormalized):
# topk with normalize_weights; gshard (top-2, always renormalized; its random second expert is a
# training-time policy); noisy_topk (no noise in eval, and a softmax over the k kept logits equals
# the renormalized top-k of the softmax over all).
LLAMA_CPP_ROUTERS = ("topk", "gshard", "noisy_topk")
NO_EOS_BYTE = 0  # the byte named end-of-generation: NUL, which moekit's text data never holds


def _install_hint(package: str) -> str:
    return f"writing GGUF needs the {package} package: pip install {package}"


# --------------------------------------------------------------------------------------------
# What llama.cpp's llama architecture can represent
# --------------------------------------------------------------------------------------------


def llama_cpp_incompatibility(config: LMConfig) -> list[str]:
    """Why a moekit LM is not expressible in llama.cpp's ``llama`` architecture (empty when it is).

    Each reason names the config field, its value and what llama.cpp computes instead. Only what
    the model computes at inference counts: training-only settings (losses, jitter, dropout, the
    training capacity factor, the gshard second-expert policy) are not part of the file.
    """
    moe = config.moe
    reasons = []
    if moe.activation != "swiglu":
        what = "experts" if config.arch == "moe" else "FFNs"
        reasons.append(f"moe.activation={moe.activation!r} (llama.cpp's llama {what} are SwiGLU: 'swiglu')")
    if config.arch == "dense":  # a plain Llama: the router settings below do not exist in it
        widths = sorted({config.ffn_width(i) for i in range(config.n_layer)})
        if len(widths) > 1:
            reasons.append(
                f"dense_d_ff={config.dense_d_ff} with moe_every={config.moe_every} (FFNs of widths {widths}: "
                "llama.cpp's llama architecture sizes every layer's FFN alike; dense_d_ff must be None)"
            )
        return reasons
    if config.moe_every != 1:
        reasons.append(
            f"moe_every={config.moe_every} (dense layers mixed with MoE layers: llama.cpp's llama "
            "architecture has an MoE FFN in every layer or in none, so it must be 1)"
        )
    if moe.router not in LLAMA_CPP_ROUTERS:
        why = {
            "switch": "switch weighs its one expert by its softmax probability; llama.cpp renormalizes it to 1",
            "expert_choice": "experts choose tokens; llama.cpp routes each token to its top-k experts",
            "aux_free": "sigmoid scores with a selection bias; llama.cpp's llama routing is a softmax",
        }.get(moe.router, "")
        reasons.append(
            f"moe.router={moe.router!r} (llama.cpp routes with a softmax top-k, renormalized: "
            f"one of {LLAMA_CPP_ROUTERS}{'; ' + why if why else ''})"
        )
    if moe.router == "topk" and not moe.normalize_weights:
        reasons.append("moe.normalize_weights=False (llama.cpp renormalizes the top-k weights to sum 1)")
    if moe.routed_scaling_factor != 1.0:
        reasons.append(
            f"moe.routed_scaling_factor={moe.routed_scaling_factor} (llama.cpp's llama routing has none: 1.0)"
        )
    if moe.n_group != 1:
        reasons.append(f"moe.n_group={moe.n_group} (group-limited routing: llama.cpp's llama routing has none: 1)")
    if moe.router_bias:
        reasons.append("moe.router_bias=True (llama.cpp's llama router has no logit bias)")
    if moe.expert_biases:
        reasons.append("moe.expert_biases=True (llama.cpp's llama experts have no biases)")
    if moe.num_shared_experts:
        reasons.append(
            f"moe.num_shared_experts={moe.num_shared_experts} (llama.cpp's llama MoE has no shared experts: 0)"
        )
    if moe.eval_capacity_factor is not None:
        reasons.append(
            f"moe.eval_capacity_factor={moe.eval_capacity_factor} (tokens over capacity are dropped at inference; "
            "llama.cpp is dropless: None)"
        )
    if moe.expert_capacity is not None:
        reasons.append(
            f"moe.expert_capacity={moe.expert_capacity} (a fixed capacity drops tokens at inference; "
            "llama.cpp is dropless: None)"
        )
    return reasons


def check_llama_cpp_compatible(config: LMConfig, what: str = "this model") -> None:
    reasons = llama_cpp_incompatibility(config)
    if reasons:
        raise ConversionError(
            f"{what} is not expressible in llama.cpp's llama architecture (GGUF): " + "; ".join(reasons)
        )


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def rope_interleave(w_RD: Tensor, n_heads: int) -> Tensor:
    """Rows of a q or k projection from moekit's rotary order to llama.cpp's: in each head of K
    rows, row 2i ← row i and row 2i+1 ← row i + K/2 (module docstring)."""
    rows, d_in = w_RD.shape
    head_dim = rows // n_heads
    return w_RD.reshape(n_heads, 2, head_dim // 2, d_in).transpose(1, 2).reshape(rows, d_in)


def rope_uninterleave(w_RD: Tensor, n_heads: int) -> Tensor:
    """The inverse of ``rope_interleave``: llama.cpp's rotary row order back to moekit's."""
    rows, d_in = w_RD.shape
    head_dim = rows // n_heads
    return w_RD.reshape(n_heads, head_dim // 2, 2, d_in).transpose(1, 2).reshape(rows, d_in)


def gguf_tensors(lm: MoETransformerLM) -> Iterator[tuple[str, Tensor]]:
    """(GGUF name, tensor in llama.cpp's numpy layout) for every weight of ``lm``, float32 or the
    model's dtype, on the CPU; the layout table and the q/k permutation are in the module docstring."""
    config = lm.config
    check_llama_cpp_compatible(config)
    head_dim = config.d_model // config.n_head
    q_rows, kv_rows = config.n_head * head_dim, config.kv_heads * head_dim

    def cpu(t: Tensor) -> Tensor:
        return t.detach().to("cpu")

    yield "token_embd.weight", cpu(lm.embed.weight)
    for i, block in enumerate(lm.blocks):
        prefix = f"blk.{i}"
        yield f"{prefix}.attn_norm.weight", cpu(block.attn_norm.weight)
        q_RD, k_RD, v_RD = cpu(block.attn.qkv.weight).split([q_rows, kv_rows, kv_rows], dim=0)
        yield f"{prefix}.attn_q.weight", rope_interleave(q_RD, config.n_head)
        yield f"{prefix}.attn_k.weight", rope_interleave(k_RD, config.kv_heads)
        yield f"{prefix}.attn_v.weight", v_RD
        yield f"{prefix}.attn_output.weight", cpu(block.attn.proj.weight)
        yield f"{prefix}.ffn_norm.weight", cpu(block.ffn_norm.weight)
        ffn = block.ffn
        if isinstance(ffn, MoE):
            d_ff = config.moe.d_ff
            w_in_EDH, w_out_EFD = cpu(ffn.experts.w_in), cpu(ffn.experts.w_out)
            yield f"{prefix}.ffn_gate_inp.weight", cpu(ffn.router.weight)
            yield f"{prefix}.ffn_gate_exps.weight", w_in_EDH[:, :, :d_ff].transpose(1, 2)
            yield f"{prefix}.ffn_up_exps.weight", w_in_EDH[:, :, d_ff:].transpose(1, 2)
            yield f"{prefix}.ffn_down_exps.weight", w_out_EFD.transpose(1, 2)
        else:  # a dense SwiGLU FFN: w_in [D, 2F] = [gate | up], w_out [F, D]
            d_ff = ffn.w_out.shape[0]
            w_in_DH, w_out_FD = cpu(ffn.w_in), cpu(ffn.w_out)
            yield f"{prefix}.ffn_gate.weight", w_in_DH[:, :d_ff].t()
            yield f"{prefix}.ffn_up.weight", w_in_DH[:, d_ff:].t()
            yield f"{prefix}.ffn_down.weight", w_out_FD.t()
    yield "output_norm.weight", cpu(lm.norm.weight)
    if not config.tie_embeddings:
        yield "output.weight", cpu(lm.lm_head.weight)


def _stored_type(name: str, tensor: Tensor, gguf_type: str) -> str:
    """The precision a tensor is stored in: 1-D tensors (norms) and the router stay f32, as
    llama.cpp's own converter keeps them."""
    if tensor.dim() <= 1 or name.endswith("ffn_gate_inp.weight"):
        return "f32"
    return gguf_type


def _numpy(tensor: Tensor, stored: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) in the stored precision; bf16 travels as its int16 bits."""
    import gguf

    if stored == "bf16":
        bits = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        return bits, gguf.GGMLQuantizationType.BF16
    dtype = torch.float16 if stored == "f16" else torch.float32
    return tensor.to(dtype).contiguous().numpy(), None


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


def gpt2_byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte 0..255.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, 0x7F-0xA0,
    0xAD) take the code points 256, 257, ... in byte order (Radford et al. 2019's encoder.py,
    which transformers' ByteLevel and llama.cpp's ``gpt2`` tokenizer share).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


@dataclass
class GGUFVocab:
    """What the ``tokenizer.ggml.*`` keys hold."""

    tokens: list[str]  # id -> token text (GPT-2 byte characters)
    token_types: list[int]  # gguf.TokenType values: NORMAL, or UNUSED for placeholders
    merges: list[str]  # "left right", by rank
    eos_id: int  # the token of byte 0 (module docstring)
    kind: str  # "bytes" or "bpe"


def gguf_vocab(tokenizer: dict[str, Any] | None, vocab_size: int) -> GGUFVocab:
    """The vocabulary of a model with ``vocab_size`` ids whose tokenizer is ``tokenizer`` (a run's
    ``tokenizer`` entry: ``{"kind": "bytes"}`` or ``{"kind": "bpe", "tokenizer": <tokenizers JSON>}``;
    None means bytes; ``{"kind": "none"}`` a model without one, every id a placeholder). Ids past the
    tokenizer's are unused placeholders."""
    normal, unused = 1, 5  # gguf.TokenType.NORMAL, UNUSED (kept literal: gguf need not be installed here)
    chars = gpt2_byte_chars()
    kind = (tokenizer or {}).get("kind", "bytes")
    if kind == "bytes":
        tokens, merges = list(chars), []
        eos_id = NO_EOS_BYTE
    elif kind == "none":  # no tokenizer (random weights, benchmarks): llama.cpp runs it from token ids
        tokens, merges = [], []
        eos_id = 0
    elif kind == "bpe":
        tokens, merges = _bpe_tokens(tokenizer["tokenizer"])  # type: ignore[index]
        eos_id = tokens.index(chars[NO_EOS_BYTE])
    else:
        raise ConversionError(f"tokenizer kind {kind!r} is invalid: GGUF export knows 'bytes', 'bpe' and 'none'")
    if vocab_size < len(tokens):
        raise ConversionError(
            f"vocab_size={vocab_size} is smaller than the {kind} tokenizer's {len(tokens)} tokens: "
            "every token id must have an embedding row"
        )
    types = [normal] * len(tokens)
    # A space never occurs in a byte-level token (it is 'Ġ'), so these names cannot collide.
    tokens += [f"[moekit unused {i}]" for i in range(len(tokens), vocab_size)]
    types += [unused] * (vocab_size - len(types))
    return GGUFVocab(tokens, types, merges, eos_id, kind)


def _bpe_tokens(spec: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Tokens by id and merges of a moekit BPE tokenizer (``tokenizers`` JSON, byte-level)."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        raise ConversionError(
            f"the run's BPE tokenizer has model {model.get('type')!r} and pre-tokenizer {pre.get('type')!r}: "
            "GGUF export writes byte-level BPE ('BPE' with 'ByteLevel', what moekit trains)"
        )
    if pre.get("add_prefix_space", False) or not pre.get("use_regex", True):
        raise ConversionError(
            "the run's ByteLevel pre-tokenizer has add_prefix_space=True or use_regex=False: llama.cpp's "
            "'gpt-2' pre-tokenizer is add_prefix_space=False with the GPT-2 regex"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    for added in spec.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ConversionError("the run's BPE tokenizer does not number its tokens 0..n-1 without gaps")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return [token for token, _ in by_id], merges


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _writer_class() -> type:
    import gguf

    class Writer(gguf.GGUFWriter):
        """GGUFWriter that also writes an empty array whose element type is given.

        NOTE: gguf-py refuses empty arrays (it takes the element type from the first element), but
        the format has them and llama.cpp reads them: the byte vocabulary has zero merges, and
        llama.cpp's ``gpt2`` tokenizer requires the ``tokenizer.ggml.merges`` key to exist.
        """

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):  # type: ignore[no-untyped-def]
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                packed = self._pack("I", vtype) if add_vtype else b""
                return packed + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def check_gguf_out(out: str | Path, force: bool = False, run_dir: str | Path | None = None) -> Path:
    """Where a GGUF file may be written: a new file, an existing one only with ``force``; never a
    folder, and never inside a moekit run directory (a run is never overwritten, --force or not)."""
    out = Path(out)
    if out.is_dir():
        raise ConversionError(
            f"--gguf {out}: is a folder; give the path of the .gguf file to write (nothing was written)"
        )
    resolved = out.resolve()
    for folder in resolved.parents:
        is_the_run = run_dir is not None and folder == Path(run_dir).resolve()
        if is_the_run or (folder.is_dir() and is_run_directory(folder)):
            raise ConversionError(
                f"--gguf {out}: lies inside {folder}, which is a moekit run directory; export writes outside "
                "runs and never into one (nothing was written, --force or not)"
            )
    if out.exists() and not force:
        raise ConversionError(
            f"--gguf {out}: the file exists; pass --force to replace it, or choose a new path (nothing was written)"
        )
    return out


@dataclass
class GGUFExport:
    """What ``write_gguf`` wrote."""

    path: Path
    gguf_type: str
    tensors: int
    file_bytes: int
    vocab: str  # "bytes" or "bpe"
    experts: int  # 0 for a dense model

    def to_dict(self) -> dict[str, Any]:
        return {"gguf": str(self.path), "gguf_type": self.gguf_type, "tensors": self.tensors,
                "file_bytes": self.file_bytes, "vocab": self.vocab, "experts": self.experts}


def write_gguf(
    lm: MoETransformerLM,
    out: str | Path,
    tokenizer: dict[str, Any] | None = None,
    gguf_type: str = "f32",
    name: str | None = None,
    force: bool = False,
) -> GGUFExport:
    """Write ``lm`` as a GGUF file for llama.cpp's ``llama`` architecture (module docstring).

    ``tokenizer`` is a run's tokenizer entry (None: bytes); ``gguf_type`` the precision of the
    weight matrices ("f32", "f16" or "bf16"; norms and routers stay f32). The file is written
    next to ``out`` and renamed into place, so a failure leaves no partial file; an existing
    ``out`` is replaced only with ``force``. Raises ConversionError (a ValueError) naming the config
    field for a model llama.cpp cannot represent, before anything is written.
    """
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ImportError(_install_hint("gguf")) from error
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf-type {gguf_type} is invalid: choose from {', '.join(GGUF_TYPES)}")
    config = lm.config
    check_llama_cpp_compatible(config)
    out = check_gguf_out(out, force)
    vocab = gguf_vocab(tokenizer, config.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = _writer_class()(tmp, ARCH)
    try:
        _add_metadata(writer, config, vocab, gguf_type, name or "moekit")
        count = 0
        for tensor_name, tensor in gguf_tensors(lm):
            array, raw_dtype = _numpy(tensor, _stored_type(tensor_name, tensor, gguf_type))
            writer.add_tensor(tensor_name, array, raw_dtype=raw_dtype)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    experts = config.moe.num_experts if config.arch == "moe" else 0
    return GGUFExport(out, gguf_type, count, out.stat().st_size, vocab.kind, experts)


def _add_metadata(writer: Any, config: LMConfig, vocab: GGUFVocab, gguf_type: str, name: str) -> None:
    import gguf

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16}
    head_dim = config.d_model // config.n_head
    writer.add_name(name)
    writer.add_file_type(file_types[gguf_type])
    writer.add_context_length(config.seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if config.arch == "moe":
        writer.add_feed_forward_length(config.moe.d_ff)  # llama.cpp's n_ff is the expert width
        writer.add_expert_count(config.moe.num_experts)
        writer.add_expert_used_count(config.moe.top_k)
    else:
        writer.add_feed_forward_length(config.ffn_width(0))  # one width (llama_cpp_incompatibility)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, vocab.merges, gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.STRING)
    writer.add_bos_token_id(vocab.eos_id)  # llama.cpp's default would be id 11; never added (below)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def export_run_gguf(run_dir: str | Path, out: str | Path, gguf_type: str = "f32", force: bool = False) -> GGUFExport:
    """Write a run's latest checkpoint, with its tokenizer, as a GGUF file (``write_gguf``).

    Everything about ``out`` and the model is checked before the weights are read."""
    from moekit.training.checkpoint import load_model_from_run, read_run_config

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf-type {gguf_type} is invalid: choose from {', '.join(GGUF_TYPES)}")
    check_gguf_out(out, force, run_dir)
    payload = read_run_config(Path(run_dir))
    check_llama_cpp_compatible(LMConfig.from_dict(payload["model"]), str(run_dir))
    lm, payload = load_model_from_run(run_dir)
    return write_gguf(lm.eval(), out, payload.get("tokenizer"), gguf_type, name=Path(run_dir).resolve().name,
                      force=force)


# --------------------------------------------------------------------------------------------
# Running the file with llama-cpp-python
# --------------------------------------------------------------------------------------------


def llama_cpp_missing() -> str | None:
    """None when ``llama_cpp`` (llama-cpp-python) imports, else why not (to print)."""
    try:
        import llama_cpp  # noqa: F401
    except ModuleNotFoundError as error:
        return f"not installed (pip install llama-cpp-python; {error})"
    except Exception as error:  # its shared library fails to load (OSError), or another ImportError
        return f"llama-cpp-python does not load ({type(error).__name__}: {error})"
    return None


class LlamaCppLM:
    """A GGUF file in llama-cpp-python, driven by token ids.

    ``step(input_ids_BS, cache)`` is the KV-cache step protocol of ``moekit.inference.timed_generate``
    (batch 1): ``cache`` None starts a new sequence (llama.cpp's cache is cleared), anything else
    continues it; it returns the last position's logits [1, V] as a float32 tensor. Only the last
    position's logits are computed (``logits_all=False``), as transformers' generate asks.
    """

    def __init__(self, path: str | Path, n_ctx: int, n_threads: int | None = None, n_batch: int = 512) -> None:
        missing = llama_cpp_missing()
        if missing is not None:
            raise ImportError(missing)
        import llama_cpp

        threads = n_threads or torch.get_num_threads()
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=threads,
            n_threads_batch=threads, logits_all=False, verbose=False,
        )
        self._llama_cpp = llama_cpp
        self.n_vocab = self.llm.n_vocab()

    def last_logits(self) -> np.ndarray:
        pointer = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

    def step(self, input_ids_BS: Tensor, cache: Any) -> tuple[Tensor, Any]:
        if input_ids_BS.shape[0] != 1:
            raise ValueError(f"LlamaCppLM runs batch 1, got input ids of shape {tuple(input_ids_BS.shape)}")
        if cache is None:
            self.llm.reset()
        self.llm.eval(input_ids_BS[0].tolist())
        return torch.from_numpy(self.last_logits())[None], True

    def greedy(self, prompt_ids: list[int], new_tokens: int) -> list[int]:
        """``new_tokens`` greedy (argmax) tokens after ``prompt_ids``."""
        tokens: list[int] = []
        logits_1V, cache = self.step(torch.tensor([prompt_ids]), None)
        for _ in range(new_tokens):
            tokens.append(int(logits_1V.argmax()))
            if len(tokens) < new_tokens:
                logits_1V, cache = self.step(torch.tensor([[tokens[-1]]]), cache)
        return tokens

    def close(self) -> None:
        self.llm.close()
