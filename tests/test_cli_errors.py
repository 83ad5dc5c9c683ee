"""Bad input to every ``moekit`` subcommand: exit status 2, one line ``moekit CMD: error: ...``
on stderr naming the flag (or file) at fault, no traceback, nothing on stdout, nothing written.

Also: ``moekit export`` never writes into a run directory or a non-empty folder (without
--force) or a file; ``moekit import`` / ``finetune --from`` reject damaged transformers
folders (truncated shard, missing expert tensor, config.json disagreeing with the weights)
naming the file and the tensor.

    pytest tests/test_cli_errors.py
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from moekit.cli.main import main
from moekit.config import MoEConfig
from moekit.models.lm import LMConfig, MoETransformerLM

TINY_MOE = LMConfig(vocab_size=256, seq_len=16, n_layer=1, n_head=2, d_model=16,
                    moe=MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2))
TINY_DENSE = LMConfig(vocab_size=256, seq_len=16, n_layer=1, n_head=2, d_model=16, arch="dense",
                      moe=MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2))


def write_run(path, config: LMConfig, train: dict | None = None) -> None:
    from moekit.training.checkpoint import save_checkpoint, write_json_atomic
    from moekit.training.config import TrainConfig

    torch.manual_seed(0)
    path.mkdir(parents=True)
    train_values = asdict(TrainConfig(**(train or {})))
    write_json_atomic(path / "config.json", {"model": config.to_dict(), "train": train_values,
                                             "tokenizer": {"kind": "bytes"}})
    save_checkpoint(path, MoETransformerLM(config), {})


def tiny_mixtral_folder(path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=256, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=16,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    MixtralForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Runs, folders and files the table's commands point at; each placeholder is a path."""
    root = tmp_path_factory.mktemp("cli_errors")
    corpus = root / "corpus.txt"
    corpus.write_text("Now is the winter of our discontent made glorious summer.\n" * 40)
    write_run(root / "run", TINY_MOE, {"data": str(corpus), "steps": 10, "lr": 4e-3, "seed": 1, "batch_size": 4})
    write_run(root / "dense", TINY_DENSE)
    (root / "full").mkdir()
    (root / "full" / "notes.txt").write_text("keep me")
    (root / "afile").write_text("not a directory")
    no_train = root / "no_train"
    no_train.mkdir()
    (no_train / "config.json").write_text(json.dumps({"model": TINY_MOE.to_dict()}))
    negative = root / "negative"
    negative.mkdir()
    (negative / "config.json").write_text(json.dumps({"model": {**TINY_MOE.to_dict(), "n_layer": -2},
                                                      "train": {}}))
    no_model = root / "no_model"
    no_model.mkdir()
    (no_model / "config.json").write_text(json.dumps({"train": {}}))
    bad_train = root / "bad_train"
    bad_train.mkdir()
    (bad_train / "config.json").write_text(json.dumps({"model": TINY_MOE.to_dict(), "train": {"lr": -1.0}}))
    broken_json = root / "broken.json"
    broken_json.write_text("{not json")
    synthetic_done = root / "synthetic_done"
    synthetic_done.mkdir()
    (synthetic_done / "results.md").write_text("earlier results")
    return {
        "corpus": corpus, "run": root / "run", "dense": root / "dense", "full": root / "full",
        "afile": root / "afile", "missing": root / "missing", "new": root / "new", "no_train": no_train,
        "negative": negative, "no_model": no_model, "bad_train": bad_train, "broken_json": broken_json,
        "synthetic_done": synthetic_done,
    }


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expand(args: list[str], files: dict) -> list[str]:
    return [arg.format(**{key: str(path) for key, path in files.items()}) for arg in args]


T = ["train", "--no-progress", "--out", "{new}"]  # a new run: fails before any training
SYN = ["multitask", "synthetic", "--no-progress", "--out", "{new}"]
CEN = ["multitask", "census", "--no-progress", "--out", "{new}", "--train", "{corpus}", "--test", "{corpus}"]
FT = ["finetune", "--from", "{run}", "--data", "{corpus}", "--out", "{new}", "--no-progress"]
UP = ["upcycle", "{dense}", "--out", "{new}"]

