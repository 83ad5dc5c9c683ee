"""GGUF export (``moekit.interop.gguf``): a moekit LM as a file llama.cpp's ``llama`` architecture runs.

Verifies, with the ``gguf`` package's reader and no llama.cpp:
- every tensor read back equals the model's weight it came from (after undoing the q/k rotary
  permutation and the expert transposes), bit for bit in f32 and rounded to the stored type in
  f16/bf16 (norms and routers stay f32); tied embeddings write no output tensor;
- the metadata llama.cpp reads (sizes, heads, experts, eps, rope base, vocabulary);
- the logits of an independent implementation of llama.cpp's llama graph (GPT-J-style rotary
  pairs, softmax top-k renormalized routing), fed only from the file, equal moekit's: this is
  what catches a wrong permutation, which a round trip alone cannot;
- the vocabulary maps id i to byte i (and carries a BPE run's tokens and merges);
- every config llama.cpp cannot represent fails naming the field and value, before anything is
  written; an existing file is replaced only with --force, a run directory never.

With llama-cpp-python importable (opt-in: it is not a dependency), the file also runs in
llama.cpp with the same greedy tokens and first-position logits as moekit; otherwise those
tests skip saying so.

    pytest tests/test_gguf.py
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moekit.config import MoEConfig
from moekit.interop.gguf import (
    GGUF_TYPES,
    ConversionError,
    LlamaCppLM,
    export_run_gguf,
    gguf_vocab,
    gpt2_byte_chars,
    llama_cpp_incompatibility,
    llama_cpp_missing,
    rope_interleave,
    rope_uninterleave,
    write_gguf,
)
from moekit.models.lm import LMConfig, MoETransformerLM

gguf = pytest.importorskip("gguf")


def tiny_config(**changes) -> LMConfig:
    moe_changes = changes.pop("moe", {})
    base = LMConfig(vocab_size=256, seq_len=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32, norm_eps=1e-5,
                    rope_theta=5000.0, moe=MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2))
    return base.with_changes(changes, moe_changes)


def tiny_lm(config: LMConfig | None = None, seed: int = 0) -> MoETransformerLM:
    torch.manual_seed(seed)
    lm = MoETransformerLM(config or tiny_config())
    # Norm gains of 1 would hide a norm written to the wrong place: give every weight its own values.
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
    return lm.eval()


def read(path) -> tuple[dict[str, np.ndarray], dict[str, object], dict[str, str]]:
    """(tensors as float32 in numpy layout, metadata values, stored type of each tensor)."""
    reader = gguf.GGUFReader(path)
    tensors, types = {}, {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        data = np.array(t.data)
        if kind == "BF16":  # raw bytes: the upper 16 bits of a float32
            data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ggml's dimensions, innermost first
        tensors[t.name] = data.astype(np.float32).reshape(shape)
        types[t.name] = kind
    meta = {name: field.contents() for name, field in reader.fields.items()}
    return tensors, meta, types


def moekit_state(tensors: dict[str, np.ndarray], config: LMConfig) -> dict[str, torch.Tensor]:
    """The moekit state dict the GGUF tensors stand for (inverse of gguf_tensors)."""
    t = {name: torch.from_numpy(array) for name, array in tensors.items()}
    state = {"embed.weight": t["token_embd.weight"], "norm.weight": t["output_norm.weight"]}
    state["lm_head.weight"] = t.get("output.weight", t["token_embd.weight"])
    for i in range(config.n_layer):
        p, b = f"blk.{i}", f"blocks.{i}"
        q = rope_uninterleave(t[f"{p}.attn_q.weight"], config.n_head)
        k = rope_uninterleave(t[f"{p}.attn_k.weight"], config.kv_heads)
        state[f"{b}.attn.qkv.weight"] = torch.cat([q, k, t[f"{p}.attn_v.weight"]])
        state[f"{b}.attn.proj.weight"] = t[f"{p}.attn_output.weight"]
        state[f"{b}.attn_norm.weight"] = t[f"{p}.attn_norm.weight"]
        state[f"{b}.ffn_norm.weight"] = t[f"{p}.ffn_norm.weight"]
        if config.arch == "moe":
            state[f"{b}.ffn.router.weight"] = t[f"{p}.ffn_gate_inp.weight"]
            gate_EFD, up_EFD = t[f"{p}.ffn_gate_exps.weight"], t[f"{p}.ffn_up_exps.weight"]
            state[f"{b}.ffn.experts.w_in"] = torch.cat([gate_EFD, up_EFD], dim=1).transpose(1, 2)
            state[f"{b}.ffn.experts.w_out"] = t[f"{p}.ffn_down_exps.weight"].transpose(1, 2)
        else:
            state[f"{b}.ffn.w_in"] = torch.cat([t[f"{p}.ffn_gate.weight"], t[f"{p}.ffn_up.weight"]]).t()
            state[f"{b}.ffn.w_out"] = t[f"{p}.ffn_down.weight"].t()
    return state


def llama_cpp_graph_logits(tensors: dict[str, np.ndarray], meta: dict, idx_S: list[int]) -> torch.Tensor:
    """Logits [S, V] of llama.cpp's ``llama`` graph, written from its definition and the file alone.

    Differences from moekit's own forward, on purpose: rotary pairs are (2i, 2i+1) (llama.cpp's
    LLAMA_ROPE_TYPE_NORM); attention is an explicit masked softmax; each token's experts run one
    by one, weighted by the softmax probabilities of the top k divided by their sum.
    """
    t = {name: torch.from_numpy(array).double() for name, array in tensors.items()}
    n_head, n_kv = int(meta["llama.attention.head_count"]), int(meta["llama.attention.head_count_kv"])
    eps, base = float(meta["llama.attention.layer_norm_rms_epsilon"]), float(meta["llama.rope.freq_base"])
    n_layer, d_model = int(meta["llama.block_count"]), int(meta["llama.embedding_length"])
    top_k = int(meta.get("llama.expert_used_count", 0))
    head_dim, seq = d_model // n_head, len(idx_S)

    def rms_norm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight

    def rope(x_SHK):
        pos_S1 = torch.arange(seq, dtype=torch.float64)[:, None]
        theta_SK2 = pos_S1 * base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        cos, sin = theta_SK2.cos()[:, None, :], theta_SK2.sin()[:, None, :]
        even, odd = x_SHK[..., 0::2], x_SHK[..., 1::2]
        out = torch.empty_like(x_SHK)
        out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
        return out

    x_SD = t["token_embd.weight"][idx_S]
    causal_SS = torch.ones(seq, seq).tril().bool()
    for i in range(n_layer):
        p = f"blk.{i}"
        h_SD = rms_norm(x_SD, t[f"{p}.attn_norm.weight"])
        q = rope((h_SD @ t[f"{p}.attn_q.weight"].T).view(seq, n_head, head_dim))
        k = rope((h_SD @ t[f"{p}.attn_k.weight"].T).view(seq, n_kv, head_dim))
        v = (h_SD @ t[f"{p}.attn_v.weight"].T).view(seq, n_kv, head_dim)
        heads = []
        for head in range(n_head):
            kv = head // (n_head // n_kv)
            scores_SS = (q[:, head] @ k[:, kv].T) / math.sqrt(head_dim)
            heads.append(scores_SS.masked_fill(~causal_SS, float("-inf")).softmax(-1) @ v[:, kv])
        x_SD = x_SD + torch.cat(heads, dim=-1) @ t[f"{p}.attn_output.weight"].T
        h_SD = rms_norm(x_SD, t[f"{p}.ffn_norm.weight"])
        if top_k:
            probs_SE = (h_SD @ t[f"{p}.ffn_gate_inp.weight"].T).softmax(-1)
            out_SD = torch.zeros_like(h_SD)
            for s in range(seq):
                weights_K, experts_K = probs_SE[s].topk(top_k)
                for weight, e in zip((weights_K / weights_K.sum()).tolist(), experts_K.tolist(), strict=True):
                    gate = F.silu(t[f"{p}.ffn_gate_exps.weight"][e] @ h_SD[s])
                    up = t[f"{p}.ffn_up_exps.weight"][e] @ h_SD[s]
                    out_SD[s] += weight * (t[f"{p}.ffn_down_exps.weight"][e] @ (gate * up))
        else:
            gate_SF = F.silu(h_SD @ t[f"{p}.ffn_gate.weight"].T)
            out_SD = (gate_SF * (h_SD @ t[f"{p}.ffn_up.weight"].T)) @ t[f"{p}.ffn_down.weight"].T
        x_SD = x_SD + out_SD
    head_VD = t.get("output.weight", t["token_embd.weight"])
    return (rms_norm(x_SD, t["output_norm.weight"]) @ head_VD.T).float()


def write_run(path, config: LMConfig, tokenizer: dict | None = None) -> MoETransformerLM:
    from moekit.training.checkpoint import save_checkpoint, write_json_atomic
    from moekit.training.config import TrainConfig

    lm = tiny_lm(config)
    path.mkdir(parents=True)
    payload = {"model": config.to_dict(), "train": asdict(TrainConfig()), "tokenizer": tokenizer or {"kind": "bytes"}}
    write_json_atomic(path / "config.json", payload)
    save_checkpoint(path, lm, {})
    return lm


# --------------------------------------------------------------------------------------------
# Tensors and metadata
# --------------------------------------------------------------------------------------------


def test_rope_interleave_puts_row_i_plus_half_after_row_i_and_inverts():
    w = torch.arange(2 * 4).float()[:, None].expand(8, 3)  # 2 heads of head_dim 4, row r holds r
    assert rope_interleave(w, n_heads=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    w = torch.randn(24, 5)
    assert torch.equal(rope_uninterleave(rope_interleave(w, 3), 3), w)


@pytest.mark.parametrize("tie", [True, False])
def test_f32_tensors_read_back_equal_every_weight(tmp_path, tie):
    config = tiny_config(tie_embeddings=tie)
    lm = tiny_lm(config)
    write_gguf(lm, tmp_path / "m.gguf")
    tensors, _, types = read(tmp_path / "m.gguf")
    assert ("output.weight" in tensors) is (not tie)  # tied: llama.cpp uses token_embd for the head
    assert set(types.values()) == {"F32"}
    state = moekit_state(tensors, config)
    expected = lm.state_dict()
    assert set(state) == set(expected)
    for name, value in expected.items():
        assert torch.equal(state[name], value), name
    assert len(tensors) == 2 + (not tie) + config.n_layer * 10


@pytest.mark.parametrize(
    "gguf_type,torch_dtype,stored", [("f16", torch.float16, "F16"), ("bf16", torch.bfloat16, "BF16")]
)
def test_half_types_store_matrices_rounded_and_keep_norms_and_routers_f32(tmp_path, gguf_type, torch_dtype, stored):
    config = tiny_config()
    lm = tiny_lm(config)
    write_gguf(lm, tmp_path / "m.gguf", gguf_type=gguf_type)
    tensors, meta, types = read(tmp_path / "m.gguf")
    for name, kind in types.items():
        assert kind == ("F32" if "norm" in name or "gate_inp" in name else stored), name
    state = moekit_state(tensors, config)
    for name, value in lm.state_dict().items():
        want = value if "norm" in name or "router" in name else value.to(torch_dtype).float()
        assert torch.equal(state[name], want), name
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16}
    assert meta["general.file_type"] == file_types[gguf_type]


def test_metadata_says_what_llama_cpp_reads(tmp_path):
    config = tiny_config(seq_len=48, moe={"top_k": 3})
    write_gguf(tiny_lm(config), tmp_path / "m.gguf", name="my-run")
    _, meta, _ = read(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "my-run"
    want = {"llama.context_length": 48, "llama.embedding_length": 32, "llama.block_count": 2,
            "llama.feed_forward_length": 16, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
            "llama.rope.dimension_count": 8, "llama.expert_count": 4, "llama.expert_used_count": 3,
            "llama.vocab_size": 256, "general.file_type": 0}
    assert {key: meta[key] for key in want} == want
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["llama.rope.freq_base"] == 5000.0
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.merges"] == []
    assert meta["tokenizer.ggml.eos_token_id"] == 0
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False


# --------------------------------------------------------------------------------------------
# The file computes what the model computes (llama.cpp's graph, written independently)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes", [
    {},
    {"tie_embeddings": False, "n_kv_head": 4},
    {"n_kv_head": 1, "moe": {"top_k": 1}},
    {"moe": {"router": "gshard"}},  # eval: top-2 renormalized
    {"moe": {"router": "noisy_topk", "top_k": 2}},  # eval: no noise, softmax over the kept logits
    {"moe": {"capacity_factor": 1.0}},  # training-only: eval stays dropless
    {"arch": "dense"},  # a plain Llama
], ids=["tied-gqa", "untied-mha", "mqa-top1", "gshard", "noisy_topk", "train-capacity", "dense"])
def test_llama_cpp_graph_from_the_file_gives_moekit_logits(tmp_path, changes):
    config = tiny_config(**changes)
    lm = tiny_lm(config)
    write_gguf(lm, tmp_path / "m.gguf")
    tensors, meta, _ = read(tmp_path / "m.gguf")
    if config.arch == "dense":
        assert "llama.expert_count" not in meta and "blk.0.ffn_gate.weight" in tensors
        assert meta["llama.feed_forward_length"] == config.ffn_width(0)
    idx_S = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = lm(torch.tensor([idx_S]))[0][0]
    got = llama_cpp_graph_logits(tensors, meta, idx_S)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_without_the_permutation_the_llama_cpp_graph_differs(tmp_path, monkeypatch):
    """The reference graph is sensitive to the rotary order: the check above is not vacuous."""
    import moekit.interop.gguf as module

    lm = tiny_lm()
    with torch.no_grad():  # sharper attention, so that the positions (the rotary order) matter
        for block in lm.blocks:
            block.attn.qkv.weight.mul_(10)
    idx_S = list(range(40, 60))
    with torch.no_grad():
        want = lm(torch.tensor([idx_S]))[0][0]
    write_gguf(lm, tmp_path / "right.gguf")
    tensors, meta, _ = read(tmp_path / "right.gguf")
    torch.testing.assert_close(llama_cpp_graph_logits(tensors, meta, idx_S), want, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(module, "rope_interleave", lambda w, n_heads: w)
    write_gguf(lm, tmp_path / "m.gguf")
    tensors, meta, _ = read(tmp_path / "m.gguf")
    assert (llama_cpp_graph_logits(tensors, meta, idx_S) - want).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


def test_byte_vocabulary_maps_id_i_to_byte_i(tmp_path):
    chars = gpt2_byte_chars()
    assert len(set(chars)) == 256 and all(len(c) == 1 and not c.isspace() for c in chars)
    assert chars[ord("a")] == "a" and chars[ord(" ")] == "Ġ" and chars[ord("\n")] == "Ċ"  # GPT-2's
    vocab = gguf_vocab({"kind": "bytes"}, 256)
    assert vocab.tokens == chars and vocab.merges == [] and set(vocab.token_types) == {1}
    write_gguf(tiny_lm(), tmp_path / "m.gguf")
    _, meta, _ = read(tmp_path / "m.gguf")
    decode = {c: i for i, c in enumerate(meta["tokenizer.ggml.tokens"])}
    text = "héllo wörld\n\t✓"
    assert bytes(decode[c] for c in "".join(chars[b] for b in text.encode())) == text.encode()


def test_padded_vocabulary_gets_unique_unused_placeholders():
    vocab = gguf_vocab(None, 300)
    assert len(vocab.tokens) == len(set(vocab.tokens)) == 300
    assert vocab.token_types[:256] == [1] * 256 and vocab.token_types[256:] == [5] * 44
    with pytest.raises(ConversionError, match="vocab_size=200 is smaller than the bytes tokenizer's 256"):
        gguf_vocab(None, 200)
    ids_only = gguf_vocab({"kind": "none"}, 97)  # a model without a tokenizer: any vocabulary size
    assert len(set(ids_only.tokens)) == 97 and set(ids_only.token_types) == {5}
    with pytest.raises(ConversionError, match="tokenizer kind 'sentencepiece' is invalid"):
        gguf_vocab({"kind": "sentencepiece"}, 300)


def test_bpe_run_writes_its_tokens_and_merges(tmp_path):
    pytest.importorskip("tokenizers")
    from moekit.training.data import BPETokenizer

    tokenizer = BPETokenizer.train("hello world, hello moe. the mixture of experts. " * 40, 300)
    vocab = gguf_vocab(tokenizer.to_dict(), tokenizer.vocab_size)
    model = tokenizer.to_dict()["tokenizer"]["model"]
    assert vocab.tokens == sorted(model["vocab"], key=model["vocab"].get)
    assert vocab.merges == [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    assert len(vocab.merges) == tokenizer.vocab_size - 256 > 0  # one new token per merge
    assert vocab.tokens[vocab.eos_id] == gpt2_byte_chars()[0]  # byte 0 ends generation, as for bytes
    config = tiny_config(vocab_size=tokenizer.vocab_size)
    write_run(tmp_path / "run", config, tokenizer.to_dict())
    export_run_gguf(tmp_path / "run", tmp_path / "m.gguf")
    _, meta, _ = read(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.tokens"] == vocab.tokens and meta["tokenizer.ggml.merges"] == vocab.merges


# --------------------------------------------------------------------------------------------
# What cannot be written, and where nothing is written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,named", [
    ({"moe": {"activation": "gelu"}}, "moe.activation='gelu'"),
    ({"moe_every": 2}, "moe_every=2"),
    ({"moe": {"router": "switch"}}, "moe.router='switch'"),
    ({"moe": {"router": "expert_choice"}}, "moe.router='expert_choice'"),
    ({"moe": {"router": "aux_free"}}, "moe.router='aux_free'"),
    ({"moe": {"normalize_weights": False}}, "moe.normalize_weights=False"),
    ({"moe": {"num_shared_experts": 1}}, "moe.num_shared_experts=1"),
    ({"moe": {"router_bias": True}}, "moe.router_bias=True"),
    ({"moe": {"expert_biases": True, "activation": "clamped_swiglu"}}, "moe.expert_biases=True"),
    ({"moe": {"routed_scaling_factor": 2.5}}, "moe.routed_scaling_factor=2.5"),
    ({"moe": {"n_group": 2, "topk_group": 1, "group_score": "max"}}, "moe.n_group=2"),
    ({"moe": {"eval_capacity_factor": 1.0}}, "moe.eval_capacity_factor=1.0"),
    ({"moe": {"expert_capacity": 4}}, "moe.expert_capacity=4"),
    ({"arch": "dense", "moe": {"activation": "gelu"}}, "moe.activation='gelu'"),
    ({"arch": "dense", "moe_every": 2, "dense_d_ff": 24}, "dense_d_ff=24 with moe_every=2"),
])
def test_configs_llama_cpp_cannot_represent_fail_naming_field_and_value(tmp_path, changes, named):
    config = tiny_config(**changes)
    assert any(named in reason for reason in llama_cpp_incompatibility(config))
    with pytest.raises(ConversionError, match="llama.cpp") as error:
        write_gguf(tiny_lm(config), tmp_path / "m.gguf")
    assert named in str(error.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_compatible_configs_have_no_reasons():
    assert llama_cpp_incompatibility(tiny_config()) == []
    assert llama_cpp_incompatibility(tiny_config(arch="dense", moe={"router": "switch"})) == []


def test_existing_file_is_replaced_only_with_force(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(ConversionError, match="the file exists; pass --force"):
        write_gguf(tiny_lm(), out)
    assert out.read_bytes() == b"mine"
    write_gguf(tiny_lm(), out, force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_folder_or_run_directory_is_never_written(tmp_path):
    with pytest.raises(ConversionError, match="is a folder"):
        write_gguf(tiny_lm(), tmp_path)
    write_run(tmp_path / "run", tiny_config())
    for force in (False, True):
        with pytest.raises(ConversionError, match="moekit run directory"):
            export_run_gguf(tmp_path / "run", tmp_path / "run" / "m.gguf", force=force)
    assert not (tmp_path / "run" / "m.gguf").exists()


def test_bad_gguf_type_is_rejected_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--gguf-type q4 is invalid: choose from f32, f16, bf16"):
        write_gguf(tiny_lm(), tmp_path / "m.gguf", gguf_type="q4")
    assert GGUF_TYPES == ("f32", "f16", "bf16")


# --------------------------------------------------------------------------------------------
# moekit export RUN --gguf OUT
# --------------------------------------------------------------------------------------------


def test_cli_export_gguf_writes_the_run_and_reports_json(tmp_path, capsys):
    from moekit.cli.main import main

    config = tiny_config()
    lm = write_run(tmp_path / "run", config)
    out = tmp_path / "out" / "run.gguf"
    assert main(["export", str(tmp_path / "run"), "--gguf", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout is the JSON document alone
    assert report == {"run_dir": str(tmp_path / "run"), "gguf": str(out), "gguf_type": "f32",
                      "tensors": 22, "file_bytes": out.stat().st_size, "vocab": "bytes", "experts": 4}
    tensors, meta, _ = read(out)
    assert meta["general.name"] == "run"
    state = moekit_state(tensors, config)
    assert all(torch.equal(state[name], value) for name, value in lm.state_dict().items())

    assert main(["export", str(tmp_path / "run"), "--gguf", str(out)]) == 2  # exists, no --force
    assert "the file exists; pass --force to replace it" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--gguf", str(out), "--gguf-type", "bf16", "--force"]) == 0
    assert read(out)[1]["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16


def test_cli_export_gguf_of_an_unrepresentable_run_fails_without_traceback(tmp_path, capsys):
    from moekit.cli.main import main

    write_run(tmp_path / "run", tiny_config(moe={"num_shared_experts": 1}))
    assert main(["export", str(tmp_path / "run"), "--gguf", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit export: error:") and "moe.num_shared_experts=1" in err
    assert "Traceback" not in err and not (tmp_path / "m.gguf").exists()


def test_cli_export_takes_exactly_one_of_hf_and_gguf(tmp_path, capsys):
    from moekit.cli.main import main

    write_run(tmp_path / "run", tiny_config())
    both = ["export", str(tmp_path / "run"), "--hf", str(tmp_path / "hf"), "--gguf", str(tmp_path / "m.gguf")]
    assert main(both) == 2
    assert "argument --gguf: not allowed with argument --hf" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run")]) == 2
    assert "one of the arguments --hf --gguf is required" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()


# --------------------------------------------------------------------------------------------
# llama.cpp itself (opt-in: llama-cpp-python is not a dependency)
# --------------------------------------------------------------------------------------------

needs_llama_cpp = pytest.mark.skipif(
    llama_cpp_missing() is not None, reason=f"opt-in llama.cpp check: {llama_cpp_missing()}"
)


def trained_lm(steps: int = 60, **changes) -> MoETransformerLM:
    """A tiny LM trained a little on repeated text, so its greedy tokens are not near ties."""
    config = tiny_config(seq_len=64, tie_embeddings=False, **changes)
    lm = tiny_lm(config).train()
    data = torch.tensor(list(b"the mixture of experts routes each token to two experts. " * 20))
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (8,), generator=generator)
        batch = torch.stack([data[s : s + 65] for s in starts.tolist()])
        _, loss = lm(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return lm.eval()


@needs_llama_cpp
@pytest.mark.parametrize("gguf_type,changes", [
    ("f32", {}), ("f16", {}), ("f32", {"arch": "dense"}), ("f32", {"moe": {"router": "noisy_topk"}}),
], ids=["f32", "f16", "dense", "noisy_topk"])
def test_llama_cpp_gives_moekit_greedy_tokens_and_logits(tmp_path, gguf_type, changes):
    lm = trained_lm(**changes)
    if gguf_type == "f16":  # matched precision: moekit runs the weights the file holds
        with torch.no_grad():
            for name, param in lm.named_parameters():
                if "norm" not in name and "router" not in name:
                    param.copy_(param.half().float())
    write_gguf(lm, tmp_path / "m.gguf", gguf_type=gguf_type)
    runner = LlamaCppLM(tmp_path / "m.gguf", n_ctx=64, n_threads=2)
    try:
        prompt = list(b"the mixture of ")
        with torch.no_grad():
            want = lm.generate(torch.tensor([prompt]), 32, temperature=0)[0, len(prompt):].tolist()
            first_want = lm(torch.tensor([prompt[:1]]))[0][0, 0]
        assert runner.greedy(prompt, 32) == want
        first_got, _ = runner.step(torch.tensor([prompt[:1]]), None)
        assert (first_got[0] - first_want).abs().max() < 1e-3
        # llama.cpp's tokenizer reads text as moekit's byte tokenizer does
        text = "héllo, wörld\n"
        assert runner.llm.tokenize(text.encode(), add_bos=False) == list(text.encode())
        assert runner.llm.detokenize(list(text.encode())) == text.encode()
    finally:
        runner.close()


@needs_llama_cpp
@pytest.mark.skipif("MOEKIT_GGUF_RUN" not in os.environ, reason="opt-in: MOEKIT_GGUF_RUN=<a moekit run directory>")
def test_llama_cpp_continues_a_trained_run_as_moekit_sample_greedy_does(tmp_path, capsys):
    """The check on a real run: ``moekit train --steps 200 --out /tmp/g1``, then
    ``MOEKIT_GGUF_RUN=/tmp/g1 pytest tests/test_gguf.py -k trained_run -s``."""
    from moekit.cli.main import main
    from moekit.training.checkpoint import load_model_from_run

    run, prompt_text, new_tokens = os.environ["MOEKIT_GGUF_RUN"], "ROMEO:", 32
    assert main(["export", run, "--gguf", str(tmp_path / "run.gguf")]) == 0
    capsys.readouterr()
    assert main(["sample", run, "--greedy", "--prompt", prompt_text, "--tokens", str(new_tokens), "--json"]) == 0
    (want,) = json.loads(capsys.readouterr().out)["samples"]
    lm, _ = load_model_from_run(run)
    prompt = list(prompt_text.encode())
    runner = LlamaCppLM(tmp_path / "run.gguf", n_ctx=lm.config.seq_len, n_threads=2)
    try:
        tokens = runner.greedy(prompt, new_tokens)
        first_got, _ = runner.step(torch.tensor([prompt[:1]]), None)
    finally:
        runner.close()
    with torch.no_grad():
        first_want = lm.eval()(torch.tensor([prompt[:1]]))[0][0, 0]
    diff = float((first_got[0] - first_want).abs().max())
    print(f"\nllama.cpp: {prompt_text + bytes(tokens).decode('utf-8', errors='replace')!r}\nmoekit:    {want!r}\n"
          f"first-position logits: max abs diff {diff:.2e}")
    assert prompt_text + bytes(tokens).decode("utf-8", errors="replace") == want
    assert diff < 1e-3


# --------------------------------------------------------------------------------------------
# The llama.cpp row of moekit bench generate
# --------------------------------------------------------------------------------------------


def run_quick_mixtral_bench(capsys) -> tuple[dict, str]:
    from moekit.cli.main import main

    pytest.importorskip("transformers")
    assert main(["bench", "generate", "--quick", "--families", "mixtral", "--rounds", "1", "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_bench_llama_cpp_row_says_not_installed_when_llama_cpp_is_missing(monkeypatch, capsys):
    from moekit.experiments.bench import generate as bench

    monkeypatch.setattr(bench, "llama_cpp_missing", lambda: "not installed (pip install llama-cpp-python; test)")
    report, err = run_quick_mixtral_bench(capsys)
    (family,) = report["families"]
    assert [r["impl"] for r in family["results"]] == ["transformers", "patch_moe", "moekit_lm"]
    assert family["skipped"]["llama_cpp"].startswith("not installed")
    row = next(line for line in err.splitlines() if line.split()[:1] == ["llama_cpp"])
    assert row.split()[-2:] == ["not", "installed"]
    assert report["identical_tokens"] is True  # a missing optional package is not an error


@needs_llama_cpp
def test_bench_llama_cpp_row_runs_the_gguf_with_the_same_greedy_tokens(capsys):
    report, err = run_quick_mixtral_bench(capsys)
    (family,) = report["families"]
    results = {r["impl"]: r for r in family["results"]}
    assert list(results) == ["transformers", "patch_moe", "moekit_lm", "llama_cpp"]
    llama = results["llama_cpp"]
    assert llama["prefill_tokens_per_s"] > 0 and llama["decode_tokens_per_s"] > 0
    assert llama["identical_tokens"] is True and llama["tokens"] == results["transformers"]["tokens"]
    assert "llama_cpp" not in family["skipped"]
