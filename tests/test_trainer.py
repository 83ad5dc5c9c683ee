"""The trainer's promises: nothing lost, nothing wrong.

An interrupted and resumed run logs the same losses and ends with the same weights as an
unbroken one, whatever the moment of the signal; SIGTERM saves like Ctrl-C; a diverged run
keeps its last good checkpoint; two runs never share a directory; a failed resume writes
nothing.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moekit.training.trainer as trainer_module
from moekit.config import MoEConfig
from moekit.models.lm import LMConfig
from moekit.training.checkpoint import CheckpointError, RunLock
from moekit.training.config import TrainConfig
from moekit.training.data import BPETokenizer, ByteTokenizer, TextDataset
from moekit.training.finetune import finetune
from moekit.training.trainer import StopSignals, TrainingDiverged, TrainState, resolve_device, train

SRC = Path(__file__).resolve().parents[1] / "src"


def tiny_config(**overrides) -> LMConfig:
    values = dict(seq_len=32, n_layer=2, n_head=2, d_model=32, dropout=0.1,
                  moe=MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2, capacity_factor=1.25))
    values.update(overrides)
    return LMConfig(**values)


def tiny_train_config(**overrides) -> TrainConfig:
    values = dict(steps=12, batch_size=4, eval_interval=6, eval_batches=2, log_interval=1, checkpoint_interval=6,
                  max_minutes=None, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 80)
    return path


def metrics(run: Path) -> list[tuple]:
    """The logged figures that must not depend on when the run was interrupted."""
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    keys = ("step", "train_loss", "aux_loss", "lr", "load_imbalance", "val_loss")
    return [tuple(row.get(key, "") for key in keys) for row in rows]


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoint" / "model.safetensors"))


def assert_same_run(broken: Path, unbroken: Path) -> None:
    assert metrics(broken) == metrics(unbroken)
    a, b = weights(broken), weights(unbroken)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def send_sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(autouse=True)
def default_sigint():
    """A shell that starts the suite in the background ignores SIGINT, and the trainer leaves an
    ignored signal ignored; these tests send SIGINT, so they give it Python's default handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------------
# Exact resume, whatever the moment of the interrupt
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "nth", "signals"),
    [
        ("batch", 4, 1),  # after step 4's batch was drawn, before its forward: the old mid-step case
        ("batch", 9, 2),  # twice in the same step
        ("evaluate", 1, 1),  # during the evaluation at step 6
        ("evaluate", 1, 2),  # a second Ctrl-C during that evaluation: still saved, still exact
        ("save", 1, 2),  # during the checkpoint write at step 6, twice: the write completes
    ],
)
def test_interrupted_and_resumed_run_equals_an_unbroken_one(tmp_path, corpus, monkeypatch, where, nth, signals):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    train(tiny_config(), tiny_train_config(data=str(corpus)), unbroken, progress=False)

    original = {"batch": trainer_module.random_batch, "evaluate": trainer_module.evaluate,
                "save": trainer_module.save_checkpoint}[where]
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            for _ in range(signals):
                send_sigint()
        return original(*args, **kwargs)

    target = {"batch": "random_batch", "evaluate": "evaluate", "save": "save_checkpoint"}[where]
    monkeypatch.setattr(trainer_module, target, interrupting)
    result = train(tiny_config(), tiny_train_config(data=str(corpus)), broken, progress=False)
    monkeypatch.undo()
    assert result.interrupted and result.stopped_by == "interrupt"
    assert 0 < result.steps < 12
    stopped_at = result.steps
    resumed = train(tiny_config(), tiny_train_config(data=str(corpus)), broken, resume=True, progress=False)
    assert resumed.steps == 12 and not resumed.interrupted
    assert_same_run(broken, unbroken)
    steps = [row[0] for row in metrics(broken)]
    assert len(steps) == len(set(steps)), "one metrics row per step"
    assert stopped_at in {int(s) for s in steps}