CASES = [
    # moekit train: a value no config field can take, named by its flag.
    (T + ["--lr", "nan"], "--lr nan"),
    (T + ["--lr", "inf"], "--lr inf"),
    (T + ["--lr", "-1"], "--lr -1"),
    (T + ["--lr", "0"], "--lr 0"),
    (T + ["--lr", "fast"], "--lr"),
    (T + ["--max-minutes", "0"], "--max-minutes 0"),
    (T + ["--max-minutes", "-5"], "--max-minutes -5"),
    (T + ["--max-minutes", "nan"], "--max-minutes nan"),
    (T + ["--max-minutes", "inf"], "--max-minutes inf"),
    (T + ["--grad-clip", "-1"], "--grad-clip -1"),
    (T + ["--grad-clip", "nan"], "--grad-clip nan"),
    (T + ["--weight-decay", "-0.1"], "--weight-decay -0.1"),
    (T + ["--weight-decay", "inf"], "--weight-decay inf"),
    (T + ["--batch-size", "0"], "--batch-size 0"),
    (T + ["--batch-size", "-4"], "--batch-size -4"),
    (T + ["--batch-size", "1.5"], "--batch-size"),
    (T + ["--steps", "0"], "--steps 0"),
    (T + ["--grad-accum", "0"], "--grad-accum 0"),
    (T + ["--warmup-steps", "-1"], "--warmup-steps -1"),
    (T + ["--eval-interval", "0"], "--eval-interval 0"),
    (T + ["--checkpoint-interval", "0"], "--checkpoint-interval 0"),
    (T + ["--min-lr-ratio", "2"], "--min-lr-ratio 2"),
    (T + ["--beta2", "1"], "--beta2 1"),
    (T + ["--seed", "-1"], "--seed -1"),
    (T + ["--bpe-vocab-size", "100"], "--bpe-vocab-size 100"),
    (T + ["--device", "gpu"], "--device gpu"),
    (T + ["--tokenizer", "words"], "--tokenizer"),
    (T + ["--vocab-size", "512"], "--vocab-size 512"),
    (T + ["--vocab-size", "512", "--tokenizer", "bpe"], "--vocab-size 512"),
    (T + ["--experts", "0"], "--experts 0"),
    (T + ["--top-k", "0"], "--top-k 0"),
    (T + ["--top-k", "17"], "--top-k 17"),
    (T + ["--experts", "1"], "--top-k 2 (the default)"),
    (T + ["--d-ff", "-8"], "--d-ff -8"),
    (T + ["--capacity-factor", "0"], "--capacity-factor 0"),
    (T + ["--capacity-factor", "nan"], "--capacity-factor nan"),
    (T + ["--eval-capacity-factor", "-1"], "--eval-capacity-factor -1"),
    (T + ["--eval-capacity-factor", "inf"], "--eval-capacity-factor inf"),
    (T + ["--min-capacity", "-1"], "--min-capacity -1"),
    (T + ["--expert-capacity", "0"], "--expert-capacity 0"),
    (T + ["--drop-priority", "age"], "--drop-priority"),
    (T + ["--second-expert-policy", "maybe"], "--second-expert-policy"),
    (T + ["--router", "hash"], "--router"),
    (T + ["--router", "gshard", "--top-k", "1"], "--top-k 1"),
    (T + ["--router-jitter", "0.5"], "--router-jitter 0.5"),
    (T + ["--balance-loss-coef", "-0.1"], "--balance-loss-coef -0.1"),
    (T + ["--z-loss-coef", "nan"], "--z-loss-coef nan"),
    (T + ["--expert-dropout", "1"], "--expert-dropout 1"),
    (T + ["--shared-expert-d-ff", "0"], "--shared-expert-d-ff 0"),
    (T + ["--shared-expert-gate"], "--shared-expert-gate true"),
    (T + ["--n-group", "3"], "--n-group 3"),
    (T + ["--n-kv-head", "3"], "--n-kv-head 3"),
    (T + ["--n-kv-head", "0"], "--n-kv-head 0"),
    (T + ["--heads", "0"], "--heads 0"),
    (T + ["--layers", "-1"], "--layers -1"),
    (T + ["--d-model", "30"], "--d-model 30"),
    (T + ["--seq-len", "0"], "--seq-len 0"),
    (T + ["--dropout", "1"], "--dropout 1"),
    (T + ["--dropout", "nan"], "--dropout nan"),
    (T + ["--rope-theta", "0"], "--rope-theta 0"),
    (T + ["--norm-eps", "inf"], "--norm-eps inf"),
    (T + ["--moe-every", "0"], "--moe-every 0"),
    (T + ["--dense-d-ff", "0"], "--dense-d-ff 0"),
    (T + ["--arch", "sparse"], "--arch"),
    (T + ["--expert-parallel", "0"], "--expert-parallel"),
    (T + ["--data", "{missing}"], "--data"),
    (["train", "--no-progress", "--out", "{afile}"], "--out"),
    (["train", "--no-progress", "--out", "{run}"], "--out"),
    # moekit train --resume: only --steps may change; the saved config is validated.
    (["train", "--resume", "{run}", "--out", "{new}"], "--out"),
    (["train", "--resume", "{run}", "--lr", "0.01"], "--lr 0.004 (not 0.01)"),
    (["train", "--resume", "{run}", "--batch-size", "8"], "--batch-size 4 (not 8)"),
    (["train", "--resume", "{run}", "--seed", "2"], "--seed 1 (not 2)"),
    (["train", "--resume", "{run}", "--data", "{afile}"], "--data"),
    (["train", "--resume", "{run}", "--max-minutes", "none"], "--max-minutes 5.0 (not none)"),
    (["train", "--resume", "{run}", "--experts", "8"], "--experts 4 (not 8)"),
    (["train", "--resume", "{run}", "--no-tie-embeddings"], "--tie-embeddings true (not false)"),
    (["train", "--resume", "{run}", "--lr", "nan"], "--lr 0.004 (not nan)"),
    (["train", "--resume", "{run}", "--router", "switch"], "--router topk (not switch)"),
    (["train", "--resume", "{run}", "--steps", "0"], "--steps 0"),
    (["train", "--resume", "{run}", "--steps", "nan"], "--steps"),
    (["train", "--resume", "{missing}"], "config.json"),
    (["train", "--resume", "{no_train}"], "'train'"),
    (["train", "--resume", "{negative}"], "n_layer=-2"),
    (["train", "--resume", "{bad_train}"], "lr=-1.0"),
    # moekit sample
    (["sample", "{run}", "--tokens", "0"], "--tokens 0"),
    (["sample", "{run}", "--tokens", "-3"], "--tokens -3"),
    (["sample", "{run}", "--tokens", "many"], "--tokens"),
    (["sample", "{run}", "--temperature", "nan"], "--temperature nan"),
    (["sample", "{run}", "--temperature", "inf"], "--temperature inf"),
    (["sample", "{run}", "--temperature", "-1"], "--temperature -1"),
    (["sample", "{run}", "--top-k", "0"], "--top-k 0"),
    (["sample", "{run}", "--top-k", "1000"], "--top-k 1000"),
    (["sample", "{run}", "--samples", "0"], "--samples"),
    (["sample", "{run}", "--seed", "-1"], "--seed -1"),
    (["sample", "{run}", "--prompt", ""], "--prompt"),
    (["sample", "{missing}"], "config.json"),
    (["sample", "{negative}"], "config.json"),
    (["sample", "{no_model}"], "config.json"),
    # moekit params
    (["params", "mixtral-8x7b", "--context", "0"], "--context 0"),
    (["params", "mixtral-8x7b", "--context", "-5"], "--context -5"),
    (["params", "mixtral-8x7b", "--context", "long"], "--context"),
    (["params", "no-such-model"], "no-such-model"),
    (["params", "{broken_json}"], "broken.json"),
    # moekit export: never into a run, a file, or a non-empty folder without --force
    (["export", "{run}", "--hf", "{run}"], "--hf"),
    (["export", "{run}", "--hf", "{dense}"], "--hf"),
    (["export", "{run}", "--hf", "{dense}", "--force"], "--hf"),
    (["export", "{run}", "--hf", "{run}/checkpoint", "--force"], "--hf"),
    (["export", "{run}", "--hf", "{dense}/hf"], "--hf"),
    (["export", "{run}", "--hf", "{full}"], "--hf"),
    (["export", "{run}", "--hf", "{afile}"], "--hf"),
    (["export", "{missing}", "--hf", "{new}"], "config.json"),
    # moekit import
    (["import", "{missing}", "--out", "{new}"], "config.json"),
    (["import", "{run}", "--out", "{full}"], "--out"),
    (["import", "{run}", "--out", "{afile}"], "--out"),
    # moekit finetune
    (FT + ["--lr", "nan"], "--lr nan"),
    (FT + ["--lr", "0"], "--lr 0"),
    (FT + ["--lr", "-1"], "--lr -1"),
    (FT + ["--steps", "0"], "--steps 0"),
    (FT + ["--batch-size", "0"], "--batch-size 0"),
    (FT + ["--eval-interval", "0"], "--eval-interval 0"),
    (FT + ["--patience", "0"], "--patience 0"),
    (FT + ["--expert-dropout", "1"], "--expert-dropout 1"),
    (FT + ["--expert-dropout", "nan"], "--expert-dropout nan"),
    (FT + ["--seq-len", "0"], "--seq-len 0"),
    (FT + ["--seed", "-1"], "--seed -1"),
    (FT + ["--freeze", "all"], "--freeze"),
    (["finetune", "--from", "{run}", "--data", "{missing}", "--out", "{new}"], "--data"),
    (["finetune", "--from", "{run}", "--data", "{corpus}", "--out", "{full}"], "--out"),
    (["finetune", "--from", "{missing}", "--data", "{corpus}", "--out", "{new}"], "config.json"),
    # moekit upcycle
    (UP + ["--experts", "0"], "--experts 0"),
    (UP + ["--top-k", "0"], "--top-k 0"),
    (UP + ["--top-k", "9"], "--top-k 9"),
    (UP + ["--moe-every", "0"], "--moe-every 0"),
    (UP + ["--router-std", "0"], "--router-std 0"),
    (UP + ["--router-std", "-1"], "--router-std -1"),
    (UP + ["--router-std", "nan"], "--router-std nan"),
    (UP + ["--router-std", "inf"], "--router-std inf"),
    (UP + ["--seed", "-1"], "--seed -1"),
    (["upcycle", "{dense}", "--out", "{full}"], "--out"),
    (["upcycle", "{missing}", "--out", "{new}"], "config.json"),
    (["upcycle", "{run}", "--out", "{new}"], "dense"),
    # moekit multitask
    (SYN + ["--workers", "0"], "--workers 0"),
    (SYN + ["--workers", "-2"], "--workers -2"),
    (SYN + ["--lr", "nan"], "--lr nan"),
    (SYN + ["--lr", "0"], "--lr 0"),
    (SYN + ["--steps", "0"], "--steps 0"),
    (SYN + ["--batch-size", "0"], "--batch-size 0"),
    (SYN + ["--test-size", "0"], "--test-size 0"),
    (SYN + ["--failed-threshold", "nan"], "--failed-threshold nan"),
    (SYN + ["--correlations", "2"], "--correlations 2"),
    (SYN + ["--correlations", "a,b"], "--correlations"),
    (SYN + ["--seeds", "0"], "--seeds"),
    (SYN + ["--seeds", "1,1"], "--seeds"),
    (SYN + ["--models", ","], "--models"),
    (["multitask", "synthetic", "--out", "{afile}"], "--out"),
    (["multitask", "synthetic", "--out", "{synthetic_done}"], "--out"),
    (CEN + ["--workers", "0"], "--workers 0"),
    (CEN + ["--lr", "inf"], "--lr inf"),
    (CEN + ["--epochs", "0"], "--epochs 0"),
    (["multitask", "census", "--out", "{new}", "--train", "{missing}", "--test", "{corpus}"], "--train"),
    (["multitask", "census", "--out", "{new}", "--train", "{corpus}"], "--test"),
]


