"""Train an MoE (or dense baseline) language model on a text file.

    moekit train                                   # small MoE on tiny Shakespeare, ~5 min on 2 CPU cores
    moekit train --data my.txt --experts 16 --top-k 2 --out runs/my
    moekit train --arch dense --out runs/dense     # the equal-active-compute dense baseline
    moekit train --resume runs/my --steps 4000     # continue exactly where it stopped
    moekit train --device cuda --bf16              # on a GPU
    torchrun --nproc_per_node 4 -m moekit train --expert-parallel 4 --out runs/ep4
                                                   # experts sharded over 4 ranks (moekit.distributed.run)

The run directory (``moekit.training.checkpoint``) holds config.json, checkpoint/
(model.safetensors, and state.pt with the optimizer and the ``TrainState``), metrics.csv,
TensorBoard events when tensorboard is installed, and PNG plots.

Training: AdamW, linear warmup then cosine decay, gradient clipping, gradient accumulation,
the MoE auxiliary losses through ``moekit.aux_loss``, the aux-loss-free bias update once per
optimizer step, optional bf16 autocast, on any device. All loop state that a resume needs is
one ``TrainState`` (as torchtitan's), saved at step boundaries only: SIGINT and SIGTERM set a
flag that the loop reads between steps, so an interrupted and resumed run logs the same
losses and ends with the same weights as an unbroken one, whatever the moment of the signal.
A non-finite loss stops the run at once, keeping the last good checkpoint.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moekit.distributed.run import DistributedRun
from moekit.layer import NonFiniteRouterLogitsError, aux_loss, moe_layers, routing_stats, update_expert_bias
from moekit.models.cost import count_parameters
from moekit.models.lm import LMConfig, MoETransformerLM
from moekit.training.checkpoint import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    STATE_FILE,
    CheckpointError,
    RunLock,
    claim_new_run,
    find_checkpoint,
    load_state,
    load_weights,
    read_run_config,
    remove_stale_temporaries,
    save_checkpoint,
    write_json_atomic,
    write_metrics_csv,
)
from moekit.training.config import TrainConfig
from moekit.training.data import (
    BPETokenizer,
    ByteTokenizer,
    TextDataset,
    eval_batches,
    random_batch,
    read_text,
    tokenizer_from_dict,
)

CALIBRATION_STEPS = (10, 50)  # steps timed to fit a max_minutes run's schedule to the machine
STOP_REASONS = ("steps", "max_minutes", "interrupt", "early_stop")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def resolve_device(name: str) -> torch.device:
    """``TrainConfig.device`` as a torch device: auto = cuda, else mps, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is invalid: use auto, cpu, cuda, cuda:N or mps") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r} is invalid: use auto, cpu, cuda, cuda:N or mps")
    return device


def lr_at(step: int, config: TrainConfig, total_steps: int | None = None) -> float:
    """Linear warmup to lr, then cosine decay to lr · min_lr_ratio at ``total_steps``.

    ``total_steps`` is config.steps, or fewer when ``max_minutes`` would end the run first:
    the trainer times steps 10 to 50 and fixes the schedule's length once (saved in the
    checkpoint), so a time-limited run still ends on a decayed rate and resumes exactly.
    """
    total_steps = config.steps if total_steps is None else total_steps
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen (fine-tuning with --freeze): no optimizer state
        # NOTE: norms' gains and the router projection are not decayed: decay pulls router
        # logits toward uniform, which fights the balance the router is learning.
        (decay if param.dim() >= 2 and "router" not in name else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # NOTE: the fused kernel updates all parameters in one pass: on CPU it takes 4 ms per step for
    # the default MoE (6.6M parameters) where the foreach implementation takes 19 ms. It exists
    # for CPU and CUDA parameters; elsewhere (mps) AdamW picks its default implementation.
    device_type = next(model.parameters()).device.type
    fused = True if device_type in ("cpu", "cuda") else None
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, config.beta2), fused=fused)


