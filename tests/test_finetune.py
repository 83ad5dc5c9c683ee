"""Fine-tuning and sparse upcycling (moekit.training.finetune, moekit finetune / upcycle).

Verifies: each freeze mode trains exactly its parameter group and leaves the rest bit-for-bit
unchanged; fine-tuning lowers the validation loss and writes a run that ``moekit sample``
reads; early stopping keeps the best weights (a diverging run returns the source's weights);
expert dropout reaches the experts; a local Hugging Face folder fine-tunes directly; the
upcycled model's logits equal the dense model's at initialization; bad input names the field.

    pytest tests/test_finetune.py
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from moekit.cli.main import main
from moekit.config import MoEConfig
from moekit.interop.hf import load_run_or_hf_folder
from moekit.models.lm import LMConfig, MoETransformerLM
from moekit.training.checkpoint import load_model_from_run, save_checkpoint, write_json_atomic
from moekit.training.config import TrainConfig
from moekit.training.finetune import finetune, freeze, is_expert_param, is_router_param, upcycle_model


@pytest.fixture(autouse=True)
def _seed():
    """Inputs drawn in a test do not depend on which tests ran before it."""
    torch.manual_seed(0)


def tiny_config(arch: str = "moe", **moe) -> LMConfig:
    return LMConfig(
        vocab_size=256, seq_len=16, n_layer=2, n_head=2, d_model=16, arch=arch,
        moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, **moe),
    )


def make_run(path, config: LMConfig, seed: int = 0) -> MoETransformerLM:
    torch.manual_seed(seed)
    model = MoETransformerLM(config)
    path.mkdir(parents=True)
    payload = {"model": config.to_dict(), "train": asdict(TrainConfig()), "tokenizer": {"kind": "bytes"}}
    write_json_atomic(path / "config.json", payload)
    save_checkpoint(path, model, {})
    return model


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 80)
    return path


@pytest.mark.parametrize("mode", ["none", "router", "experts", "non-experts"])
def test_each_freeze_mode_trains_exactly_its_group(tmp_path, text_file, mode):
    source = make_run(tmp_path / "src", tiny_config(num_shared_experts=1))
    result = finetune(tmp_path / "src", text_file, tmp_path / "ft", mode, steps=6, eval_interval=3, batch_size=4,
                      lr=1e-2, progress=False)
    tuned, _ = load_model_from_run(tmp_path / "ft")
    before, after = dict(source.named_parameters()), dict(tuned.named_parameters())
    should_train = {
        "none": lambda n: True,
        "router": lambda n: not is_router_param(n),
        "experts": lambda n: not is_expert_param(n),
        "non-experts": is_expert_param,
    }[mode]
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    trained = {name for name in before if should_train(name)}
    assert changed == trained, (mode, sorted(changed ^ trained))
    assert result.trainable_params == sum(before[n].numel() for n in trained)
    assert result.trainable_params + result.frozen_params == sum(p.numel() for p in before.values())


@pytest.mark.slow
def test_finetune_lowers_validation_loss_and_the_run_samples(tmp_path, text_file, capsys):
    make_run(tmp_path / "src", tiny_config())
    result = finetune(tmp_path / "src", text_file, tmp_path / "ft", "none", steps=30, eval_interval=10, batch_size=8,
                      lr=1e-2, progress=False)
    assert result.val_loss_after < result.val_loss_before - 0.5
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["val_loss_after"] == result.val_loss_after
    assert main(["sample", str(tmp_path / "ft"), "--prompt", "the ", "--tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the ")


def test_early_stopping_keeps_the_best_weights(tmp_path, text_file):
    source = make_run(tmp_path / "src", tiny_config())
    # A learning rate this large makes every step worse: the run stops after `patience`
    # evaluations and keeps the source's weights (step 0 was the best).
    result = finetune(tmp_path / "src", text_file, tmp_path / "ft", steps=50, eval_interval=2, patience=2, lr=50.0,
                      batch_size=4, progress=False)
    assert result.stopped_early and result.steps == 4 and result.best_step == 0
    assert result.val_loss_after == result.val_loss_before
    tuned, _ = load_model_from_run(tmp_path / "ft")
    for (name, want), got in zip(source.state_dict().items(), tuned.state_dict().values(), strict=True):
        assert torch.equal(want, got), name


def test_expert_dropout_reaches_the_experts_and_is_saved(tmp_path, text_file):
    make_run(tmp_path / "src", tiny_config())
    finetune(tmp_path / "src", text_file, tmp_path / "ft", expert_dropout=0.3, steps=2, eval_interval=1,
             batch_size=2, progress=False)
    tuned, payload = load_model_from_run(tmp_path / "ft")
    assert payload["model"]["moe"]["expert_dropout"] == 0.3
    assert all(block.ffn.experts.dropout.p == 0.3 for block in tuned.blocks)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"freeze_mode": "all"}, "freeze"), ({"expert_dropout": 1.5}, "expert_dropout"), ({"patience": 0}, "patience")],
)
def test_bad_finetune_arguments_name_the_field(tmp_path, text_file, kwargs, message):
    make_run(tmp_path / "src", tiny_config())
    with pytest.raises(ValueError, match=message):
        finetune(tmp_path / "src", text_file, tmp_path / "ft", progress=False, **kwargs)


@pytest.mark.parametrize("mode,message", [("non-experts", "no trainable parameters"), ("experts", "freezes nothing"),
                                          ("router", "freezes nothing")])
def test_freeze_modes_that_do_nothing_on_a_dense_model_are_rejected(mode, message):
    model = MoETransformerLM(tiny_config(arch="dense"))
    with pytest.raises(ValueError, match=message):
        freeze(model, mode)


@pytest.mark.slow
def test_finetune_from_a_hugging_face_folder(tmp_path, text_file):
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=256, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=4096,
    )
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "hf")
    result = finetune(tmp_path / "hf", text_file, tmp_path / "ft", "router", steps=4, eval_interval=2, seq_len=16,
                      batch_size=4, progress=False, loader=load_run_or_hf_folder)
    assert result.val_loss_after <= result.val_loss_before
    _, payload = load_model_from_run(tmp_path / "ft")
    assert payload["model"]["seq_len"] == 16 and payload["model"]["n_kv_head"] == 1


@pytest.mark.parametrize("moe_every", [1, 2])
def test_upcycled_model_equals_the_dense_model_at_init(moe_every):
    torch.manual_seed(0)
    dense = MoETransformerLM(tiny_config(arch="dense")).eval()
    upcycled = upcycle_model(dense, num_experts=8, top_k=2, moe_every=moe_every, router_std=0.5).eval()
    assert upcycled.config.arch == "moe" and upcycled.config.moe.num_experts == 8
    idx = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        want, _ = dense(idx)
        got, _ = upcycled(idx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The routers are not trivial (std 0.5): tokens do spread over different experts.
    with torch.no_grad():
        logits = upcycled.blocks[-1].ffn.router.weight @ torch.randn(16, 50)
    assert len(set(logits.argmax(0).tolist())) > 1


def test_upcycle_command_writes_a_run_that_matches_the_dense_run(tmp_path):
    dense = make_run(tmp_path / "dense", tiny_config(arch="dense")).eval()
    assert main(["upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "up"), "--experts", "4"]) == 0
    model, payload = load_model_from_run(tmp_path / "up")
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx)[0], dense(idx)[0], atol=1e-5, rtol=1e-5)
    assert payload["model"]["arch"] == "moe"
    assert main(["upcycle", str(tmp_path / "up"), "--out", str(tmp_path / "up2")]) == 2  # not dense


@pytest.mark.slow
def test_finetune_cli_json(tmp_path, text_file, capsys):
    make_run(tmp_path / "src", tiny_config())
    args = ["finetune", "--from", str(tmp_path / "src"), "--data", str(text_file), "--out", str(tmp_path / "ft"),
            "--freeze", "experts", "--steps", "2", "--eval-interval", "1", "--batch-size", "2", "--no-progress",
            "--json"]
    assert main(args) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["freeze"] == "experts" and {"val_loss_before", "val_loss_after"} <= set(payload)
    assert main(args) == 2  # the run directory exists: nothing is overwritten
