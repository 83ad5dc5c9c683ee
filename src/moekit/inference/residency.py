"""Honest resident bytes: the process's RSS plus the page-cache pages of the store's files.

A budget counted from the process alone would be flattered by the page cache: a buffered
read leaves the file's pages in memory, outside the process but on the machine. So the
figure is RSS (``/proc/self/statm``) plus, for each store file, the pages ``mincore`` reports
resident (through a read-only mapping of the file that touches no page). The store reads
blobs into anonymous buffers, never through a mapping, so no page is counted twice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class Residency:
    rss_bytes: int
    page_cache_bytes: int | None  # None: mincore unavailable (see note)
    file_bytes: dict[str, int] = field(default_factory=dict)  # store file -> its cached bytes
    note: str | None = None

    @property
    def total_bytes(self) -> int:
        return self.rss_bytes + (self.page_cache_bytes or 0)

    def to_dict(self) -> dict[str, Any]:
        return {"rss_bytes": self.rss_bytes, "page_cache_bytes": self.page_cache_bytes,
                "total_bytes": self.total_bytes, "files": self.file_bytes, "note": self.note}


def process_rss_bytes() -> int:
    """This process's resident set now (Linux ``/proc/self/statm``; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _libc() -> Any | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    if not hasattr(libc, "mincore"):
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def cached_file_bytes(path: str | Path, libc: Any | None = None) -> int:
    """Bytes of ``path`` in the page cache (``mincore`` over a read-only mapping; touches no page)."""
    libc = libc or _libc()
    if libc is None:
        raise OSError("mincore is not available on this platform")
    size = os.path.getsize(path)
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vector = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(address), size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            import numpy as np

            resident_pages = int((np.frombuffer(vector, dtype=np.uint8) & 1).sum())
        finally:
            libc.munmap(ctypes.c_void_p(address), size)
    finally:
        os.close(fd)
    return min(resident_pages * _PAGE, size)


def resident_bytes(files: Iterable[str | Path]) -> Residency:
    """RSS of this process plus the page-cache bytes of ``files`` (e.g. ``ExpertStore.files``).

    Where ``mincore`` is unavailable, ``page_cache_bytes`` is None and ``note`` says so: the
    figure is then RSS alone, a lower bound.
    """
    rss = process_rss_bytes()
    try:
        libc = _libc()
        if libc is None:
            raise OSError("mincore is not available in this C library")
        per_file = {str(path): cached_file_bytes(path, libc) for path in files}
    except OSError as error:
        return Residency(rss, None, {}, f"page cache not counted ({error}); the figure is RSS alone, a lower bound")
    return Residency(rss, sum(per_file.values()), per_file)