@pytest.mark.parametrize(("args", "named"), CASES, ids=[" ".join(args[:1] + args[-2:]) for args, _ in CASES])
def test_bad_input_exits_2_with_one_line_naming_the_flag(files, capsys, args, named):
    code, out, err = run_cli(capsys, expand(args, files))
    assert code == 2, err
    assert "Traceback" not in err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"moekit {args[0]}") and ": error: " in lines[0], err
    assert named.format(**{key: str(path) for key, path in files.items()}) in lines[0], err
    assert not files["new"].exists()  # nothing was written


def test_flag_error_message_reads_flag_value_and_allowed(files, capsys):
    code, _, err = run_cli(capsys, expand(T + ["--lr", "nan"], files))
    assert code == 2
    assert err.startswith("moekit train: error: --lr nan is invalid: must be a finite number > 0")


def test_resume_conflict_names_every_changed_flag_with_both_values(files, capsys):
    code, _, err = run_cli(capsys, expand(["train", "--resume", "{run}", "--lr", "0.01", "--seed", "7",
                                           "--no-progress"], files))
    assert code == 2
    assert "--lr 0.004 (not 0.01)" in err and "--seed 1 (not 7)" in err and "only --steps" in err
    assert "config.json" in err


def test_resume_accepts_flags_equal_to_the_run(files, capsys, monkeypatch):
    """Flags that repeat the run's values are not conflicts; --steps changes the total."""
    from moekit.training import trainer

    calls = []
    monkeypatch.setattr(trainer, "train", lambda *args, **kwargs: calls.append((args, kwargs)) or fake_result())
    args = ["train", "--resume", "{run}", "--lr", "0.004", "--seed", "1", "--data", "{corpus}", "--experts", "4",
            "--steps", "20", "--no-progress"]
    code, _, err = run_cli(capsys, expand(args, files))
    assert code == 0, err
    (model_config, train_config, out), kwargs = calls[0]
    assert kwargs["resume"] is True and str(out) == str(files["run"])
    assert train_config.steps == 20 and train_config.lr == 4e-3 and model_config.moe.num_experts == 4


