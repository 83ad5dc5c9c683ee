"""Split a benchmark over worker processes (one thread each) with one progress bar.

On a small CPU, one process per core with one thread each beats one process with many
threads for many small models: no synchronization between threads on every tiny op.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from queue import Empty
from typing import Any, TypeVar

from tqdm import tqdm

Result = TypeVar("Result")


class BarTicks:
    """The in-process stand-in for a worker's progress queue."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def put(self, count: int) -> None:
        self.bar.update(count)


def run_parts(task: Callable[..., Result], parts: Sequence[tuple], bar: tqdm) -> list[Result]:
    """``task(*part, ticks, threads)`` for every part, in order; ``ticks.put(n)`` advances ``bar``.

    One part runs in this process with its thread settings untouched; several run in spawned
    processes, one per part, each with one thread.
    """
    if len(parts) == 1:
        return [task(*parts[0], BarTicks(bar))]
    context = mp.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(len(parts), mp_context=context) as pool:
        queue: Any = manager.Queue()
        futures = [pool.submit(task, *part, queue, 1) for part in parts]
        while not all(future.done() for future in futures):
            try:
                bar.update(queue.get(timeout=0.5))
            except Empty:
                pass
        return [future.result() for future in futures]
