"""Run directories: config.json, atomic checkpoints, metrics; the one implementation.

A run directory holds config.json (model, train and tokenizer sections), checkpoint/
(model.safetensors and state.pt, written into a temporary directory and renamed into place,
so a crash leaves the old or the new checkpoint, never a mix), metrics.csv and results.json.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from moekit.distributed import checkpoint as distributed_checkpoint
from moekit.models.lm import LMConfig, MoETransformerLM

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoint"
LOCK_FILE = ".lock"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.csv"


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be used; the message names the file."""


class RunLock:
    """Exclusive use of a run directory by one process, for as long as it trains.

    An advisory ``flock`` on ``run_dir/.lock``: the kernel releases it when the process
    ends, however it ends (kill -9 included), so a stale lock never blocks a resume. Two
    processes started into the same directory a moment apart cannot both hold it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._handle: Any = None
        self.created_dir = False  # the directory did not exist before the lock

    def acquire(self) -> RunLock:
        self.created_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # no flock on this platform: the atomic config.json claim still holds
            self._handle = handle
            return self
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise CheckpointError(
                f"{self.path.parent}: in use by another moekit process (pid {owner}); wait for it to end, "
                "or choose another --out"
            ) from error
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor releases the flock
            self._handle = None

    def abandon(self) -> None:
        """Release, and remove the directory again if the lock created it and nothing else
        was written there: a run that failed before it started leaves no trace."""
        self.release()
        directory = self.path.parent
        if self.created_dir and [entry.name for entry in directory.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> RunLock:
        return self if self._handle is not None else self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if error is not None:
            self.abandon()
        else:
            self.release()


def claim_new_run(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` for a new run, refusing a directory that already holds one.

    Returns the held lock; the caller writes config.json while holding it. Of two runs
    started into one directory a moment apart, exactly one gets the lock and the other a
    CheckpointError, so nothing of the first is overwritten.
    """
    lock = RunLock(run_dir).acquire()
    config = run_dir / CONFIG_FILE
    if config.exists() or (run_dir / CHECKPOINT_DIR).exists():
        lock.release()
        raise CheckpointError(
            f"{config}: {run_dir} already holds a run; pass --resume {run_dir} "
            "to continue it, or choose another --out (nothing was overwritten)"
        )
    return lock


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files and directories (``*.tmp-<pid>``) that a killed process left behind.

    Only called by the process that holds the run's lock, so no other writer is active.
    """
    for path in run_dir.glob("*.tmp-*"):
        if path.name.endswith(f".tmp-{os.getpid()}"):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, model: MoETransformerLM, state: dict) -> Path:
    """Write checkpoint/ atomically: into a temporary directory, then renamed into place.

    The previous checkpoint stays intact until the new one is complete; a crash at any point
    leaves either the old or the new checkpoint, never a mix.
    """
    final = run_dir / CHECKPOINT_DIR
    tmp = run_dir / f"{CHECKPOINT_DIR}.tmp-{os.getpid()}"
    old = run_dir / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / WEIGHTS_FILE))  # save_model keeps one copy of tied weights
    torch.save(state, tmp / STATE_FILE)
    for file in tmp.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path:
    final = run_dir / CHECKPOINT_DIR
    if final.exists():
        return final
    old = run_dir / f"{CHECKPOINT_DIR}.old"
    if old.exists():  # a crash between the two renames of save_checkpoint
        return old
    raise CheckpointError(f"{final}: no checkpoint in run directory {run_dir}")


def read_run_config(run_dir: Path) -> dict:
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: missing; {run_dir} is not a moekit run directory")
    try:
        payload = json.loads(path.read_text())
        LMConfig.from_dict(payload["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable run config ({error})") from error
    return payload


def load_model_from_run(run_dir: str | Path, device: str = "cpu") -> tuple[MoETransformerLM, dict]:
    """The model of a run directory, with its latest checkpoint's weights, and the run config."""
    run_dir = Path(run_dir)
    payload = read_run_config(run_dir)
    model = MoETransformerLM(LMConfig.from_dict(payload["model"]))
    load_weights(model, find_checkpoint(run_dir) / WEIGHTS_FILE)
    return model.to(device), payload


def load_weights(model: MoETransformerLM, path: Path) -> None:
    if distributed_checkpoint.read_layout(path.parent)[0] > 1:  # written by several ranks
        try:
            distributed_checkpoint.load_weights(model, path.parent)
        except distributed_checkpoint.ShardedCheckpointError as error:
            raise CheckpointError(str(error)) from error
        return
    if not path.exists():
        raise CheckpointError(f"{path}: missing weights file")
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path}: corrupt or mismatched weights ({error})") from error
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the run's model config "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )


def load_state(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: missing training state file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"{path}: corrupt or truncated training state ({error})") from error


def write_metrics_csv(run_dir: Path, history: list[dict]) -> None:
    path = run_dir / METRICS_FILE
    columns: list[str] = []
    for row in history:
        columns += [key for key in row if key not in columns and not isinstance(row[key], list)]
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)