def fake_result(**extra):
    from types import SimpleNamespace

    values = dict(run_dir="r", steps=3, train_seconds=1.0, interrupted=False, val_loss=1.0, bits_per_byte=1.0,
                  train_loss=1.0, tokens_per_s=1.0, total_params=10, active_params=5, load_imbalance=None,
                  dropped_fraction=None, plots=[], stopped_by="steps", target_steps=10, stop_signal=None)
    values.update(extra)
    result = SimpleNamespace(**values)
    result.to_dict = lambda: dict(values)
    return result


def test_training_diverged_is_reported_without_traceback(files, capsys, monkeypatch):
    from moekit.training import trainer

    def diverge(*args, **kwargs):
        raise trainer.TrainingDiverged("step 7: the loss is nan; lower --lr")

    monkeypatch.setattr(trainer, "train", diverge)
    code, out, err = run_cli(capsys, expand(T, files))
    assert code == 1 and out == ""
    assert err.strip() == "moekit train: error: step 7: the loss is nan; lower --lr"


def test_train_summary_says_what_stopped_the_run(files, capsys, monkeypatch):
    from moekit.training import trainer

    monkeypatch.setattr(trainer, "train", lambda *args, **kwargs: fake_result(stopped_by="max_minutes"))
    code, out, err = run_cli(capsys, expand(T + ["--json"], files))
    assert code == 0
    assert json.loads(out)["stopped_by"] == "max_minutes"
    assert "stopped by --max-minutes at step 3 of 10" in err


