"""Random facts to memorize: the generator, the training text, and the value-token evaluation.

A fact is a unique random key mapped to a random value, both lowercase letters, one per line
(``"kkkk:vvvvvv\\n"`` for 4-letter keys and 6-letter values). Values are drawn uniformly and
independently, so a fact holds ``value_len · log2(26)`` bits that nothing but storage can
predict (Allen-Zhu & Li, Physics of Language Models 3.3, 2024, measure knowledge this way:
about 2 bits per parameter); keys are given in the prompt and not counted.

The training text holds ``passes`` passes over the trained facts, each in a fresh random
order, so a fact's neighbours (and hence its context windows) differ from pass to pass. The
trainer splits the text 90/10 by position: with at least ``MIN_PASSES`` passes its validation
tail is only more passes over the same facts and its training part holds every fact many
times over, so the split costs nothing; the metrics here never use that split.

Evaluation (``value_metrics``) feeds ``"\\n" + key + ":"`` (a newline first, so the model is at
a line start as it is after every line in training) and:
- value cross-entropy: teacher-forced ``"\\n" + key + ":" + value``, the mean cross-entropy of
  the value bytes only, in nats per value byte, over the model's full 256-byte softmax (not
  renormalized to letters): a uniform byte model scores ln 256 = 5.545, a model that knows only
  that values are lowercase letters scores ln 26 = 3.258, a model that stores the fact scores 0;
- exact match: greedy decoding of ``value_len`` bytes after ``"\\n" + key + ":"`` gives the
  whole value;
- byte accuracy: the teacher-forced argmax is the value byte.
On held-out keys (never trained on) the value cross-entropy must sit near ln 26 whatever the
model: a gain there would be leakage, not storage.

Shape suffixes: N facts, S sequence, V vocabulary (256 bytes), L value length.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

ALPHABET = string.ascii_lowercase
MIN_PASSES = 10  # the trainer's 90% training part then holds >= 9 whole passes
SEPARATOR = ":"
UNIFORM_VALUE_CE = math.log(len(ALPHABET))  # ln 26: knows the value alphabet, not the value

# A model: token ids [N, S] -> (logits [N, S, V], anything); MoETransformerLM is one.
Model = Callable[[Tensor], tuple[Tensor, object]]


@dataclass(frozen=True)
class Facts:
    """Trained facts (``keys[i]`` → ``values[i]``) and held-out ones (never in the training text)."""

    keys: tuple[str, ...]
    values: tuple[str, ...]
    heldout_keys: tuple[str, ...]
    heldout_values: tuple[str, ...]
    key_len: int
    value_len: int

    @property
    def bits_per_fact(self) -> float:
        return fact_bits(self.value_len)

    @property
    def total_bits(self) -> float:
        return len(self.keys) * self.bits_per_fact

    def lines(self) -> list[str]:
        return [f"{key}{SEPARATOR}{value}\n" for key, value in zip(self.keys, self.values, strict=True)]


def fact_bits(value_len: int) -> float:
    """Information in one value: log2(26^value_len) = value_len · log2(26) bits (4.70 per letter)."""
    return value_len * math.log2(len(ALPHABET))


def _letters(index: int, length: int) -> str:
    """``index`` written in base 26 with ``length`` letters (a = 0)."""
    letters = []
    for _ in range(length):
        index, digit = divmod(index, len(ALPHABET))
        letters.append(ALPHABET[digit])
    return "".join(reversed(letters))


def make_facts(num_facts: int, key_len: int = 4, value_len: int = 6, heldout: int = 500, seed: int = 0) -> Facts:
    """``num_facts`` trained and ``heldout`` held-out facts; the same arguments give the same facts.

    Keys are distinct (drawn without replacement from all 26^key_len strings), so the held-out
    keys never occur among the trained ones; values are independent and uniform.
    """
    for name, value, least in (("num_facts", num_facts, 1), ("key_len", key_len, 1),
                               ("value_len", value_len, 1), ("heldout", heldout, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"facts {name}={value!r} is invalid: must be an integer >= {least}")
    key_space = len(ALPHABET) ** key_len
    if num_facts + heldout > key_space:
        raise ValueError(
            f"facts num_facts={num_facts} + heldout={heldout} is invalid: only 26^{key_len} = {key_space} "
            f"distinct keys of {key_len} letters exist; use fewer facts or longer keys"
        )
    rng = random.Random(seed)
    key_ids = rng.sample(range(key_space), num_facts + heldout)
    keys = [_letters(i, key_len) for i in key_ids]
    values = ["".join(rng.choice(ALPHABET) for _ in range(value_len)) for _ in keys]
    return Facts(
        tuple(keys[:num_facts]), tuple(values[:num_facts]), tuple(keys[num_facts:]), tuple(values[num_facts:]),
        key_len, value_len,
    )


def pass_orders(num_facts: int, passes: int, seed: int) -> list[list[int]]:
    """The order of the facts in each pass: a fresh random permutation per pass."""
    rng = random.Random(f"facts-order-{seed}")
    orders = []
    for _ in range(passes):
        order = list(range(num_facts))
        rng.shuffle(order)
        orders.append(order)
    return orders


def facts_text(facts: Facts, passes: int, seed: int) -> str:
    """The training text: ``passes`` passes over the trained facts, each freshly shuffled."""
    if not isinstance(passes, int) or passes < MIN_PASSES:
        raise ValueError(
            f"facts passes={passes!r} is invalid: must be an integer >= {MIN_PASSES}, so that the "
            "trainer's 90% training split holds every fact many times and its 10% tail holds no new fact"
        )
    lines = facts.lines()
    return "".join(lines[i] for order in pass_orders(len(lines), passes, seed) for i in order)


def write_corpus(directory: Path, name: str, text: str) -> tuple[Path, str]:
    """Write ``text`` to ``directory/name-<sha>.txt`` (atomically; an identical file is kept);
    returns the path and the text's SHA-256, the identity that run specs record."""
    sha256 = hashlib.sha256(text.encode()).hexdigest()
    path = directory / f"{name}-{sha256[:12]}.txt"
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
        return path, sha256
    directory.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path, sha256


