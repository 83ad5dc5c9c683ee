"""Autoregressive generation with a KV cache, timed as prefill and decode separately.

Shape suffixes: B batch (1 here), S prompt length, V vocabulary.

``timed_generate`` drives any model through one callable, ``step(input_ids_BS, cache) ->
(logits_BV of the last position, cache)``, so the same loop serves moekit's LMs and loaded
transformers models (interop builds the step). Prefill (the whole prompt in one forward) and
decode (one token per forward) are timed apart because they are bound by different things:
prefill by matmul throughput, batch-1 decode by reading the weights once per token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked from the logits."""

    greedy: bool = field(default=True, metadata={"help": "argmax of the logits (temperature and top_p unused)"})
    temperature: float = field(default=1.0, metadata={"help": "logits are divided by it before sampling (> 0)"})
    top_p: float = field(
        default=1.0, metadata={"help": "nucleus sampling: the smallest set of tokens whose probability is >= top_p"}
    )
    seed: int | None = field(default=None, metadata={"help": "seed of the sampling generator (None: unseeded)"})

    def __post_init__(self) -> None:
        temperature = self.temperature
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature={self.temperature!r} is invalid: must be a finite number > 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} is invalid: must be in (0, 1]")


def sample_next_token(logits_BV: Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """The next token of each row: [B] (long). Sampling runs in float32 whatever the model dtype."""
    logits_BV = logits_BV.float()
    if sampling.greedy:
        return logits_BV.argmax(dim=-1)
    probs_BV = (logits_BV / sampling.temperature).softmax(dim=-1)
    if sampling.top_p < 1.0:
        # Nucleus (Holtzman et al. 2020): keep tokens while the probability mass before them is < top_p,
        # so the most likely token is always kept.
        sorted_probs_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        mass_before_BV = sorted_probs_BV.cumsum(dim=-1) - sorted_probs_BV
        sorted_probs_BV = sorted_probs_BV.masked_fill(mass_before_BV >= sampling.top_p, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_probs_BV)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@dataclass
class GenerationResult:
    tokens: list[int]  # the new tokens (not the prompt)
    text: str  # the new tokens decoded ("" when no decoder was given)
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens_per_s: float  # prompt tokens / prefill time
    decode_tokens_per_s: float  # tokens after the first / decode time (0 when only one was made)
    stopped_at_eos: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": len(self.tokens),
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "stopped_at_eos": self.stopped_at_eos,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# inference_mode rather than no_grad: tensors made here skip autograd's version counters and
# view tracking, a few microseconds per op that batch-1 decode runs thousands of times a token.
@torch.inference_mode()
def timed_generate(
    step: Callable[[Tensor, Any], tuple[Tensor, Any]],
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig,
    device: torch.device | str = "cpu",
    eos_token_ids: tuple[int, ...] = (),
    decode: Callable[[list[int]], str] | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` (batch 1), timing the prefill
    (prompt forward + first token) and the decode (every later token) separately."""
    if not prompt_ids:
        raise ValueError("prompt is empty: generation needs at least one prompt token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an integer >= 1")
    device = torch.device(device)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    input_ids_BS = torch.tensor([prompt_ids], dtype=torch.long, device=device)

    _sync(device)
    start = time.perf_counter()
    logits_BV, cache = step(input_ids_BS, None)
    token_B = sample_next_token(logits_BV, sampling, generator)
    tokens = [int(token_B.item())]  # .item() syncs: the first token is part of the prefill
    prefill_seconds = time.perf_counter() - start

    stopped = tokens[-1] in eos_token_ids
    start = time.perf_counter()
    while not stopped and len(tokens) < max_new_tokens:
        logits_BV, cache = step(token_B[:, None], cache)
        token_B = sample_next_token(logits_BV, sampling, generator)
        tokens.append(int(token_B.item()))
        stopped = tokens[-1] in eos_token_ids
    _sync(device)
    decode_seconds = time.perf_counter() - start
    decoded = len(tokens) - 1
    return GenerationResult(
        tokens=tokens,
        text=decode(tokens) if decode is not None else "",
        prompt_tokens=len(prompt_ids),
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        prefill_tokens_per_s=len(prompt_ids) / prefill_seconds if prefill_seconds > 0 else float("inf"),
        decode_tokens_per_s=(decoded / decode_seconds if decode_seconds > 0 else float("inf")) if decoded else 0.0,
        stopped_at_eos=stopped,
    )
