"""A model's weights as a stream of (moekit name, tensor), one tensor in memory at a time.

The expert store's writer (``moekit.inference.store.write_store``) takes an LMConfig and such a
stream; this module supplies it for the two kinds of model ``moekit pack`` reads:

- a moekit run directory (config.json + checkpoint/model.safetensors, or an expert-parallel
  checkpoint whose expert shards are concatenated tensor by tensor)
- a local transformers Mixtral folder (config.json + safetensors shards, transformers-5 keys
  or the original per-expert w1/w2/w3 keys), converted to moekit's names and layouts
  (``moekit.interop.hf`` documents the mapping)

Tensors are read with ``pread`` (``SafetensorsReader``), never through a whole-file mapping,
so the reader holds what it yields and nothing more. The largest transient is one MoE layer's
experts in two layouts (transformers' [E, 2F, D] and moekit's [E, D, 2F]).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.inference.store import SafetensorsReader
from moekit.interop.hf import (
    ConversionError,
    _expected_shapes,
    _read_json,
    _safetensors_files,
    hf_tokenizer_payload,
    mixtral_folder_config,
)
from moekit.models.lm import LMConfig


@dataclass
class TensorStream:
    config: LMConfig
    tensors: Iterator[tuple[str, Tensor]]
    tokenizer: dict | None  # the run-directory tokenizer entry
    source: str  # what was read, for the store's index


def model_tensor_stream(path: str | Path) -> TensorStream:
    """The weights of a moekit run directory or a local transformers Mixtral folder."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{config_path}: missing; MODEL must be a moekit run directory or a local "
                              "transformers folder")
    payload = _read_json(config_path)
    if isinstance(payload, dict) and "model" in payload and "model_type" not in payload:
        return run_tensor_stream(path)
    return hf_tensor_stream(path)


def run_tensor_stream(run_dir: str | Path) -> TensorStream:
    """A moekit run's latest checkpoint, tensor by tensor."""
    from moekit.distributed import checkpoint as distributed_checkpoint
    from moekit.training.checkpoint import WEIGHTS_FILE, find_checkpoint, read_run_config

    run_dir = Path(run_dir)
    payload = read_run_config(run_dir)
    config = LMConfig.from_dict(payload["model"])
    directory = find_checkpoint(run_dir)
    num_ranks, sharded = distributed_checkpoint.read_layout(directory)

    def tensors() -> Iterator[tuple[str, Tensor]]:
        replicated = SafetensorsReader(directory / WEIGHTS_FILE)
        for name in replicated.keys():
            yield name, replicated.get(name)
        if num_ranks > 1:
            shards = [SafetensorsReader(directory / distributed_checkpoint.expert_file(rank, num_ranks))
                      for rank in range(num_ranks)]
            for name in sharded:
                missing = [shard.path for shard in shards if name not in shard.entries]
                if missing:
                    raise ConversionError(f"{missing[0]}: missing expert tensor {name}")
                yield name, torch.cat([shard.get(name) for shard in shards])

    return TensorStream(config, tensors(), payload.get("tokenizer", {"kind": "bytes"}), str(run_dir.resolve()))


def hf_tensor_stream(folder: str | Path) -> TensorStream:
    """A local transformers Mixtral folder's weights under moekit's names and layouts.

    Every shard's header is read and every tensor's shape checked against config.json before
    the first tensor is yielded: a missing tensor or a wrong shape is a ``ConversionError``
    naming the file and the tensor.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    config, _ = mixtral_folder_config(folder)
    readers = {name: reader for reader in map(SafetensorsReader, _safetensors_files(folder)) for name in reader.keys()}
    for name, shape in _expected_shapes(config).items():
        if name in readers and readers[name].shape(name) != shape:
            raise ConversionError(
                f"{readers[name].path}: tensor {name} has shape {list(readers[name].shape(name))} but {config_path} "
                f"implies {list(shape)}"
            )

    def get(name: str) -> Tensor:
        if name not in readers:
            raise ConversionError(f"{folder}: weight {name} not found in the safetensors files")
        return readers[name].get(name)

    def tensors() -> Iterator[tuple[str, Tensor]]:
        yield "embed.weight", get("model.embed_tokens.weight")
        yield "norm.weight", get("model.norm.weight")
        if not config.tie_embeddings:
            yield "lm_head.weight", get("lm_head.weight")
        for i in range(config.n_layer):
            p, b = f"model.layers.{i}.", f"blocks.{i}."
            yield b + "attn.qkv.weight", torch.cat(
                [get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight"),
                 get(p + "self_attn.v_proj.weight")]
            )
            yield b + "attn.proj.weight", get(p + "self_attn.o_proj.weight")
            yield b + "attn_norm.weight", get(p + "input_layernorm.weight")
            yield b + "ffn_norm.weight", get(p + "post_attention_layernorm.weight")
            legacy = p + "block_sparse_moe.gate.weight" in readers
            yield b + "ffn.router.weight", get(p + ("block_sparse_moe.gate.weight" if legacy else "mlp.gate.weight"))
            yield from _expert_tensors(get, readers, config, i)

    return TensorStream(config, tensors(), hf_tokenizer_payload(folder, config.vocab_size), str(folder.resolve()))


def _expert_tensors(get: Any, readers: dict, config: LMConfig, layer: int) -> Iterator[tuple[str, Tensor]]:
    """moekit's w_in [E, D, 2F] = [gate | up] and w_out [E, F, D] of one layer."""
    p, b = f"model.layers.{layer}.", f"blocks.{layer}.ffn.experts."
    if p + "mlp.experts.gate_up_proj" in readers:
        yield b + "w_in", get(p + "mlp.experts.gate_up_proj").transpose(1, 2).contiguous()
        yield b + "w_out", get(p + "mlp.experts.down_proj").transpose(1, 2).contiguous()
        return
    q = p + "block_sparse_moe.experts."
    experts = range(config.moe.num_experts)
    # NOTE: w1 is the gate, w3 the up projection: SwiGLU's [gate | up] order of w_in.
    gate_up = (torch.cat([get(f"{q}{e}.w1.weight"), get(f"{q}{e}.w3.weight")]).t() for e in experts)
    yield b + "w_in", torch.stack(list(gate_up))
    yield b + "w_out", torch.stack([get(f"{q}{e}.w2.weight").t() for e in experts])