def optimizer_step(
    model: MoETransformerLM,
    optimizer: torch.optim.Optimizer,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    config: TrainConfig,
    ranks: DistributedRun | None = None,
    forward: Callable[..., Any] | None = None,
) -> tuple[float, float]:
    """One optimizer step: ``grad_accum`` micro-batches (forward, aux losses, backward), the
    gradient mean over ranks, clipping, AdamW, then the aux-free bias update. Returns the
    step's mean LM loss and aux loss. ``forward`` is the model or its ``torch.compile``d
    wrapper (same parameters)."""
    ranks = ranks or DistributedRun.single()
    forward = model if forward is None else forward
    device_type = next(model.parameters()).device.type
    step_loss, step_aux = 0.0, 0.0
    for _ in range(config.grad_accum):
        inputs, targets = next_batch()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.bf16):
            _, loss = forward(inputs, targets)
            auxiliary = aux_loss(model)
        ((loss + auxiliary) / config.grad_accum).backward()
        step_loss += loss.item() / config.grad_accum
        step_aux += float(auxiliary.detach()) / config.grad_accum
    ranks.reduce_gradients(model)
    if config.grad_clip > 0:
        ranks.clip_grad_norm_(model, config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ranks.pool_router_load(model)
    update_expert_bias(model)
    return step_loss, step_aux


def print0(*args: Any, **kwargs: Any) -> None:
    """Print from rank 0 only (every process is rank 0 outside torch.distributed)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        print(*args, **kwargs)
    elif torch.distributed.get_rank() == 0:
        print(*args, **kwargs)


@torch.no_grad()
def evaluate(model: Callable[..., Any], batches: list, bf16: bool, device: torch.device | None = None) -> float:
    """Mean validation loss per token over fixed ``batches`` (model in eval mode meanwhile)."""
    module = getattr(model, "_orig_mod", model)  # a torch.compile wrapper shares the module's mode
    device = device or next(module.parameters()).device
    module.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(inputs, targets)
        total += loss.item() * inputs.numel()
        count += inputs.numel()
    module.train()
    return total / count


# ---------------------------------------------------------------------------------------
# Loop state, stop signals, results
# ---------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything a resume needs besides the weights and the optimizer, in one place.

    Saved only at step boundaries, so it always describes a whole number of steps: the
    sampler has drawn exactly ``step`` steps' batches and the RNG has made exactly their
    draws. The log window (loss, tokens and seconds since the last log row) is part of it, so
    a resumed run's next log row averages the same steps as an unbroken run's.
    """

    sampler: torch.Generator = field(default_factory=torch.Generator)
    step: int = 0
    total_steps: int = 0  # the schedule's length: config.steps, or fewer once a time budget is calibrated
    calibrated: bool = True
    calibration_start: float = 0.0
    train_seconds: float = 0.0
    tokens_seen: int = 0
    history: list[dict] = field(default_factory=list)
    window_loss: float = 0.0
    window_tokens: int = 0
    window_seconds: float = 0.0
    last_train_loss: float = float("nan")
    checkpoint_step: int | None = None  # the step of the newest checkpoint on disk

    def advance(self, loss: float, seconds: float, tokens: int) -> None:
        self.step += 1
        self.train_seconds += seconds
        self.tokens_seen += tokens
        self.last_train_loss = loss
        self.window_loss += loss
        self.window_tokens += tokens
        self.window_seconds += seconds

    def reset_window(self) -> None:
        self.window_loss, self.window_tokens, self.window_seconds = 0.0, 0, 0.0

    def state_dict(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in _SAVED_FIELDS}
        values["window"] = [self.window_loss, self.window_tokens, self.window_seconds]
        values["sampler"] = self.sampler.get_state()
        values["torch_rng"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            values["cuda_rng"] = torch.cuda.get_rng_state_all()
        return values

    def load_state_dict(self, values: dict[str, Any]) -> None:
        for name in _SAVED_FIELDS:
            if name == "last_train_loss":  # absent from checkpoints of earlier versions
                self.last_train_loss = values.get(name, float("nan"))
                continue
            setattr(self, name, values[name])
        self.window_loss, self.window_tokens, self.window_seconds = values["window"]
        self.sampler.set_state(values["sampler"])
        torch.set_rng_state(values["torch_rng"])
        if values.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(values["cuda_rng"])
        self.checkpoint_step = self.step


_SAVED_FIELDS = (
    "step", "total_steps", "calibrated", "calibration_start", "train_seconds", "tokens_seen", "history",
    "last_train_loss",
)


class StopSignals:
    """SIGINT and SIGTERM (Ctrl-C, ``timeout``, ``docker stop``, a scheduler's preemption)
    only set a flag; the loop reads it between steps, saves, then evaluates.

    A second signal while a checkpoint is written waits until the write is complete; once
    the stop's checkpoint is on disk, a second signal ends the process at once (raises
    KeyboardInterrupt). A signal that the process was started with ignored stays ignored. Outside
    the main thread signals cannot be caught, and the flag is only set by ``request``.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.saved = False
        self._saving = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def request(self, signum: int = signal.SIGINT) -> None:
        if self.signal is None:
            self.signal = signum

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and self.saved and not self._saving:
            raise KeyboardInterrupt
        self.request(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A block that a signal cannot break (a checkpoint write)."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) is signal.SIG_IGN:
                    continue  # ignored by whoever started us (a background job, nohup-like wrappers): stays so
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    train_loss: float
    val_loss: float
    bits_per_byte: float
    tokens_per_s: float
    train_seconds: float
    total_params: int
    active_params: int
    load_imbalance: float | None
    dropped_fraction: float | None
    plots: list[str]
    interrupted: bool = False
    stopped_by: str = "steps"  # one of STOP_REASONS
    target_steps: int = 0  # the steps asked for (config.steps)
    stop_signal: str | None = None  # "SIGINT" or "SIGTERM" when a signal stopped the run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _NullWriter:
    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _tensorboard_writer(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return _NullWriter()
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _layer_summaries(model: torch.nn.Module) -> tuple[float | None, float | None, list[list[float]]]:
    stats = routing_stats(model)
    if not stats:
        return None, None, []
    loads = []
    for layer in stats.values():
        total = sum(layer.tokens_per_expert) or 1
        loads.append([count / total for count in layer.tokens_per_expert])
    imbalance = sum(s.load_imbalance for s in stats.values()) / len(stats)
    dropped = sum(s.dropped_fraction for s in stats.values()) / len(stats)
    return imbalance, dropped, loads


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


class Trainer:
    """The training loop over one model, shared by ``train`` and ``finetune``.

    ``on_step(step, row)`` sees every log row (raising KeyboardInterrupt in it stops the run
    like a signal); ``on_eval(step, val_loss)`` returns True to stop early (fine-tuning's
    patience). ``checkpoint_interval`` steps write a checkpoint unless ``save_periodically``
    is off (fine-tuning keeps the best weights instead).
    """

    def __init__(
        self,
        model: MoETransformerLM,
        config: TrainConfig,
        dataset: TextDataset,
        run_dir: Path,
        state: TrainState,
        stop: StopSignals,
        ranks: DistributedRun | None = None,
        device: torch.device | None = None,
        progress: bool = True,
        desc: str = "train",
        on_step: Callable[[int, dict], None] | None = None,
        on_eval: Callable[[int, float], bool] | None = None,
        save_periodically: bool = True,
    ) -> None:
        self.model, self.config, self.dataset, self.run_dir = model, config, dataset, run_dir
        self.state, self.stop = state, stop
        self.ranks = ranks or DistributedRun.single()
        self.device = device or next(model.parameters()).device
        self.progress, self.desc, self.on_step, self.on_eval = progress, desc, on_step, on_eval
        self.save_periodically = save_periodically
        self.optimizer = build_optimizer(model, config)
        self.forward: Callable[..., Any] = torch.compile(model) if config.compile else model
        self.seq_len = model.config.seq_len
        self.val_batches = eval_batches(dataset.val_tokens, config.batch_size, self.seq_len, config.eval_batches)
        # Every rank trains on its own batches: the step covers all ranks' tokens.
        self.tokens_per_step = config.batch_size * config.grad_accum * self.seq_len * self.ranks.num_ranks
        self.writer: Any = _NullWriter()
        self._stop_agreed = False

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # NOTE: drawn on the CPU with the CPU sampler whatever the device, so the data order of
        # a seed is the same on every device.
        inputs, targets = random_batch(self.dataset.train_tokens, self.config.batch_size, self.seq_len,
                                       self.state.sampler)
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def evaluate(self) -> float:
        return evaluate(self.forward, self.val_batches, self.config.bf16, self.device)

    def checkpoint_state(self) -> dict[str, Any]:
        state = self.state
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"step": state.step, "warmup_steps": self.config.warmup_steps, "steps": state.total_steps},
            **state.state_dict(),
        }

    def load_checkpoint(self, checkpoint: Path) -> None:
        values = self.ranks.load_state(self.model, self.optimizer, checkpoint, load_state)
        try:
            self.optimizer.load_state_dict(values["optimizer"])
            self.state.load_state_dict(values)
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise CheckpointError(f"{checkpoint / STATE_FILE}: does not match this run ({error})") from error

    def save(self) -> None:
        """Checkpoint (and metrics.csv) at the current step; signals wait until it is written."""
        with self.stop.deferred():
            if self.ranks.is_main:
                remove_stale_temporaries(self.run_dir)
            self.ranks.save_checkpoint(self.run_dir, self.model, self.checkpoint_state(), save_checkpoint)
            if self.ranks.is_main:
                write_metrics_csv(self.run_dir, self.state.history)
            self.state.checkpoint_step = self.state.step

    def _stop_requested(self) -> bool:
        # Several ranks must stop at the same step: they decide on the flag as reduced with the
        # last step's losses (``_stop_agreed``); a single process reads its own flag.
        return self._stop_agreed if self.ranks.distributed else self.stop.requested

    def diverged(self, step: int, what: str) -> TrainingDiverged:
        state = self.state
        if state.checkpoint_step is None:
            kept = f"no checkpoint was written (the first was due at step {self.config.checkpoint_interval})"
        else:
            kept = f"last good checkpoint at step {state.checkpoint_step} in {self.run_dir / CHECKPOINT_DIR}"
        return TrainingDiverged(
            f"diverged at step {step} ({what}); {kept}. Nothing was saved from the diverged steps; "
            f"try a lower --lr (this run: {self.config.lr:g}) or --grad-clip"
        )

    def train_step(self) -> float:
        """One optimizer step; the state advances by exactly one step, or not at all."""
        config, state = self.config, self.state
        started = time.perf_counter()
        lr = lr_at(state.step, config, state.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        try:
            loss, aux = optimizer_step(self.model, self.optimizer, self.next_batch, config, self.ranks, self.forward)
        except NonFiniteRouterLogitsError as error:  # the MoE layers' own check saw the divergence first
            raise self.diverged(state.step + 1, "router logits NaN or inf") from error
        elapsed = time.perf_counter() - started
        # Means over the ranks: every rank then makes the same time-budget and stop decisions.
        loss, aux, elapsed, stop_votes = self.ranks.mean([loss, aux, elapsed, float(self.stop.requested)])
        self._stop_agreed = stop_votes > 0
        state.advance(loss, elapsed, self.tokens_per_step)
        if not (math.isfinite(loss) and math.isfinite(aux)):
            raise self.diverged(state.step, f"training loss {loss}, aux loss {aux}")
        self._calibrate()
        self._log(lr, aux)
        return loss

    def _calibrate(self) -> None:
        state = self.state
        if state.calibrated:
            return
        if state.step == CALIBRATION_STEPS[0]:
            state.calibration_start = state.train_seconds
        if state.step == CALIBRATION_STEPS[1]:
            seconds_per_step = (state.train_seconds - state.calibration_start) / (
                CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0]
            )
            budget = 60 * self.config.max_minutes - state.train_seconds  # type: ignore[operator]
            state.total_steps = min(state.total_steps, state.step + max(1, int(budget / seconds_per_step)))
            state.calibrated = True

    def _log(self, lr: float, aux: float) -> None:
        config, state = self.config, self.state
        step = state.step
        is_eval = step % config.eval_interval == 0 or step == state.total_steps
        if not (step % config.log_interval == 0 or is_eval):
            return
        imbalance, dropped, loads = _layer_summaries(self.model)
        row: dict[str, Any] = {
            "step": step,
            "train_loss": state.window_loss / max(1, state.window_tokens // self.tokens_per_step),
            "aux_loss": aux,
            "lr": lr,
            "tokens_per_s": state.window_tokens / state.window_seconds if state.window_seconds else 0.0,
            "load_imbalance": imbalance,
            "dropped_fraction": dropped,
            "train_seconds": state.train_seconds,
            "expert_load": loads,
        }
        if is_eval:
            row["val_loss"] = self.evaluate()
            if not math.isfinite(row["val_loss"]):
                raise self.diverged(step, f"validation loss {row['val_loss']}")
        state.history.append(row)
        state.reset_window()
        for key in ("train_loss", "val_loss", "aux_loss", "tokens_per_s", "load_imbalance", "lr"):
            if row.get(key) is not None:
                self.writer.add_scalar(key, row[key], step)
        if self._bar is not None:
            postfix = {"loss": f"{row['train_loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
            if imbalance is not None:
                postfix["imbalance"] = f"{imbalance:.2f}"
            if "val_loss" in row:
                postfix["val"] = f"{row['val_loss']:.3f}"
            self._bar.set_postfix(postfix)
        if self.on_step is not None and self.ranks.is_main:
            try:
                self.on_step(step, row)
            except KeyboardInterrupt:  # a callback's stop request: the step is complete
                self.stop.request()
        if is_eval and self.on_eval is not None and self.on_eval(step, row["val_loss"]):
            self._early_stop = True

    def fit(self) -> str:
        """Train until the schedule ends, the time budget is spent, a stop is requested or
        ``on_eval`` asks to stop; returns which (one of STOP_REASONS)."""
        config, state = self.config, self.state
        self._early_stop = False
        if self.ranks.is_main:
            self.writer = _tensorboard_writer(self.run_dir)
        self._bar = tqdm(total=state.total_steps, initial=state.step, desc=self.desc, dynamic_ncols=True,
                         disable=not (self.progress and self.ranks.is_main))
        self.model.train()
        try:
            while state.step < state.total_steps:
                if self._stop_requested():
                    return "interrupt"
                self.train_step()
                self._bar.total = state.total_steps
                self._bar.update(1)
                if self._early_stop:
                    return "early_stop"
                if self.save_periodically and state.step % config.checkpoint_interval == 0:
                    if state.step < state.total_steps:
                        self.save()
                if config.max_minutes is not None and state.train_seconds >= 60 * config.max_minutes:
                    return "max_minutes"
            # The schedule ran out: it is config.steps long, or shorter when the time budget fixed it.
            return "steps" if state.total_steps >= config.steps else "max_minutes"
        finally:
            self._bar.close()
            self._bar = None
            self.writer.close()

    _bar: Any = None
    _early_stop: bool = False


# ---------------------------------------------------------------------------------------
# moekit train
# ---------------------------------------------------------------------------------------


def train(
    model_config: LMConfig,
    train_config: TrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
    expert_parallel: int = 1,
) -> TrainResult:
    """Train (or, with ``resume``, continue) the run in ``out``; returns its figures.

    ``expert_parallel`` > 1: launched by torchrun on that many ranks, experts sharded over
    them, the rest data-parallel (see ``moekit.distributed.run``); a checkpoint written by
    any number of ranks resumes on any other. Raises ``CheckpointError`` for a run directory
    that cannot be used (nothing is written then) and ``TrainingDiverged`` for a NaN loss.
    """
    train_config.validate()
    device = resolve_device(train_config.device)
    with StopSignals() as stop:
        ranks = DistributedRun.setup(expert_parallel, backend="nccl" if device.type == "cuda" else "gloo")
        if ranks.distributed and device.type == "cuda":
            device = torch.device("cuda", ranks.local_rank)
            torch.cuda.set_device(device)
        lock: RunLock | None = None
        try:
            if resume:
                trainer, lock = _resume_trainer(model_config, train_config, Path(out), stop, ranks, device, progress)
            else:
                trainer, lock = _new_trainer(model_config, train_config, Path(out), stop, ranks, device, progress)
            trainer.on_step = on_step
            return _finish(trainer, trainer.fit())
        finally:
            if lock is not None:
                lock.release()
            ranks.close()


def _build_model(model_config: LMConfig, train_config: TrainConfig, ranks: DistributedRun) -> MoETransformerLM:
    torch.manual_seed(train_config.seed)
    model = MoETransformerLM(model_config)
    ranks.shard(model)
    if ranks.distributed:
        torch.manual_seed(ranks.data_seed(train_config.seed))  # routing noise differs per rank
    return model


def _new_trainer(
    model_config: LMConfig, train_config: TrainConfig, run_dir: Path, stop: StopSignals, ranks: DistributedRun,
    device: torch.device, progress: bool,
) -> tuple[Trainer, RunLock | None]:
    if (run_dir / CONFIG_FILE).exists() or (run_dir / CHECKPOINT_DIR).exists():
        raise CheckpointError(
            f"{run_dir / CONFIG_FILE}: {run_dir} already holds a run; pass --resume {run_dir} "
            "to continue it, or choose another --out (nothing was overwritten)"
        )
    lock = claim_new_run(run_dir) if ranks.is_main else None
    try:
        ranks.barrier()  # every rank has checked the directory before rank 0 writes into it
        if train_config.data is not None:  # stored absolute: --resume works from any directory
            train_config = replace(train_config, data=str(Path(train_config.data).resolve()))
        tokenizer: ByteTokenizer | BPETokenizer = ByteTokenizer()
        if train_config.tokenizer == "bpe":
            tokenizer = BPETokenizer.train(read_text(train_config.data)[0], train_config.bpe_vocab_size)
        if model_config.vocab_size != tokenizer.vocab_size:
            model_config = LMConfig.from_dict({**model_config.to_dict(), "vocab_size": tokenizer.vocab_size})
        dataset = TextDataset.load(train_config.data, model_config.seq_len, tokenizer)
        model = _build_model(model_config, train_config, ranks).to(device)
        state = TrainState(
            sampler=torch.Generator().manual_seed(ranks.data_seed(train_config.seed)),
            total_steps=train_config.steps,
            calibrated=train_config.max_minutes is None,
        )
        trainer = Trainer(model, train_config, dataset, run_dir, state, stop, ranks, device, progress)
        if ranks.is_main:
            payload = {"model": model_config.to_dict(), "train": asdict(train_config), "tokenizer": tokenizer.to_dict()}
            write_json_atomic(run_dir / CONFIG_FILE, payload)
    except BaseException:
        if lock is not None:
            lock.abandon()
        raise
    return trainer, lock


def _resume_trainer(
    model_config: LMConfig, train_config: TrainConfig, run_dir: Path, stop: StopSignals, ranks: DistributedRun,
    device: torch.device, progress: bool,
) -> tuple[Trainer, RunLock | None]:
    """The run's own configs rule; only the number of steps may change (be extended).

    Nothing is written before the checkpoint has loaded, so a failed resume leaves the run as
    it was. A new step count is a step budget: the run's time budget (``max_minutes``) no
    longer applies.
    """
    lock = RunLock(run_dir).acquire() if ranks.is_main else None
    try:
        payload = read_run_config(run_dir)
        model_config = LMConfig.from_dict(payload["model"])
        saved = TrainConfig.from_dict(payload["train"])
        saved.validate()
        steps_changed = train_config.steps != saved.steps
        # device and compile say where this process trains, not what the run is: they may change.
        budget = None if steps_changed else saved.max_minutes
        train_config = replace(saved, steps=train_config.steps, max_minutes=budget, device=train_config.device,
                               compile=train_config.compile)
        tokenizer = tokenizer_from_dict(payload.get("tokenizer", {"kind": "bytes"}))
        dataset = TextDataset.load(train_config.data, model_config.seq_len, tokenizer)
        model = _build_model(model_config, train_config, ranks)
        checkpoint = find_checkpoint(run_dir)
        ranks.load_weights(model, checkpoint, load_weights)
        model.to(device)
        state = TrainState()
        trainer = Trainer(model, train_config, dataset, run_dir, state, stop, ranks, device, progress)
        trainer.load_checkpoint(checkpoint)
        if train_config.steps < state.step:
            raise CheckpointError(
                f"--steps {train_config.steps} is below the {state.step} steps this run has done "
                f"({checkpoint}); give --steps {state.step} or more"
            )
        if steps_changed:
            state.total_steps, state.calibrated = train_config.steps, True
            if ranks.is_main:
                payload["train"].update(steps=train_config.steps, max_minutes=None)
                write_json_atomic(run_dir / CONFIG_FILE, payload)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return trainer, lock


def _finish(trainer: Trainer, stopped_by: str) -> TrainResult:
    """After the loop: save first, then evaluate, report and plot.

    A finished run's last row carries a validation loss (evaluated off the grid if needed) and
    is part of the saved history. An interrupted run is saved exactly as it stood after its
    last whole step, then evaluated for the summary only, so its resume is exact.
    """
    state, config, ranks, model = trainer.state, trainer.config, trainer.ranks, trainer.model
    interrupted = stopped_by == "interrupt"
    history = state.history
    if not interrupted and state.step > 0 and not (history and history[-1]["step"] == state.step
                                                    and "val_loss" in history[-1]):
        imbalance, dropped, loads = _layer_summaries(model)
        history.append({
            "step": state.step, "train_loss": state.last_train_loss,
            "lr": lr_at(state.step, config, state.total_steps), "load_imbalance": imbalance,
            "dropped_fraction": dropped, "train_seconds": state.train_seconds, "expert_load": loads,
            "val_loss": trainer.evaluate(),
        })
    if not (interrupted and state.checkpoint_step == state.step):
        trainer.save()
    trainer.stop.saved = True
    if interrupted and ranks.is_main:
        tqdm.write(f"stopped at step {state.step}: checkpoint saved to {trainer.run_dir / CHECKPOINT_DIR}")
    val_rows = [row for row in history if "val_loss" in row]
    try:
        if interrupted or not val_rows:
            val_loss = trainer.evaluate()
        else:
            val_loss = val_rows[-1]["val_loss"]
        plots: list[str] = []
        if ranks.is_main:
            from moekit.training.plots import plot_run

            plots = [str(p) for p in plot_run(trainer.run_dir, history, [name for name, _ in moe_layers(model)])]
    except KeyboardInterrupt:  # a second signal after the checkpoint is safe: skip the rest
        val_loss, plots = (val_rows[-1]["val_loss"] if val_rows else float("nan")), []
    last = {key: next((r[key] for r in reversed(history) if r.get(key) is not None), None)
            for key in ("load_imbalance", "dropped_fraction")}
    counts = count_parameters(model)
    result = TrainResult(
        run_dir=str(trainer.run_dir),
        steps=state.step,
        train_loss=state.last_train_loss,
        val_loss=val_loss,
        bits_per_byte=val_loss / math.log(2) / trainer.dataset.bytes_per_token,
        tokens_per_s=state.tokens_seen / state.train_seconds if state.train_seconds else 0.0,
        train_seconds=state.train_seconds,
        total_params=counts.total,
        active_params=counts.active,
        load_imbalance=last["load_imbalance"],
        dropped_fraction=last["dropped_fraction"],
        plots=plots,
        interrupted=interrupted,
        stopped_by=stopped_by,
        target_steps=config.steps,
        stop_signal=signal.Signals(trainer.stop.signal).name if interrupted and trainer.stop.signal else None,
    )
    if ranks.is_main:
        write_json_atomic(trainer.run_dir / "results.json", result.to_dict())
    return result
