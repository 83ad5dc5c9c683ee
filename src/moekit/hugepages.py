"""Weights in transparent huge pages, so that streaming them is not slowed by TLB misses.

Batch-1 decoding streams hundreds of MB of weights per token. With 4 KiB pages every 4 KiB of a
stream is a TLB miss and a page walk; with 2 MiB pages one per 2 MiB. On Linux, where
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise`` (a common default), memory gets
huge pages only when a program asks with ``madvise(MADV_HUGEPAGE)`` before touching it; PyTorch
asks only when ``THP_MEM_ALLOC_ENABLE=1`` is set before its first allocation.
``place_in_huge_pages`` moves a module's large tensors into fresh anonymous mappings advised
that way, one mapping per tensor, and copies them in. docs/bench_generate.md measures the
effect on decoding.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import torch
from torch import Tensor, nn

HUGE_PAGE_BYTES = 2 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages() -> str:
    """The kernel's THP mode (``always``, ``madvise`` or ``never``), or ``unavailable``."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return "unavailable"
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else "unavailable"


def huge_page_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> Tensor:
    """An uninitialized CPU tensor in its own private anonymous mapping, advised for huge pages
    before anything touches it; its first byte sits on a 2 MiB boundary. The mapping lives as
    long as the tensor does."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # Private: an anonymous shared mapping is shmem, which has its own THP setting (often never).
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    offset = -torch.frombuffer(mapping, dtype=torch.uint8).data_ptr() % HUGE_PAGE_BYTES
    whole_pages = nbytes - nbytes % HUGE_PAGE_BYTES
    if whole_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE, offset, whole_pages)
    # The storage covers exactly the tensor's bytes (torch.save writes a whole storage); it holds
    # a reference to the mapping.
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(shape)


def _dense_order(tensor: Tensor) -> list[int] | None:
    """The dimensions from outermost to innermost in memory when ``tensor`` covers its bytes
    exactly (contiguous, or a permutation of a contiguous tensor such as a transpose); None
    when it has gaps or overlaps."""
    order = sorted(range(tensor.dim()), key=lambda d: (tensor.stride(d), -d), reverse=True)
    expected = 1
    for d in reversed(order):
        if tensor.shape[d] != 1 and tensor.stride(d) != expected:
            return None
        expected *= tensor.shape[d]
    return order


def huge_page_copy(tensor: Tensor) -> Tensor:
    """A copy of a CPU tensor in huge pages (``huge_page_empty``), in the same memory layout
    (a transposed view stays one: the copy is the same permutation of a contiguous tensor)."""
    order = _dense_order(tensor) or list(range(tensor.dim()))
    stored = huge_page_empty(tuple(tensor.shape[d] for d in order), tensor.dtype)
    copy = stored.permute(*sorted(range(len(order)), key=order.__getitem__)) if order else stored
    copy.copy_(tensor)
    return copy


def place_in_huge_pages(module: nn.Module, min_bytes: int = HUGE_PAGE_BYTES) -> int:
    """Move every CPU parameter and buffer of ``module`` of at least ``min_bytes`` into huge
    pages (in place: ``param.data`` is replaced, names, sharing between tied parameters and
    ``requires_grad`` stay); returns the bytes moved, 0 where the kernel has no THP."""
    if transparent_huge_pages() not in ("always", "madvise") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    moved = 0
    copies: dict[int, Tensor] = {}  # storage pointer → its copy, so tied weights stay tied
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            nbytes = tensor.numel() * tensor.element_size()
            if tensor.device.type != "cpu" or nbytes < min_bytes or _dense_order(tensor) is None:
                continue
            key = tensor.data_ptr()
            if key not in copies:
                copies[key] = huge_page_copy(tensor.data)
                moved += nbytes
            tensor.data = copies[key]
    return moved