# ---------------------------------------------------------------------------------------
# moekit export: where it may write
# ---------------------------------------------------------------------------------------


def test_export_into_the_run_itself_refuses_and_leaves_the_run_intact(files, capsys):
    before = {path.name: path.stat().st_mtime_ns for path in files["run"].rglob("*")}
    for extra in ([], ["--force"]):
        code, _, err = run_cli(capsys, ["export", str(files["run"]), "--hf", str(files["run"]), *extra])
        assert code == 2 and "run directory" in err
    assert {path.name: path.stat().st_mtime_ns for path in files["run"].rglob("*")} == before


def test_export_into_a_non_empty_folder_needs_force(files, capsys, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "README.md").write_text("mine")
    code, _, err = run_cli(capsys, ["export", str(files["run"]), "--hf", str(folder)])
    assert code == 2 and "--force" in err
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"]
    code, out, err = run_cli(capsys, ["export", str(files["run"]), "--hf", str(folder), "--force", "--json"])
    assert code == 0, err
    assert json.loads(out)["hf_dir"] == str(folder)
    assert (folder / "config.json").exists() and (folder / "README.md").read_text() == "mine"


def test_export_onto_a_file_is_an_error_not_wrote(files, capsys, tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("x")
    code, out, err = run_cli(capsys, ["export", str(files["run"]), "--hf", str(target)])
    assert code == 2 and "wrote" not in out + err and "is a file" in err
    assert target.read_text() == "x"


# ---------------------------------------------------------------------------------------
# Damaged transformers folders
# ---------------------------------------------------------------------------------------


@pytest.fixture
def hf_folder(tmp_path):
    pytest.importorskip("transformers")
    return tiny_mixtral_folder(tmp_path / "hf")


def _import(capsys, folder, out) -> tuple[int, str]:
    code, stdout, err = run_cli(capsys, ["import", str(folder), "--out", str(out)])
    assert "Traceback" not in err
    assert code == 0 or stdout == ""
    return code, err


def test_import_of_an_intact_folder_works(hf_folder, tmp_path, capsys):
    code, err = _import(capsys, hf_folder, tmp_path / "run")
    assert code == 0, err


def test_truncated_safetensors_is_named(hf_folder, tmp_path, capsys):
    shard = hf_folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, err = _import(capsys, hf_folder, tmp_path / "run")
    assert code == 2 and str(shard) in err and "truncated or corrupt" in err
    assert not (tmp_path / "run").exists()


def _rewrite(folder, change) -> None:
    from safetensors.torch import load_file, save_file

    shard = folder / "model.safetensors"
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard))


