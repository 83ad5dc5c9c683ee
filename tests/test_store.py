"""The expert store (moekit.inference.store) and ``moekit pack``'s readers (moekit.interop.stream).

Verified: every (layer, expert) blob is 4 KiB aligned and holds exactly that expert's tensors,
byte range by byte range, with a matching CRC-32; the resident file is a safetensors file
holding everything else; tied weights, expert biases and bf16 round-trip; a truncated or
corrupted file is an error naming it; a missing or misshapen tensor is refused and leaves
nothing behind; packing a run, an expert-parallel run, and transformers Mixtral folders (both
key layouts) gives the same weights as loading them; and the writer streams: packing a model
whose size dominates the process raises its peak RSS by a small multiple of the largest
tensor, not by the model's size.

    PYTHONPATH=src pytest tests/test_store.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from moekit.config import MoEConfig
from moekit.inference.offload import plain_lm_from_store
from moekit.inference.store import BLOB_ALIGNMENT, ExpertStore, StoreError, is_store, write_store
from moekit.models.lm import LMConfig, MoETransformerLM

ROOT = Path(__file__).resolve().parents[1]


def lm_config(changes: dict, moe: dict, **values) -> LMConfig:
    """The LMConfig of ``values`` and MoE fields ``moe``, overridden by ``changes`` (its "moe"
    entry overrides MoE fields); the tiny models of the store, offload and quantized-store tests."""
    changes = dict(changes)
    moe = {**moe, **changes.pop("moe", {})}
    return LMConfig(moe=MoEConfig(**moe), **{**values, **changes})


def tiny_config(**changes) -> LMConfig:
    return lm_config(changes, dict(d_model=32, d_ff=24, num_experts=4, top_k=2),
                     vocab_size=64, seq_len=32, n_layer=2, n_head=2, d_model=32)


def tiny_model(seed: int = 0, **changes) -> MoETransformerLM:
    torch.manual_seed(seed)
    model = MoETransformerLM(tiny_config(**changes)).eval()
    for name, param in model.named_parameters():
        if name.endswith(("b_in", "b_out")):  # zeros by default: give the biases values to check
            torch.nn.init.normal_(param)
    return model


def pack(model: MoETransformerLM, out: Path) -> Path:
    return write_store(out, model.config, model.state_dict().items())


def expert_bytes(model: MoETransformerLM, layer: int, expert: int, param: str) -> bytes:
    tensor = getattr(model.blocks[layer].ffn.experts, param)[expert].detach().contiguous()
    return tensor.view(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("tie", [True, False])
def test_every_blob_holds_its_experts_tensors_byte_for_byte(tmp_path, tie):
    model = tiny_model(tie_embeddings=tie)
    store = pack(model, tmp_path / "store")
    index = json.loads((store / "index.json").read_text())
    assert index["format"] == "moekit-expert-store" and index["format_version"] == 1
    assert LMConfig.from_dict(index["model"]) == model.config
    assert len(index["blobs"]) == 2 * 4
    for blob in index["blobs"]:
        assert blob["offset"] % BLOB_ALIGNMENT == 0 and blob["padded_length"] % BLOB_ALIGNMENT == 0
        assert blob["length"] <= blob["padded_length"]
        data = (store / blob["file"]).read_bytes()
        region = data[blob["offset"] : blob["offset"] + blob["length"]]
        assert zlib.crc32(region) == blob["crc32"]
        names = [tensor["name"] for tensor in blob["tensors"]]
        assert names == ["w_in", "w_out"]
        for tensor in blob["tensors"]:
            assert tensor["offset"] % 64 == 0
            stored = region[tensor["offset"] : tensor["offset"] + tensor["nbytes"]]
            assert stored == expert_bytes(model, blob["layer"], blob["expert"], tensor["name"])
    # Blobs of one file are disjoint and the file is exactly their padded lengths.
    for entry in index["expert_files"]:
        blobs = sorted((b["offset"], b["padded_length"]) for b in index["blobs"] if b["file"] == entry["file"])
        assert all(a[0] + a[1] <= b[0] for a, b in zip(blobs, blobs[1:], strict=False))
        assert (store / entry["file"]).stat().st_size == entry["bytes"] == sum(length for _, length in blobs)
    # The resident file is ordinary safetensors: everything but the routed experts.
    from safetensors.torch import load_file

    resident = load_file(str(store / "resident.safetensors"))
    state = model.state_dict()
    expected = {name for name in state if ".experts." not in name and not (tie and name == "lm_head.weight")}
    assert set(resident) == expected
    for name in expected:
        assert torch.equal(resident[name], state[name])


def test_store_reads_back_experts_and_resident_weights(tmp_path):
    model = tiny_model()
    with ExpertStore(pack(model, tmp_path / "store")) as store:
        assert is_store(store.path) and not is_store(tmp_path)
        for layer in (0, 1):
            for expert in range(4):
                tensors, nbytes = store.expert_tensors(layer, expert)
                assert nbytes % BLOB_ALIGNMENT == 0
                experts = model.blocks[layer].ffn.experts
                assert torch.equal(tensors["w_in"], experts.w_in[expert])
                assert torch.equal(tensors["w_out"], experts.w_out[expert])
                assert tensors["w_in"].data_ptr() % 64 == 0
        resident = dict(store.resident_tensors())
        assert torch.equal(resident["blocks.1.attn.qkv.weight"], model.blocks[1].attn.qkv.weight)


def test_bf16_and_expert_biases_round_trip(tmp_path):
    model = tiny_model(moe={"expert_biases": True}).to(torch.bfloat16)
    plain = plain_lm_from_store(pack(model, tmp_path / "store"))
    for name, value in model.state_dict().items():
        assert plain.state_dict()[name].dtype == torch.bfloat16
        assert torch.equal(plain.state_dict()[name], value), name
    idx = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert torch.equal(plain(idx)[0], model(idx)[0])


def test_truncated_expert_file_is_an_error_naming_it(tmp_path):
    store = pack(tiny_model(), tmp_path / "store")
    path = store / "experts-001.bin"
    os.truncate(path, path.stat().st_size - BLOB_ALIGNMENT)
    with pytest.raises(StoreError, match=r"experts-001\.bin.*truncated"):
        ExpertStore(store)


def test_truncated_resident_file_is_an_error_naming_it(tmp_path):
    store = pack(tiny_model(), tmp_path / "store")
    path = store / "resident.safetensors"
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(StoreError, match=r"resident\.safetensors.*truncated"):
        ExpertStore(store)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_corrupted_blob_is_an_error_naming_the_file_layer_and_expert(tmp_path):
    store_dir = pack(tiny_model(), tmp_path / "store")
    blob = ExpertStore(store_dir).blob(1, 2)
    flip_byte(store_dir / blob.file, blob.offset + 100)
    store = ExpertStore(store_dir)  # opening reads no blob
    store.expert_tensors(1, 1)  # a neighbour is intact
    with pytest.raises(StoreError, match=r"experts-001\.bin: CRC-32 mismatch in the blob of layer 1 expert 2"):
        store.expert_tensors(1, 2)
    with pytest.raises(StoreError, match=r"experts-001\.bin"):
        store.verify_all()
    # verify=False skips the check (and reads the corrupt bytes as they are).
    ExpertStore(store_dir, verify=False).expert_tensors(1, 2)


def test_corrupted_resident_file_is_an_error_naming_it(tmp_path):
    store = pack(tiny_model(), tmp_path / "store")
    path = store / "resident.safetensors"
    flip_byte(path, path.stat().st_size - 7)
    with pytest.raises(StoreError, match=r"resident\.safetensors: CRC-32 mismatch"):
        ExpertStore(store)


def test_corrupted_index_is_an_error_naming_it(tmp_path):
    store = pack(tiny_model(), tmp_path / "store")
    (store / "index.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"index\.json: unreadable index"):
        ExpertStore(store)


def test_missing_or_misshapen_tensor_is_refused_and_nothing_is_left(tmp_path):
    model = tiny_model()
    state = dict(model.state_dict())
    del state["blocks.1.ffn.experts.w_out"]
    with pytest.raises(StoreError, match=r"missing.*blocks\.1\.ffn\.experts\.w_out"):
        write_store(tmp_path / "a", model.config, state.items())
    state = dict(model.state_dict())
    state["blocks.0.ffn.experts.w_in"] = state["blocks.0.ffn.experts.w_in"][:, :, :-1]
    with pytest.raises(StoreError, match=r"blocks\.0\.ffn\.experts\.w_in has shape \[4, 32, 47\]"):
        write_store(tmp_path / "b", model.config, state.items())
    assert sorted(os.listdir(tmp_path)) == []  # no partial store, no temporary directory
    state = dict(model.state_dict())
    state["lm_head.weight"] = torch.zeros_like(state["lm_head.weight"])  # the config ties it to embed.weight
    with pytest.raises(StoreError, match="lm_head.weight given twice.*ties them"):
        write_store(tmp_path / "c", model.config, state.items())


def test_an_unknown_experts_dtype_is_a_clear_error(tmp_path):
    # int8 and int4 are wired (tests/test_quant_store.py); anything else is refused by name.
    model = tiny_model()
    with pytest.raises(StoreError, match="fp8.*invalid"):
        write_store(tmp_path / "s", model.config, model.state_dict().items(), experts_dtype="fp8")


# --------------------------------------------------------------------------------------------
# moekit pack's sources
# --------------------------------------------------------------------------------------------


def write_run(path: Path, model: MoETransformerLM) -> Path:
    from moekit.training.checkpoint import save_checkpoint, write_json_atomic
    from moekit.training.config import TrainConfig

    path.mkdir(parents=True)
    write_json_atomic(path / "config.json", {"model": model.config.to_dict(), "train": asdict(TrainConfig()),
                                             "tokenizer": {"kind": "bytes"}})
    save_checkpoint(path, model, {})
    return path


def assert_same_weights(store: Path, model: MoETransformerLM) -> None:
    plain = plain_lm_from_store(store)
    state = plain.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(state[name], value), name


def test_pack_a_run_directory(tmp_path):
    from moekit.cli.main import main

    model = tiny_model(vocab_size=256)
    run = write_run(tmp_path / "run", model)
    assert main(["pack", str(run), "--out", str(tmp_path / "store")]) == 0
    assert_same_weights(tmp_path / "store", model)
    assert ExpertStore(tmp_path / "store").tokenizer() == {"kind": "bytes"}


def test_pack_an_expert_parallel_checkpoint(tmp_path):
    """Expert shards of 2 ranks (experts-0000r-of-00002.safetensors) are concatenated per tensor."""
    from safetensors.torch import save_file

    from moekit.distributed import checkpoint as distributed_checkpoint
    from moekit.interop.stream import run_tensor_stream

    model = tiny_model(vocab_size=256)
    run = write_run(tmp_path / "run", model)
    checkpoint = run / "checkpoint"
    state = {name: value.contiguous() for name, value in model.state_dict().items() if name != "lm_head.weight"}
    experts = {name: value for name, value in state.items() if ".experts." in name}
    replicated = {name: value for name, value in state.items() if name not in experts}
    save_file(replicated, str(checkpoint / "model.safetensors"))
    for rank in range(2):
        save_file({name: value[rank * 2 : rank * 2 + 2].contiguous() for name, value in experts.items()},
                  str(checkpoint / distributed_checkpoint.expert_file(rank, 2)))
    layout = {"num_ranks": 2, "experts": {name: 4 for name in experts}}
    (checkpoint / distributed_checkpoint.SHARDS_FILE).write_text(json.dumps(layout))
    stream = run_tensor_stream(run)
    write_store(tmp_path / "store", stream.config, stream.tensors)
    assert_same_weights(tmp_path / "store", model)


def tiny_mixtral_folder(path: Path, legacy: bool = False) -> Path:
    from safetensors.torch import save_file
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=256, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    hf = MixtralForCausalLM(config)
    hf.save_pretrained(path)
    if legacy:  # the original Mixtral release's per-expert w1/w2/w3 keys
        state = {}
        for name, value in hf.state_dict().items():
            if name.endswith("mlp.experts.gate_up_proj"):
                prefix = name.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts.")
                gate, up = value.chunk(2, dim=1)
                for e in range(4):
                    state[f"{prefix}{e}.w1.weight"] = gate[e].contiguous()
                    state[f"{prefix}{e}.w3.weight"] = up[e].contiguous()
            elif name.endswith("mlp.experts.down_proj"):
                prefix = name.replace("mlp.experts.down_proj", "block_sparse_moe.experts.")
                for e in range(4):
                    state[f"{prefix}{e}.w2.weight"] = value[e].contiguous()
            else:
                state[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = value.contiguous()
        for file in path.glob("*.safetensors"):
            file.unlink()
        save_file(state, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("legacy", [False, True])
def test_pack_a_transformers_mixtral_folder(tmp_path, capsys, legacy):
    from moekit.cli.main import main
    from moekit.interop.hf import load_hf_checkpoint

    folder = tiny_mixtral_folder(tmp_path / "hf", legacy)
    assert main(["pack", str(folder), "--out", str(tmp_path / "store"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["expert_blobs"] == 8 and report["minimum_budget_bytes"] > report["non_expert_bytes"]
    reference, _ = load_hf_checkpoint(folder)
    assert_same_weights(tmp_path / "store", reference)


def test_pack_of_a_folder_with_a_misshapen_tensor_names_the_file(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from moekit.cli.main import main

    folder = tiny_mixtral_folder(tmp_path / "hf")
    (file,) = folder.glob("*.safetensors")
    state = load_file(str(file))
    state["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(32, 31)
    save_file(state, str(file))
    assert main(["pack", str(folder), "--out", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert str(file) in err and "model.layers.1.self_attn.o_proj.weight" in err and "[32, 31]" in err
    assert not (tmp_path / "store").exists()


# --------------------------------------------------------------------------------------------
# Streaming: peak memory
# --------------------------------------------------------------------------------------------

# Packs a tiny run first, so that every lazy import and library load is in the baseline; then
# the large run, sampling the process's anonymous resident memory (RssAnon: the tensors and
# buffers, not the shared libraries' code pages, which the kernel may drop and fault back in
# under memory pressure) every millisecond from a second thread.
PEAK_SCRIPT = """
import json, sys, threading, time
from moekit.cli.main import main

