"""Run a function on R gloo ranks in forked processes, with timeouts so that nothing hangs.

Each rank joins a process group through a file store in a temporary directory (no port to
pick), runs ``fn(rank, num_ranks, *args)``, and saves its return value (or its traceback) to
that directory; the parent waits up to ``timeout_s`` and kills what is left. Forking (not
spawning) keeps a rank's start-up to a fraction of a second: it inherits the imported torch.
Every rank uses one thread, so that R ranks share the machine's cores fairly.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class RankOutcome:
    exitcode: int | None  # None: still running at the deadline (then killed)
    result: Any
    error: str


def _child(fn, rank: int, num_ranks: int, directory: Path, collective_timeout_s: float, args: tuple) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{directory / 'store'}",
            rank=rank,
            world_size=num_ranks,
            timeout=datetime.timedelta(seconds=collective_timeout_s),
        )
        result = fn(rank, num_ranks, *args)
        torch.save(result, directory / f"result-{rank}.pt")
    except BaseException:
        (directory / f"error-{rank}.txt").write_text(traceback.format_exc())
        code = 1
    finally:
        # os._exit: a forked child must not run the parent's (pytest's) exit handlers; the
        # process group is not destroyed, which would wait on peers that may be dead.
        os._exit(code)


def run_ranks(
    fn,
    num_ranks: int,
    directory: Path,
    *args: Any,
    timeout_s: float = 60.0,
    collective_timeout_s: float = 30.0,
    wait_for: list[int] | None = None,
) -> list[RankOutcome]:
    """Outcome of every rank; ranks still running once the ranks of ``wait_for`` (default:
    all) have exited, or at ``timeout_s``, are killed."""
    directory.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_child, args=(fn, rank, num_ranks, directory, collective_timeout_s, args))
        for rank in range(num_ranks)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout_s
    for rank in range(num_ranks) if wait_for is None else wait_for:
        processes[rank].join(max(0.0, deadline - time.monotonic()))
    outcomes = []
    for rank, process in enumerate(processes):
        exitcode = process.exitcode
        if exitcode is None:
            process.kill()
            process.join()
        result_path, error_path = directory / f"result-{rank}.pt", directory / f"error-{rank}.txt"
        result = torch.load(result_path, weights_only=False) if result_path.exists() else None
        error = error_path.read_text() if error_path.exists() else ""
        outcomes.append(RankOutcome(exitcode, result, error))
    return outcomes


def results_of(outcomes: list[RankOutcome]) -> list[Any]:
    """The ranks' results, or an assertion error quoting the failed ranks' tracebacks."""
    failed = [
        f"rank {rank}: " + ("timed out" if o.exitcode is None else f"exit {o.exitcode}\n{o.error}")
        for rank, o in enumerate(outcomes)
        if o.exitcode != 0
    ]
    assert not failed, "\n".join(failed)
    return [o.result for o in outcomes]