def test_missing_expert_tensor_is_named(hf_folder, tmp_path, capsys):
    """transformers saves Mixtral with per-expert keys (block_sparse_moe.experts.{e}.w1/w2/w3)."""
    from moekit.interop.hf import ConversionError, load_hf_checkpoint

    _rewrite(hf_folder, lambda tensors: tensors.pop("model.layers.0.block_sparse_moe.experts.2.w2.weight"))
    with pytest.raises(ConversionError, match=r"block_sparse_moe\.experts\.2\.w2\.weight"):
        load_hf_checkpoint(hf_folder)
    code, err = _import(capsys, hf_folder, tmp_path / "run")
    assert code == 2 and "model.layers.0.block_sparse_moe.experts.2.w2.weight" in err and str(hf_folder) in err
    assert not (tmp_path / "run").exists()


def test_missing_fused_expert_tensor_is_named(hf_folder, tmp_path, capsys):
    """The transformers-5 fused layout (mlp.experts.gate_up_proj / down_proj), down_proj left out."""

    def to_fused_without_down_proj(tensors):
        prefix = "model.layers.0.block_sparse_moe."
        experts = range(4)
        gate_up = torch.stack([
            torch.cat([tensors.pop(f"{prefix}experts.{e}.w1.weight"), tensors.pop(f"{prefix}experts.{e}.w3.weight")])
            for e in experts
        ])
        for e in experts:
            tensors.pop(f"{prefix}experts.{e}.w2.weight")
        tensors["model.layers.0.mlp.experts.gate_up_proj"] = gate_up.contiguous()
        tensors["model.layers.0.mlp.gate.weight"] = tensors.pop(f"{prefix}gate.weight")

    _rewrite(hf_folder, to_fused_without_down_proj)
    code, err = _import(capsys, hf_folder, tmp_path / "run")
    assert code == 2 and "model.layers.0.mlp.experts.down_proj" in err and str(hf_folder) in err


def test_config_disagreeing_with_the_weights_names_file_and_tensor(hf_folder, tmp_path, capsys):
    config = json.loads((hf_folder / "config.json").read_text())
    config["intermediate_size"] = 12  # the weights have 8
    (hf_folder / "config.json").write_text(json.dumps(config))
    code, err = _import(capsys, hf_folder, tmp_path / "run")
    assert code == 2
    assert str(hf_folder / "model.safetensors") in err and "model.layers.0.block_sparse_moe.experts.0.w1.weight" in err
    assert "has shape [8, 16]" in err and "implies [12, 16]" in err


def test_config_json_with_a_missing_size_is_named(hf_folder, tmp_path, capsys):
    config = json.loads((hf_folder / "config.json").read_text())
    del config["num_local_experts"]
    (hf_folder / "config.json").write_text(json.dumps(config))
    code, err = _import(capsys, hf_folder, tmp_path / "run")
    assert code == 2 and "num_local_experts" in err and "config.json" in err


def test_sharded_folder_with_a_missing_shard_is_named(tmp_path, capsys):
    pytest.importorskip("transformers")
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=256, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                           max_position_embeddings=16)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    shards = sorted((tmp_path / "hf").glob("*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    code, err = _import(capsys, tmp_path / "hf", tmp_path / "run")
    assert code == 2 and shards[-1].name in err and "model.safetensors.index.json" in err


def test_finetune_from_a_damaged_folder_fails_before_training(hf_folder, files, tmp_path, capsys):
    _rewrite(hf_folder, lambda tensors: tensors.pop("model.layers.0.block_sparse_moe.gate.weight"))
    args = ["finetune", "--from", str(hf_folder), "--data", str(files["corpus"]), "--out", str(tmp_path / "ft"),
            "--no-progress"]
    code, out, err = run_cli(capsys, args)
    assert code == 2 and "Traceback" not in err and "gate.weight" in err
    assert not (tmp_path / "ft").exists()
