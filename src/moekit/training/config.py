"""What ``moekit train`` trains on and how: ``TrainConfig``, and the built-in defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moekit.config import reject_unknown_fields
from moekit.models.lm import LMConfig


@dataclass
class TrainConfig:
    data: str | None = None  # text file; None = the built-in tiny Shakespeare
    tokenizer: str = "bytes"  # "bytes" (vocab 256) or "bpe" (trained on the corpus)
    bpe_vocab_size: int = 1024
    steps: int = 1500  # optimizer steps (or max_minutes, whichever ends first)
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 4e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only (not norms, not biases of the router)
    beta2: float = 0.99  # small-batch runs like a shorter second-moment memory
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    eval_interval: int = 250
    eval_batches: int = 16
    checkpoint_interval: int = 1000
    log_interval: int = 10
    seed: int = 1337
    bf16: bool = False  # bf16 autocast for the forward
    max_minutes: float | None = 5.0  # stop (and checkpoint) after this much training time; None = off
    device: str = "auto"  # auto (cuda when available, else mps, else cpu), cpu, cuda, cuda:N, mps
    compile: bool = False  # torch.compile the model before training

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name}={value!r} is invalid: must be an integer >= 1")
        if self.tokenizer not in ("bytes", "bpe"):
            raise ValueError(f"TrainConfig.tokenizer={self.tokenizer!r} is invalid: use bytes or bpe")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr={self.lr} is invalid: must be > 0")
        if self.warmup_steps < 0 or self.checkpoint_interval < 1:
            raise ValueError("TrainConfig.warmup_steps must be >= 0 and checkpoint_interval >= 1")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"TrainConfig.max_minutes={self.max_minutes} is invalid: must be > 0")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        reject_unknown_fields(cls, values)
        return cls(**values)


def default_configs() -> tuple[LMConfig, TrainConfig]:
    """What ``moekit train`` trains without flags: a small MoE on tiny Shakespeare."""
    return LMConfig(), TrainConfig()