@pytest.mark.slow
def test_sigterm_at_a_random_moment_saves_and_resumes_exactly(tmp_path, corpus):
    """A real process, signalled from outside at a moment the test does not choose."""
    flags = ["--data", str(corpus), "--d-model", "32", "--layers", "2", "--heads", "2", "--experts", "4",
             "--seq-len", "32", "--batch-size", "4", "--steps", "150", "--eval-interval", "25",
             "--checkpoint-interval", "1000", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    command = [sys.executable, "-m", "moekit", "train"]
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    done = subprocess.run([*command, *flags, "--out", str(unbroken)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    process = subprocess.Popen([*command, *flags, "--out", str(broken)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    while not (broken / "config.json").exists() and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5 + torch.rand(()).item())
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (0, 130), stderr  # 0: it had finished before the signal
    assert "Traceback" not in stderr
    assert (broken / "checkpoint" / "model.safetensors").exists()
    if process.returncode == 130:
        assert json.loads((broken / "results.json").read_text())["stopped_by"] == "interrupt"
    resumed = subprocess.run([*command, "--resume", str(broken), "--no-progress", "--device", "cpu"], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(broken, unbroken)


def test_stop_signals_defer_during_a_write_and_end_at_once_after_the_save():
    with StopSignals() as stop:
        with stop.deferred():
            send_sigint()
            send_sigint()  # deferred: no exception inside the write
        assert stop.requested and stop.signal == signal.SIGINT
        stop.saved = True
        with pytest.raises(KeyboardInterrupt):
            send_sigint()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_ignored_at_start_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        send_sigint()
        assert not stop.requested
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_train_state_round_trips(corpus):
    state = TrainState(sampler=torch.Generator().manual_seed(3), step=7, total_steps=20, history=[{"step": 5}])
    state.advance(1.5, 0.25, 128)
    saved = state.state_dict()
    draw = torch.randint(0, 100, (5,), generator=state.sampler)
    restored = TrainState()
    restored.load_state_dict(saved)
    assert (restored.step, restored.total_steps, restored.history) == (8, 20, [{"step": 5}])
    assert (restored.window_loss, restored.window_tokens, restored.window_seconds) == (1.5, 128, 0.25)
    assert torch.equal(torch.randint(0, 100, (5,), generator=restored.sampler), draw)
    assert restored.checkpoint_step == 8


# ---------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------


def test_a_nan_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    run = tmp_path / "run"
    real_step = trainer_module.optimizer_step
    calls = {"n": 0}

    def nan_at_step_8(*args, **kwargs):
        calls["n"] += 1
        loss, aux = real_step(*args, **kwargs)
        return (float("nan"), aux) if calls["n"] == 8 else (loss, aux)

    monkeypatch.setattr(trainer_module, "optimizer_step", nan_at_step_8)
    real_save = trainer_module.save_checkpoint
    saved_at_6 = {}

    def remember(run_dir, model, state):
        path = real_save(run_dir, model, state)
        saved_at_6.update(weights(run_dir))
        return path

    monkeypatch.setattr(trainer_module, "save_checkpoint", remember)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 8 .*last good checkpoint at step 6"):
        train(tiny_config(), tiny_train_config(data=str(corpus)), run, progress=False)
    monkeypatch.undo()
    after = weights(run)
    assert all(torch.equal(after[name], saved_at_6[name]) for name in after)
    state = torch.load(run / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 6
    assert not (run / "results.json").exists()
    # The run resumes from its last good checkpoint.
    assert train(tiny_config(), tiny_train_config(data=str(corpus)), run, resume=True, progress=False).steps == 12


@pytest.mark.parametrize("arch", ["moe", "dense"])
def test_an_absurd_learning_rate_diverges_with_a_clear_error(tmp_path, corpus, arch):
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+ .*no checkpoint was written"):
        train(tiny_config(arch=arch), tiny_train_config(data=str(corpus), lr=1e30), run, progress=False)
    assert not (run / "checkpoint").exists()


# ---------------------------------------------------------------------------------------
# Run directories
# ---------------------------------------------------------------------------------------


def test_a_run_in_use_cannot_be_claimed_or_resumed(tmp_path, corpus):
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(CheckpointError, match="in use by another moekit process"):
            train(tiny_config(), tiny_train_config(data=str(corpus), steps=2), run, progress=False)
    train(tiny_config(), tiny_train_config(data=str(corpus), steps=2), run, progress=False)
    with RunLock(run):
        with pytest.raises(CheckpointError, match="in use"):
            train(tiny_config(), tiny_train_config(data=str(corpus), steps=4), run, resume=True, progress=False)


@pytest.mark.slow
def test_two_runs_started_into_one_directory_exactly_one_wins(tmp_path, corpus):
    flags = ["--data", str(corpus), "--d-model", "32", "--layers", "1", "--heads", "2", "--experts", "4",
             "--seq-len", "32", "--batch-size", "4", "--steps", "30", "--no-progress", "--device", "cpu",
             "--out", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    processes = [subprocess.Popen([sys.executable, "-m", "moekit", "train", *flags], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outcomes = [(process.wait(timeout=300), process.communicate()[1]) for process in processes]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    loser = next(stderr for code, stderr in outcomes if code == 2)
    assert "in use by another moekit process" in loser or "already holds a run" in loser
    assert "Traceback" not in loser
    resumed = subprocess.run([sys.executable, "-m", "moekit", "train", "--resume", str(tmp_path / "run"),
                              "--steps", "32", "--no-progress", "--device", "cpu"], env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr


def test_a_failed_resume_writes_nothing(tmp_path, corpus):
    run = tmp_path / "run"
    train(tiny_config(), tiny_train_config(data=str(corpus), steps=6), run, progress=False)
    config_before = (run / "config.json").read_bytes()
    with pytest.raises(CheckpointError, match="below the 6 steps"):
        train(tiny_config(), tiny_train_config(data=str(corpus), steps=4), run, resume=True, progress=False)
    assert (run / "config.json").read_bytes() == config_before
    (run / "checkpoint" / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="state.pt"):
        train(tiny_config(), tiny_train_config(data=str(corpus), steps=9), run, resume=True, progress=False)
    assert (run / "config.json").read_bytes() == config_before


def test_stale_temporaries_of_a_killed_process_are_removed_on_the_next_save(tmp_path, corpus):
    run = tmp_path / "run"
    train(tiny_config(), tiny_train_config(data=str(corpus), steps=2), run, progress=False)
    (run / "checkpoint.tmp-999999").mkdir()
    (run / "checkpoint.tmp-999999" / "model.safetensors").write_bytes(b"half")
    (run / "metrics.csv.tmp-999999").write_text("step\n")
    train(tiny_config(), tiny_train_config(data=str(corpus), steps=4), run, resume=True, progress=False)
    assert not list(run.glob("*.tmp-*"))


def test_a_run_resumes_from_another_working_directory(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(tiny_config(), tiny_train_config(data="corpus.txt", steps=2), "run", progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["data"] == str(corpus.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert train(tiny_config(), tiny_train_config(steps=4), tmp_path / "run", resume=True, progress=False).steps == 4


# ---------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------


def test_the_time_budget_says_it_stopped_the_run_and_a_new_step_count_drops_it(tmp_path, corpus):
    run = tmp_path / "run"
    result = train(tiny_config(), tiny_train_config(data=str(corpus), steps=10_000, max_minutes=1e-4), run,
                   progress=False)
    assert result.stopped_by == "max_minutes" and result.steps < result.target_steps == 10_000
    more = result.steps + 3
    resumed = train(tiny_config(), tiny_train_config(steps=more), run, resume=True, progress=False)
    assert resumed.steps == more and resumed.stopped_by == "steps"
    assert json.loads((run / "config.json").read_text())["train"]["max_minutes"] is None


# ---------------------------------------------------------------------------------------
# Fine-tuning is the same loop
# ---------------------------------------------------------------------------------------


def test_ctrl_c_during_finetune_keeps_the_best_weights(tmp_path, corpus, monkeypatch):
    source = tmp_path / "src"
    train(tiny_config(), tiny_train_config(data=str(corpus), steps=4), source, progress=False)
    real_batch = trainer_module.random_batch
    calls = {"n": 0}

    def interrupt_at_12(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12:
            send_sigint()
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "random_batch", interrupt_at_12)
    result = finetune(source, corpus, tmp_path / "ft", steps=40, eval_interval=5, batch_size=4, progress=False)
    monkeypatch.undo()
    assert result.interrupted and result.steps == 12 and not result.stopped_early
    assert result.best_step in (0, 5, 10) and result.val_loss_after <= result.val_loss_before
    saved = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert saved["interrupted"] and saved["val_loss_after"] == result.val_loss_after
    from moekit.training.checkpoint import load_model_from_run
    from moekit.training.data import eval_batches
    from moekit.training.trainer import evaluate

    model, payload = load_model_from_run(tmp_path / "ft")
    dataset = TextDataset.load(corpus, model.config.seq_len, ByteTokenizer())
    val = eval_batches(dataset.val_tokens, 4, model.config.seq_len, payload["train"]["eval_batches"])
    assert evaluate(model, val, bf16=False) == pytest.approx(result.val_loss_after, abs=1e-6)


# ---------------------------------------------------------------------------------------
# Data and devices
# ---------------------------------------------------------------------------------------


def test_token_arrays_are_compact(corpus):
    dataset = TextDataset.load(corpus, 32, ByteTokenizer())
    assert dataset.train_tokens.dtype == torch.uint8  # 1 byte per token, not a list of Python ints
    text = corpus.read_text()
    assert dataset.train_tokens.tolist() + dataset.val_tokens.tolist() == list(text.encode())
    pytest.importorskip("tokenizers")
    bpe = BPETokenizer.train(text, 300)
    ids = bpe.encode_tensor(text, chunk_chars=100)
    assert ids.dtype == torch.int32
    assert bpe.decode(ids.tolist()) == text


def test_devices_are_resolved_and_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="--device 'tpu' is invalid"):
        resolve_device("tpu")


def test_the_cli_reports_a_diverged_run_with_exit_1_and_no_traceback(tmp_path, corpus, capsys):
    from moekit.cli.main import main

    code = main(["train", "--data", str(corpus), "--d-model", "32", "--layers", "1", "--heads", "2", "--experts",
                 "4", "--seq-len", "32", "--batch-size", "4", "--steps", "20", "--lr", "1e30", "--no-progress",
                 "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert "moekit train: error: diverged at step" in err and "no checkpoint was written" in err
    assert "Traceback" not in err


def test_ctrl_c_outside_any_saving_command_exits_130_without_traceback(capsys, monkeypatch):
    import importlib

    cli_main = importlib.import_module("moekit.cli.main")

    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli_main.build_parser()
    args = parser.parse_args(["params", "mixtral-8x7b"])
    monkeypatch.setattr(cli_main, "build_parser", lambda: parser)
    monkeypatch.setattr(args, "func", interrupted, raising=False)
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: args)
    assert cli_main.main(["params", "mixtral-8x7b"]) == 130
    assert capsys.readouterr().err.strip() == "moekit: interrupted; nothing more was written"


@pytest.mark.parametrize(("flags", "budget"), [([], 5.0), (["--steps", "7"], None),
                                              (["--steps", "7", "--max-minutes", "2"], 2.0)])
def test_an_explicit_step_count_is_the_budget_unless_max_minutes_is_given(tmp_path, corpus, monkeypatch, flags,
                                                                         budget):
    import importlib

    cli_main = importlib.import_module("moekit.cli.main")
    seen = {}

    def capture(model_config, train_config, out, **kwargs):
        seen["max_minutes"] = train_config.max_minutes
        raise CheckpointError("stop here")

    monkeypatch.setattr(trainer_module, "train", capture)
    assert cli_main.main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"), *flags]) == 2
    assert seen["max_minutes"] == budget