def encode_prompts(keys: tuple[str, ...] | list[str], values: tuple[str, ...] | list[str] | None = None) -> Tensor:
    """Byte ids of ``"\\n" + key + ":"`` (+ value when given), one row per fact: [N, S]."""
    rows = [f"\n{key}{SEPARATOR}{'' if values is None else values[i]}" for i, key in enumerate(keys)]
    lengths = {len(row) for row in rows}
    if len(lengths) != 1:
        raise ValueError("facts must all have the same key and value length")
    return torch.tensor([list(row.encode()) for row in rows], dtype=torch.long)


@dataclass(frozen=True)
class ValueMetrics:
    value_ce: float  # nats per value byte, full 256-byte softmax
    exact_match: float  # fraction of facts whose greedy value is exactly right
    byte_accuracy: float  # fraction of value bytes whose teacher-forced argmax is right
    count: int

    def to_dict(self) -> dict[str, float | int]:
        return {"value_ce": self.value_ce, "exact_match": self.exact_match,
                "byte_accuracy": self.byte_accuracy, "count": self.count}


@torch.no_grad()
def value_metrics(
    model: Model, keys: tuple[str, ...] | list[str], values: tuple[str, ...] | list[str], batch_size: int = 512
) -> ValueMetrics:
    """Value cross-entropy, greedy exact match and byte accuracy of ``model`` on these facts.

    ``model`` is called in whatever mode it is in: pass an ``eval()`` model (an MoE then routes
    dropless, so a fact's result does not depend on the rest of its batch).
    """
    if not keys or len(keys) != len(values):
        raise ValueError(f"value_metrics needs as many values as keys (got {len(keys)} keys, {len(values)} values)")
    value_len = len(values[0])
    ce_sum, correct_bytes, exact = 0.0, 0, 0
    for start in range(0, len(keys), batch_size):
        batch_keys, batch_values = keys[start : start + batch_size], values[start : start + batch_size]
        full_NS = encode_prompts(batch_keys, batch_values)
        prompt_len = full_NS.shape[1] - value_len
        logits_NSV, _ = model(full_NS[:, :-1])
        # Position p predicts token p + 1: the value bytes are predicted from prompt_len - 1 on.
        value_logits_NLV = logits_NSV[:, prompt_len - 1 :, :].float()
        targets_NL = full_NS[:, prompt_len:]
        ce_sum += F.cross_entropy(value_logits_NLV.flatten(0, 1), targets_NL.flatten(), reduction="sum").item()
        correct_bytes += int((value_logits_NLV.argmax(dim=-1) == targets_NL).sum())
        generated_NL = greedy_values(model, full_NS[:, :prompt_len], value_len)
        exact += int((generated_NL == targets_NL).all(dim=1).sum())
    count = len(keys)
    return ValueMetrics(ce_sum / (count * value_len), exact / count, correct_bytes / (count * value_len), count)


def greedy_values(model: Model, prompt_NS: Tensor, value_len: int) -> Tensor:
    """``value_len`` greedily decoded bytes after each prompt (the whole context re-encoded at
    each step: contexts here are a dozen bytes): [N, L]."""
    tokens_NS = prompt_NS
    for _ in range(value_len):
        logits_NSV, _ = model(tokens_NS)
        next_N1 = logits_NSV[:, -1, :].float().argmax(dim=-1, keepdim=True)
        tokens_NS = torch.cat([tokens_NS, next_N1], dim=1)
    return tokens_NS[:, prompt_NS.shape[1] :]
