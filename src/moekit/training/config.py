"""What ``moekit train`` trains on and how: ``TrainConfig``, and the built-in defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from moekit.config import ConfigError, is_finite_number, is_int, reject_unknown_fields
from moekit.models.lm import LMConfig

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError("TrainConfig", name, value, allowed)


@dataclass
class TrainConfig:
    """How a model is trained. Each field's ``metadata["help"]`` says what it is and why its
    default; ``moekit train`` derives one flag per field from it (see ``moekit.cli.train``).
    Validated at construction, so a config.json read from disk is checked like the flags."""

    data: str | None = field(default=None, metadata={
        "help": "UTF-8 text file to train on (90% train, 10% validation); none = the built-in tiny Shakespeare"})
    tokenizer: str = field(default="bytes", metadata={
        "help": "bytes (vocab 256) or bpe (trained on the corpus)", "choices": ("bytes", "bpe")})
    bpe_vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary size, > 256 (with --tokenizer bpe)"})
    steps: int = field(default=1500, metadata={
        "help": "optimizer steps, or fewer when --max-minutes ends the run first (with --resume: the new total)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=4e-3, metadata={"help": "peak learning rate (linear warmup, then cosine decay)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "the cosine decays to lr * ratio, in [0, 1]"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps (0 = none)"})
    weight_decay: float = field(default=0.1, metadata={
        "help": "AdamW weight decay on matrices (not norms, not the router's biases)"})
    # Small-batch runs like a shorter second-moment memory than Adam's 0.999.
    beta2: float = field(default=0.99, metadata={"help": "AdamW beta2, in [0, 1)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm; 0 = no clipping"})
    eval_interval: int = field(default=250, metadata={"help": "steps between validations"})
    eval_batches: int = field(default=16, metadata={"help": "batches per validation"})
    checkpoint_interval: int = field(default=1000, metadata={"help": "steps between checkpoints"})
    log_interval: int = field(default=10, metadata={"help": "steps between logged metrics"})
    seed: int = field(default=1337, metadata={"help": "seed of weights, data order and routing noise (>= 0)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for the forward"})
    max_minutes: float | None = field(default=5.0, metadata={
        "help": "stop (and checkpoint) after this much training time; none = no time limit"})
    device: str = field(default="auto", metadata={
        "help": "auto (cuda when available, else mps, else cpu), cpu, cuda, cuda:N or mps"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model before training"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval",
                     "checkpoint_interval"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                _fail(name, value, "must be an integer >= 1")
        for name in ("warmup_steps", "seed"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                _fail(name, value, "must be an integer >= 0")
        if self.data is not None and (not isinstance(self.data, str) or not self.data):
            _fail("data", self.data, "must be None (tiny Shakespeare) or the path of a text file")
        if self.tokenizer not in ("bytes", "bpe"):
            _fail("tokenizer", self.tokenizer, "use bytes or bpe")
        if not is_int(self.bpe_vocab_size) or self.bpe_vocab_size <= 256:
            _fail("bpe_vocab_size", self.bpe_vocab_size, "must be an integer > 256 (the bytes are its first tokens)")
        if not is_finite_number(self.lr) or not self.lr > 0:
            _fail("lr", self.lr, "must be a finite number > 0")
        if not is_finite_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            _fail("min_lr_ratio", self.min_lr_ratio, "must be a number in [0, 1]")
        if not is_finite_number(self.weight_decay) or self.weight_decay < 0:
            _fail("weight_decay", self.weight_decay, "must be a finite number >= 0")
        if not is_finite_number(self.beta2) or not 0 <= self.beta2 < 1:
            _fail("beta2", self.beta2, "must be a number in [0, 1)")
        if not is_finite_number(self.grad_clip) or self.grad_clip < 0:
            _fail("grad_clip", self.grad_clip, "must be a finite number > 0, or 0 for no clipping")
        if self.max_minutes is not None and (not is_finite_number(self.max_minutes) or not self.max_minutes > 0):
            _fail("max_minutes", self.max_minutes, "must be a finite number > 0, or None for no time limit")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            _fail("device", self.device, "must be auto, cpu, cuda, cuda:N or mps")
        for name in ("bf16", "compile"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        reject_unknown_fields(cls, values)
        return cls(**values)


def default_configs() -> tuple[LMConfig, TrainConfig]:
    """What ``moekit train`` trains without flags: a small MoE on tiny Shakespeare."""
    return LMConfig(), TrainConfig()
