"""The ``moekit`` command and the benchmark's peak-memory meter.

Verified: ``--help`` works on the command and on ``bench layer`` (with example commands);
``bench layer --quick --json --no-hf`` runs every case at toy sizes and its last line is one
JSON object with the documented keys; the peak-memory meter gives hand-computed peaks,
leaving out parameter gradients and what existed before the call.

Run: ``python -m pytest tests/test_cli.py``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from moekit.cli.main import build_parser, main
from moekit.experiments.bench.layer import peak_activation_bytes

MIB = 2**20


def run_moekit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moekit", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_help_lists_commands_and_examples():
    result = run_moekit("--help")
    assert result.returncode == 0, result.stderr
    assert "bench" in result.stdout
    assert "examples:" in result.stdout


def test_bench_layer_help_lists_options_cases_and_examples():
    result = run_moekit("bench", "layer", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--quick", "--rounds", "--cases", "--json", "--no-hf"):
        assert option in result.stdout
    assert "examples:" in result.stdout
    assert "moekit bench layer --quick" in result.stdout


def test_bench_layer_quick_json_last_line_is_the_report(capsys):
    # In-process (the subprocess tests above cover the entry point); --malloc default keeps
    # the allocator setting out of the test process.
    args = ["bench", "layer", "--quick", "--json", "--no-hf", "--rounds", "1", "--malloc", "default"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["bench"] == "layer"
    assert report["quick"] is True
    assert report["rounds"] == 1
    assert isinstance(report["passed"], bool)
    assert [case["id"] for case in report["cases"]] == ["1", "2", "3", "4", "5"]
    for case in report["cases"]:
        assert {"title", "metric", "num_tokens", "dense_rows", "config", "target", "results"} <= set(case)
        (moekit,) = case["results"]  # --no-hf: only moekit
        assert moekit["impl"] == "moekit"
        assert moekit["ratio"] > 0
        assert moekit["target"] == case["target"]
        assert isinstance(moekit["passed"], bool)
        if case["metric"] == "time":
            assert len(moekit["round_ratios"]) == 1
        else:
            assert moekit["peak_bytes"] > 0 and moekit["dense_peak_bytes"] > 0


def test_unknown_case_is_an_error_that_names_the_choices(capsys):
    assert main(["bench", "layer", "--cases", "9"]) == 2
    assert "choose from ['1', '2', '3', '4', '5']" in capsys.readouterr().err


def test_bare_bench_prints_its_help(capsys):
    assert main(["bench"]) == 2
    assert "layer" in capsys.readouterr().out


def test_peak_meter_counts_what_is_live_at_once():
    def allocate():
        a = torch.empty(MIB // 4)  # 1 MiB
        b = torch.empty(2 * MIB // 4)  # 2 MiB: 3 MiB live, the peak
        del a
        c = torch.empty(MIB // 8)  # 0.5 MiB: 2.5 MiB live
        return b, c

    assert peak_activation_bytes(allocate) == 3 * MIB


def test_peak_meter_leaves_out_parameter_gradients_and_prior_memory():
    x = torch.randn(1024, 256, requires_grad=True)  # exists before: not counted
    w = torch.randn(256, 512, requires_grad=True)
    grad_y = torch.randn(1024, 512)

    def step():
        y = x @ w  # 2 MiB, live until the end
        y.backward(grad_y)  # x.grad 1 MiB counts; w.grad 0.5 MiB is a parameter gradient

    assert peak_activation_bytes(step, [w]) == 3 * MIB
    x.grad = w.grad = None
    assert peak_activation_bytes(step) == pytest.approx(3.5 * MIB)


# ---------------------------------------------------------------------------------------
# The command: top-level help, train flags derived from the configs, --json everywhere
# ---------------------------------------------------------------------------------------


def test_bare_moekit_prints_help_to_stderr_and_exits_2():
    result = run_moekit()
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage: moekit" in result.stderr and "train" in result.stderr


def test_bare_multitask_prints_its_help_to_stderr_and_exits_2(capsys):
    assert main(["multitask"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "synthetic" in captured.err


def test_top_level_help_leads_with_train_and_sample_and_has_an_example_per_command(capsys):
    from moekit.cli.main import build_parser

    parser = build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    commands = list(subparsers.choices)
    assert commands[:2] == ["train", "sample"]
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    epilog = text[text.index("examples:"):]
    assert epilog.index("moekit train") < epilog.index("moekit sample") < epilog.index("moekit compare")
    for command in commands:
        assert f"  moekit {command} " in epilog, command


def test_every_config_field_has_a_train_flag_with_its_help():
    from moekit.cli.train import FLAG_ALIASES, config_flags
    from moekit.config import MoEConfig
    from moekit.models.lm import LMConfig
    from moekit.training.config import TrainConfig

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    options = {option: action for action in train._actions for option in action.option_strings}
    by_field = {(flag.section, flag.field): flag for flag in config_flags()}
    for section, cls in (("model", LMConfig), ("moe", MoEConfig), ("train", TrainConfig)):
        for field in dataclasses.fields(cls):
            assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help"
            if (section, field.name) in {("moe", "d_model"), ("model", "moe")}:
                continue  # moe.d_model follows --d-model; moe is the section of MoEConfig's flags
            flag = by_field[section, field.name]
            assert flag.flag == FLAG_ALIASES.get((section, field.name), "--" + field.name.replace("_", "-"))
            assert flag.flag in options, flag.flag
            assert field.metadata["help"].replace("%", "%%") in options[flag.flag].help
            if field.type == "bool":
                assert "--no-" + flag.flag[2:] in options
    for old in ("--experts", "--layers", "--heads", "--top-k", "--d-ff", "--shared-experts", "--moe-every",
                "--drop-priority", "--eval-capacity-factor", "--second-expert-policy", "--n-kv-head", "--bf16",
                "--no-bf16", "--capacity-factor", "--max-minutes", "--data"):
        assert old in options, old


def parse_train(args: list[str]):
    from moekit.cli.train import configs_from_flags, given_flags
    from moekit.training.config import default_configs

    parsed = build_parser().parse_args(["train", *args])
    return configs_from_flags(*default_configs(), given_flags(parsed), parsed.config_flags)


def test_flags_round_trip_into_the_configs():
    model, train = parse_train([
        "--experts", "8", "--layers", "3", "--heads", "8", "--n-kv-head", "2", "--d-model", "64", "--d-ff", "48",
        "--drop-priority", "score", "--eval-capacity-factor", "2.5", "--capacity-factor", "dropless",
        "--router", "gshard", "--second-expert-policy", "threshold_random", "--second-expert-threshold", "0.3",
        "--no-normalize-weights", "--no-tie-embeddings", "--expert-capacity", "none", "--shared-experts", "1",
        "--shared-expert-gate", "--lr", "0.01", "--max-minutes", "none", "--bf16", "--grad-clip", "0",
        "--data", "corpus.txt", "--device", "cuda:1", "--compile", "--seed", "3",
    ])
    assert (model.n_layer, model.n_head, model.n_kv_head, model.d_model, model.tie_embeddings) == (3, 8, 2, 64, False)
    moe = model.moe
    assert (moe.num_experts, moe.d_model, moe.d_ff, moe.router, moe.top_k) == (8, 64, 48, "gshard", 2)
    assert (moe.drop_priority, moe.eval_capacity_factor, moe.capacity_factor) == ("score", 2.5, None)
    assert (moe.second_expert_policy, moe.second_expert_threshold, moe.normalize_weights) == ("threshold_random",
                                                                                              0.3, False)
    assert (moe.num_shared_experts, moe.shared_expert_gate, moe.expert_capacity) == (1, True, None)
    assert (train.lr, train.max_minutes, train.bf16, train.grad_clip) == (0.01, None, True, 0.0)
    assert (train.data, train.device, train.compile, train.seed) == ("corpus.txt", "cuda:1", True, 3)
    default_model, default_train = parse_train([])
    assert default_train.max_minutes == 5.0 and default_model.moe.num_experts == 16


def test_switch_router_means_top_1_unless_top_k_is_given(capsys):
    model, _ = parse_train(["--router", "switch"])
    assert model.moe.top_k == 1
    with pytest.raises(ValueError, match="--top-k 2 is invalid"):
        parse_train(["--router", "switch", "--top-k", "2"])


def test_out_with_resume_is_an_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--out" in capsys.readouterr().err


# Every subcommand's --json: stdout is exactly one JSON document.


def test_params_json_pipes_into_a_json_parser():
    result = subprocess.run(
        f"{sys.executable} -m moekit params mixtral-8x7b --json | {sys.executable} -c "
        "'import json,sys; print(json.load(sys.stdin)[\"total_params\"])'",
        shell=True, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "46702792704"


def _tiny_run(path, arch: str = "moe") -> None:
    from moekit.config import MoEConfig
    from moekit.models.lm import LMConfig, MoETransformerLM
    from moekit.training.checkpoint import save_checkpoint, write_json_atomic
    from moekit.training.config import TrainConfig

    config = LMConfig(vocab_size=256, seq_len=16, n_layer=1, n_head=2, d_model=16, arch=arch,
                      moe=MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2))
    torch.manual_seed(0)
    path.mkdir(parents=True)
    write_json_atomic(path / "config.json", {"model": config.to_dict(), "train": dataclasses.asdict(TrainConfig()),
                                             "tokenizer": {"kind": "bytes"}})
    save_checkpoint(path, MoETransformerLM(config), {})


def json_stdout(capsys, args: list[str]) -> dict:
    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out)  # the whole of stdout: one document, nothing else


def test_every_subcommand_json_is_the_whole_stdout(tmp_path, capsys):
    pytest.importorskip("transformers")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Now is the winter of our discontent made glorious summer.\n" * 40)
    _tiny_run(tmp_path / "run")
    _tiny_run(tmp_path / "dense", arch="dense")
    assert json_stdout(capsys, ["params", "mixtral-8x7b", "--json"])["total_params"] == 46_702_792_704
    assert json_stdout(capsys, ["params", str(tmp_path / "run"), "--json"])["total_params"] > 0
    samples = json_stdout(capsys, ["sample", str(tmp_path / "run"), "--prompt", "ab", "--tokens", "4", "--samples",
                                   "2", "--json"])["samples"]
    assert len(samples) == 2 and all(text.startswith("ab") for text in samples)
    exported = json_stdout(capsys, ["export", str(tmp_path / "run"), "--hf", str(tmp_path / "hf"), "--json"])
    assert exported["hf_dir"] == str(tmp_path / "hf")
    imported = json_stdout(capsys, ["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--json"])
    assert imported["run_dir"] == str(tmp_path / "back")
    upcycled = json_stdout(capsys, ["upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "up"), "--experts",
                                    "4", "--json"])
    assert upcycled["total_params"] > upcycled["active_params"]
    finetuned = json_stdout(capsys, ["finetune", "--from", str(tmp_path / "run"), "--data", str(corpus), "--out",
                                     str(tmp_path / "ft"), "--steps", "2", "--eval-interval", "1", "--batch-size",
                                     "2", "--json"])
    assert finetuned["steps"] == 2
    trained = json_stdout(capsys, ["train", "--d-model", "16", "--layers", "1", "--heads", "2", "--seq-len", "16",
                                   "--d-ff", "8", "--experts", "4", "--batch-size", "2", "--steps", "2",
                                   "--eval-interval", "2", "--eval-batches", "1", "--data", str(corpus), "--out",
                                   str(tmp_path / "t"), "--json"])
    assert trained["steps"] == 2
    synthetic = json_stdout(capsys, ["multitask", "synthetic", "--seeds", "1", "--correlations", "1", "--steps", "2",
                                     "--batch-size", "8", "--test-size", "20", "--workers", "1", "--out",
                                     str(tmp_path / "syn"), "--json"])
    assert isinstance(synthetic, dict) and synthetic
