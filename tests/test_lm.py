"""The MoE language model: shapes, the dense baseline's matched FLOPs, KV-cache sampling,
and training end to end on a tiny model (loss falls, exact resume, atomic checkpoints,
bad data and bad checkpoints rejected with the file named).

    pytest tests/test_lm.py
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import moekit
from moekit.config import MoEConfig
from moekit.experts import DenseFFN
from moekit.models.lm import KVCache, LMConfig, MoETransformerLM
from moekit.training.checkpoint import CheckpointError, load_model_from_run, save_checkpoint
from moekit.training.config import TrainConfig
from moekit.training.data import ByteTokenizer, DataError, TextDataset
from moekit.training.trainer import train


def tiny_config(**overrides) -> LMConfig:
    moe_values = dict(d_model=32, d_ff=32, num_experts=4, top_k=2)
    moe_values.update(overrides.pop("moe", {}))
    values = dict(seq_len=32, n_layer=2, n_head=2, d_model=32, moe=MoEConfig(**moe_values))
    values.update(overrides)
    return LMConfig(**values)


def tiny_train_config(**overrides) -> TrainConfig:
    values = dict(
        steps=12, batch_size=4, eval_interval=6, eval_batches=2, log_interval=1, checkpoint_interval=6, max_minutes=None
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 80)
    return path


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = MoETransformerLM(tiny_config())
    idx = torch.randint(0, 256, (3, 10))
    logits, loss = model(idx, torch.randint(0, 256, (3, 10)))
    assert logits.shape == (3, 10, 256)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5  # near uniform at init
    assert len(moekit.layer.moe_layers(model)) == 2


def test_moe_every_two_alternates_dense_and_moe():
    model = MoETransformerLM(tiny_config(n_layer=4, moe_every=2))
    kinds = [type(block.ffn).__name__ for block in model.blocks]
    assert kinds == ["DenseFFN", "MoE", "DenseFFN", "MoE"]


def test_dense_baseline_matches_active_flops():
    config = tiny_config(moe={"num_experts": 8, "top_k": 2, "d_ff": 48})
    dense = MoETransformerLM(config.as_dense())
    assert not moekit.layer.moe_layers(dense)
    ffn = dense.blocks[0].ffn
    assert isinstance(ffn, DenseFFN)
    # Active FFN FLOPs per token of the MoE: k·3·D·F (SwiGLU) + router D·E; dense: 3·D·F'.
    moe_flops = 2 * 3 * 32 * 48 + 32 * 8
    dense_flops = 3 * 32 * ffn.w_out.shape[0]
    assert abs(dense_flops - moe_flops) <= 3 * 32  # within one hidden unit
    moe_model = MoETransformerLM(config)
    counts = moekit.models.cost.count_parameters(moe_model)
    dense_counts = moekit.models.cost.count_parameters(dense)
    assert abs(counts.active - dense_counts.total) / dense_counts.total < 0.02


def test_tied_embeddings_share_storage():
    model = MoETransformerLM(tiny_config())
    assert model.lm_head.weight is model.embed.weight
    untied = MoETransformerLM(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embed.weight


@pytest.mark.slow
def test_kv_cache_gives_same_logits_and_tokens():
    torch.manual_seed(1)
    model = MoETransformerLM(tiny_config()).eval()
    idx = torch.randint(0, 256, (2, 7))
    full, _ = model(idx)
    cache = KVCache(2)
    first, _ = model(idx[:, :4], cache=cache)
    rest = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(4, 7)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)
    cached = model.generate(idx[:, :3], 12, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(3))
    uncached = model.generate(
        idx[:, :3], 12, temperature=0.8, top_k=20, use_cache=False, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(cached, uncached)


@pytest.mark.slow
def test_training_reduces_loss_and_writes_the_run(tmp_path, corpus):
    result = train(
        tiny_config(),
        tiny_train_config(steps=40, lr=3e-3, data=str(corpus)),
        tmp_path / "run",
        progress=False,
    )
    run = tmp_path / "run"
    for name in ("config.json", "metrics.csv", "loss.png", "expert_load.png", "dropped_tokens.png"):
        assert (run / name).exists(), name
    assert (run / "checkpoint" / "model.safetensors").exists()
    rows = (run / "metrics.csv").read_text().splitlines()
    first_loss = float(rows[1].split(",")[1])
    assert result.train_loss < first_loss - 1.0
    assert result.total_params > result.active_params > 0
    model, payload = load_model_from_run(run)
    assert payload["model"]["moe"]["num_experts"] == 4
    assert isinstance(model, MoETransformerLM)


def _losses(run_dir):
    """Train loss at every step, validation loss at the regular evaluations (steps 6, 12)."""
    state = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=False)
    train_losses = [(row["step"], row["train_loss"]) for row in state["history"]]
    val_losses = [(row["step"], row["val_loss"]) for row in state["history"] if row["step"] % 6 == 0]
    return train_losses, val_losses


@pytest.mark.slow
@pytest.mark.parametrize("router", ["topk", "aux_free", "gshard"])
def test_resume_gives_the_same_losses_as_an_unbroken_run(tmp_path, corpus, router):
    moe = {"router": router, "capacity_factor": 1.25} if router != "aux_free" else {"router": router}
    config = tiny_config(moe=moe, dropout=0.1)
    unbroken = tmp_path / "unbroken"
    train(config, tiny_train_config(data=str(corpus)), unbroken, progress=False)
    broken = tmp_path / "broken"
    train(config, tiny_train_config(data=str(corpus), steps=5), broken, progress=False)
    train(config, tiny_train_config(data=str(corpus), steps=12), broken, resume=True, progress=False)
    assert _losses(broken) == _losses(unbroken)
    a = MoETransformerLM(config)
    b = MoETransformerLM(config)
    from safetensors.torch import load_model

    load_model(a, str(unbroken / "checkpoint" / "model.safetensors"))
    load_model(b, str(broken / "checkpoint" / "model.safetensors"))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


@pytest.mark.slow
def test_interrupt_saves_a_checkpoint_that_resumes(tmp_path, corpus):
    def interrupt(step, row):
        if step == 4:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    result = train(tiny_config(), tiny_train_config(data=str(corpus)), run, progress=False, on_step=interrupt)
    assert result.interrupted and result.steps == 4
    resumed = train(tiny_config(), tiny_train_config(data=str(corpus)), run, resume=True, progress=False)
    assert resumed.steps == 12


def test_checkpoint_write_is_atomic(tmp_path, corpus, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(), tiny_train_config(data=str(corpus), steps=3), run, progress=False)
    before = (run / "checkpoint" / "model.safetensors").read_bytes()
    model, _ = load_model_from_run(run)

    import moekit.training.trainer as train_module

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(train_module.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(run, model, {"step": 99})
    monkeypatch.undo()
    # The old checkpoint is untouched and still loads; no temporary directory is mistaken for it.
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == before
    load_model_from_run(run)


def test_existing_run_is_not_overwritten(tmp_path, corpus):
    run = tmp_path / "run"
    train(tiny_config(), tiny_train_config(data=str(corpus), steps=2), run, progress=False)
    config_before = (run / "config.json").read_text()
    with pytest.raises(CheckpointError, match="already holds a run"):
        train(tiny_config(), tiny_train_config(data=str(corpus), steps=2), run, progress=False)
    assert (run / "config.json").read_text() == config_before


@pytest.mark.slow
def test_corrupt_and_mismatched_checkpoints_name_the_file(tmp_path, corpus):
    run = tmp_path / "run"
    train(tiny_config(), tiny_train_config(data=str(corpus), steps=2), run, progress=False)
    weights = run / "checkpoint" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model_from_run(run)
    weights.write_bytes(good)
    state = run / "checkpoint" / "state.pt"
    state.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="state.pt"):
        train(tiny_config(), tiny_train_config(data=str(corpus), steps=4), run, resume=True, progress=False)
    # A config that no longer matches the weights.
    payload = json.loads((run / "config.json").read_text())
    payload["model"]["moe"]["num_experts"] = 8
    (run / "config.json").write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model_from_run(run)
    shutil.rmtree(run / "checkpoint")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_model_from_run(run)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"\x00\x01\x02binary\x00" * 100, "binary"),
        (b"\xff\xfe caf\xe9" * 200, "not UTF-8"),
        (b"too short", "too short"),
    ],
)
def test_bad_data_files_are_rejected_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=reason) as error:
        TextDataset.load(path, 32, ByteTokenizer())
    assert str(path) in str(error.value)


def test_default_corpus_ships_with_the_package():
    dataset = TextDataset.load(None, 64, ByteTokenizer())
    assert dataset.train_tokens.numel() > 900_000
    assert dataset.val_tokens.numel() > 100_000


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch():
    # Two micro-batches of 2 accumulate to the same gradient as one batch of 4 (dense model:
    # the MoE balance loss is per micro-batch by design, so it would differ).
    torch.manual_seed(3)
    model = MoETransformerLM(tiny_config(arch="dense"))
    idx = torch.randint(0, 256, (4, 16))
    targets = torch.randint(0, 256, (4, 16))
    _, loss = model(idx, targets)
    loss.backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for half in (slice(0, 2), slice(2, 4)):
        _, loss = model(idx[half], targets[half])
        (loss / 2).backward()
    for got, want in zip((p.grad for p in model.parameters()), whole, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_grad_accum_and_bf16_train(tmp_path, corpus):
    result = train(
        tiny_config(),
        tiny_train_config(data=str(corpus), steps=4, grad_accum=2, bf16=True),
        tmp_path / "r",
        progress=False,
    )
    assert result.steps == 4 and math.isfinite(result.val_loss)


@pytest.mark.slow
def test_bpe_tokenizer_trains_and_round_trips(tmp_path):
    pytest.importorskip("tokenizers")
    from moekit.training.data import default_corpus_path

    corpus = tmp_path / "shakespeare.txt"
    corpus.write_text(default_corpus_path().read_text()[:60000])
    result = train(
        tiny_config(), tiny_train_config(data=str(corpus), steps=3, tokenizer="bpe", bpe_vocab_size=300),
        tmp_path / "bpe", progress=False,
    )
    model, payload = load_model_from_run(tmp_path / "bpe")
    assert payload["tokenizer"]["kind"] == "bpe"
    assert model.config.vocab_size <= 300 and result.bits_per_byte > 0
    from moekit.training.data import tokenizer_from_dict

    tokenizer = tokenizer_from_dict(payload["tokenizer"])
    assert tokenizer.decode(tokenizer.encode("To be, or not")) == "To be, or not"


@pytest.mark.slow
def test_generation_beyond_the_context_matches_with_and_without_cache():
    torch.manual_seed(4)
    model = MoETransformerLM(tiny_config()).eval()  # seq_len 32
    idx = torch.randint(0, 256, (2, 5))
    kwargs = dict(temperature=1.0, top_k=50)
    cached = model.generate(idx, 80, generator=torch.Generator().manual_seed(5), **kwargs)
    uncached = model.generate(idx, 80, use_cache=False, generator=torch.Generator().manual_seed(5), **kwargs)
    assert cached.shape == (2, 85) and torch.equal(cached, uncached)
