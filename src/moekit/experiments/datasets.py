"""Where opt-in datasets (census, GCIDE) are cached, and the digests that check them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def default_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/moekit/<name>`` (``~/.cache/moekit/<name>`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "moekit" / name


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's bytes, read 1 MiB at a time (hashlib names: "sha256", "md5")."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