def anonymous_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

warm_up = main(["pack", sys.argv[1], "--out", sys.argv[3] + "-tiny"])
baseline = anonymous_rss()
peak = [baseline]
done = threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous_rss())
        time.sleep(0.001)

sampler = threading.Thread(target=sample)
sampler.start()
code = main(["pack", sys.argv[2], "--out", sys.argv[3], *sys.argv[4:]])
done.set()
sampler.join()
print(json.dumps({"code": code, "warm_up": warm_up, "baseline": baseline, "peak": peak[0]}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc/self/status (RssAnon)")
@pytest.mark.parametrize("experts_dtype", ["same", "int4"])
def test_pack_streams_with_peak_memory_a_small_multiple_of_the_largest_tensor(tmp_path, experts_dtype):
    """A 200 MB model packed by a fresh process: its peak anonymous RSS rises by a few largest
    tensors (16 MiB), not by the model; also when the experts are quantized as they stream."""
    from moekit.inference.store import _SafetensorsStreamWriter, meta_lm, model_layout
    from moekit.training.checkpoint import write_json_atomic
    from moekit.training.config import TrainConfig

    config = LMConfig(vocab_size=256, seq_len=32, n_layer=8, n_head=4, d_model=256,
                      moe=MoEConfig(d_model=256, d_ff=1024, num_experts=8, top_k=2))
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    write_json_atomic(run / "config.json", {"model": config.to_dict(), "train": asdict(TrainConfig()),
                                            "tokenizer": {"kind": "bytes"}})
    # The source checkpoint is itself written one tensor at a time (this process never holds the model).
    shapes = {name: tuple(t.shape) for name, t in meta_lm(config).state_dict().items()}
    shapes.pop("lm_head.weight")  # tied
    writer = _SafetensorsStreamWriter(run / "checkpoint" / "model.safetensors", shapes)
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.write(name, torch.randn(shape, generator=generator))
    model_bytes = writer.finish()
    largest = max(torch.Size(shape).numel() * 4 for shape in shapes.values())
    assert model_bytes > 190e6 and largest == 16 << 20
    assert model_layout(config).expert_layers  # sanity: experts dominate
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    tiny_run = write_run(tmp_path / "tiny", tiny_model(vocab_size=256))
    command = [sys.executable, "-c", PEAK_SCRIPT, str(tiny_run), str(run), str(tmp_path / "store"),
               "--experts-dtype", experts_dtype]
    result = subprocess.run(command,
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["code"] == 0 and figures["warm_up"] == 0
    rise = figures["peak"] - figures["baseline"]
    message = f"peak anonymous RSS rose by {rise / 2**20:.0f} MiB packing a {model_bytes / 2**20:.0f} MiB model"
    assert rise < 4 * largest, message
    assert rise < model_bytes / 4
