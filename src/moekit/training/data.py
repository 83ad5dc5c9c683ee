"""Text data for language-model training: loading, tokenizing, splitting and batching.

Byte-level tokens (vocabulary 256) by default, so any UTF-8 text works with no tokenizer
to train; ``BPETokenizer`` trains a byte-level BPE on the corpus with the ``tokenizers``
library when it is installed. The default corpus is tiny Shakespeare (public domain),
shipped in the package. The split is fixed: the first 90% of the tokens train, the last 10%
validate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_CORPUS = "tinyshakespeare.txt"
TRAIN_FRACTION = 0.9
MIN_SEQUENCES = 4  # a split must hold at least this many sequences (+1 token for targets)


class DataError(ValueError):
    """A text file that cannot be trained on; the message names the file and the reason."""


def default_corpus_path() -> Path:
    return Path(str(resources.files("moekit") / "training" / "corpus" / DEFAULT_CORPUS))


def read_text(path: str | Path | None) -> tuple[str, Path]:
    """The text of ``path`` (the built-in corpus when None), checked to be non-empty UTF-8."""
    file = default_corpus_path() if path is None else Path(path)
    if not file.exists():
        raise DataError(f"data file {file}: does not exist")
    if not file.is_file():
        raise DataError(f"data file {file}: is not a regular file")
    raw = file.read_bytes()
    if not raw:
        raise DataError(f"data file {file}: is empty")
    if b"\x00" in raw[:65536]:
        raise DataError(f"data file {file}: looks binary (contains NUL bytes); expected UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"data file {file}: is not UTF-8 text (invalid byte at offset {error.start})"
        ) from error
    return text, file


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, lossless for any text."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> Tensor:
        """The tokens as one uint8 tensor: 1 byte per token, never a Python list of ints
        (which costs ~36 bytes per token: a 1 GB corpus would need ~36 GB)."""
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)

    def decode(self, tokens: list[int]) -> str:
        return bytes(tokens).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind}


class BPETokenizer:
    """Byte-level BPE trained on the corpus with Hugging Face ``tokenizers``."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError as error:
            raise ImportError("BPE needs the tokenizers package: pip install tokenizers") from error
        if vocab_size < 257:
            raise ValueError(f"vocab_size={vocab_size} is invalid for BPE: must be > 256 (the bytes)")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator([text], trainer=trainer)
        return cls(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_tensor(self, text: str, chunk_chars: int = 1 << 20) -> Tensor:
        """The tokens as one int32 tensor, encoded a line-aligned chunk at a time so that no
        Python list of the whole corpus's ids is ever built."""
        parts, start = [], 0
        while start < len(text):
            stop = min(len(text), start + chunk_chars)
            if stop < len(text):  # cut after a newline, so no merge spans two chunks mid-line
                newline = text.rfind("\n", start, stop)
                stop = newline + 1 if newline >= start else stop
            parts.append(torch.tensor(self.tokenizer.encode(text[start:stop]).ids, dtype=torch.int32))
            start = stop
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tokenizer": json.loads(self.tokenizer.to_str())}


def tokenizer_from_dict(values: dict) -> ByteTokenizer | BPETokenizer:
    if values.get("kind", "bytes") == "bytes":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    return BPETokenizer(Tokenizer.from_str(json.dumps(values["tokenizer"])))


@dataclass
class TextDataset:
    """A tokenized corpus split 90/10 into train and validation token tensors."""

    train_tokens: Tensor  # [N_train], uint8 (bytes) or int32 (BPE): batches are widened to long
    val_tokens: Tensor  # [N_val]
    source: Path
    num_bytes: int

    @classmethod
    def load(
        cls, path: str | Path | None, seq_len: int, tokenizer: ByteTokenizer | BPETokenizer
    ) -> TextDataset:
        text, file = read_text(path)
        tokens = tokenizer.encode_tensor(text)
        del text
        split = int(TRAIN_FRACTION * tokens.numel())
        train, val = tokens[:split], tokens[split:]
        needed = MIN_SEQUENCES * seq_len + 1
        if val.numel() < needed:
            raise DataError(
                f"data file {file}: too short ({tokens.numel()} tokens); its 10% validation split "
                f"needs at least {needed} tokens ({MIN_SEQUENCES} sequences of {seq_len} + 1), "
                f"so the file needs about {needed * 10} tokens"
            )
        return cls(train, val, file, file.stat().st_size)  # the UTF-8 bytes read_text decoded

    @property
    def bytes_per_token(self) -> float:
        total = self.train_tokens.numel() + self.val_tokens.numel()
        return self.num_bytes / total


def random_batch(
    tokens: Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random windows: inputs [B, S] and next-token targets [B, S]."""
    starts_B = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=generator)
    offsets_S = torch.arange(seq_len + 1)
    windows_BS1 = tokens[starts_B[:, None] + offsets_S[None, :]].long()
    return windows_BS1[:, :-1], windows_BS1[:, 1:]


def eval_batches(
    tokens: Tensor, batch_size: int, seq_len: int, max_batches: int
) -> list[tuple[Tensor, Tensor]]:
    """Fixed, evenly spaced validation windows: the same every evaluation and every run."""
    available = tokens.numel() - seq_len - 1
    count = min(max_batches * batch_size, max(1, available // seq_len))
    starts = torch.linspace(0, available, count).long()
    offsets_S = torch.arange(seq_len + 1)
    windows = tokens[starts[:, None] + offsets_S[None, :]].long()
    return [
        (windows[i : i + batch_size, :-1], windows[i : i + batch_size, 1:])
        for i in range(0, count, batch_size)
    ]
