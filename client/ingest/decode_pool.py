"""Per-file work in worker processes under memory and CPU limits: a decoder that crashes, runs
out of memory despite the header checks, or loops, costs its own file, not the site's scan.

Every worker caps its address space at what it holds when it starts plus `memory_budget`
(`resource.setrlimit(RLIMIT_AS)`), so an allocation past the cap fails inside that worker
(MemoryError, or a decoder's abort), and gives each file `cpu_seconds` of CPU time
(`RLIMIT_CPU`, raised before every file), past which the kernel ends the worker. When a worker
dies, the files it may have been working on are run again one at a time in a fresh process;
the one that ends its process again is reported through `on_crash`, and the scan goes on.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Final, TypeVar

logger = logging.getLogger(__name__)

GIB: Final[int] = 1 << 30
WORKER_MEMORY_BUDGET: Final[int] = 4 * GIB
"""Address space a worker may add to what it holds at start: headroom for one file at the
decode limits (256 MiB of pixels become a few float copies while windowing)."""

FILE_CPU_SECONDS: Final[int] = 120
"""CPU time one file may take: decoding a 40 MiB JPEG 2000 radiograph takes a few seconds."""

WORKER_ENDED: Final[str] = (
    "the decoder crashed or ran past its CPU time on this file (worker ended)"
)
"""The reason a file is skipped with when its worker died twice on it."""

IN_FLIGHT_PER_WORKER: Final[int] = 2
"""Files queued per worker: enough to keep it busy, few to re-run when one dies."""

Job = TypeVar("Job")
Result = TypeVar("Result")


def _address_space_bytes() -> int:
    """This process's current virtual size (Linux /proc), 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def limit_memory(budget: int) -> int | None:
    """Caps this process's address space at its current size plus `budget`; the cap, or None
    where the platform has no such limit."""
    current = _address_space_bytes()
    if not current:
        return None
    cap = current + budget
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and hard < cap:
        cap = hard
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return cap


def _cpu_seconds_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _within_cpu_time(work: Callable[[Job], Result], seconds: int, job: Job) -> Result:
    """`work(job)` with this process's CPU limit set `seconds` past what it has used so far:
    the kernel ends the worker (SIGXCPU) if one file loops."""
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(_cpu_seconds_used()) + seconds + 1
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    return work(job)


def _worker_init(budget: int) -> None:
    """One thread per worker (the pool already uses every core), and the memory cap."""
    import torch

    torch.set_num_threads(1)
    limit_memory(budget)


def map_isolated(
    work: Callable[[Job], Result],
    jobs: Sequence[Job],
    *,
    workers: int,
    on_crash: Callable[[Job], Result],
    progress: Callable[[int], None] | None = None,
    memory_budget: int = WORKER_MEMORY_BUDGET,
    cpu_seconds: int = FILE_CPU_SECONDS,
) -> list[Result]:
    """`work` over `jobs` in worker processes, results in job order. A job whose worker dies
    twice (once among others, once alone) yields `on_crash(job)` instead."""
    work = functools.partial(_within_cpu_time, work, cpu_seconds)
    results: dict[int, Result] = {}
    pending = deque(range(len(jobs)))
    suspects: list[int] = []

    def finished(index: int, value: Result) -> None:
        results[index] = value
        if progress:
            progress(1)

    while pending:
        suspects.extend(
            _run_until_broken(work, jobs, pending, max(1, workers), memory_budget, finished)
        )
        for index in suspects:
            try:
                value = _run_alone(work, jobs[index], memory_budget)
            except BrokenProcessPool:
                logger.warning("file %d of %d: its decoder killed the worker", index, len(jobs))
                value = on_crash(jobs[index])
            finished(index, value)
        suspects.clear()
    return [results[i] for i in range(len(jobs))]


def _run_until_broken(
    work: Callable[[Job], Result],
    jobs: Sequence[Job],
    pending: deque[int],
    workers: int,
    memory_budget: int,
    finished: Callable[[int, Result], None],
) -> list[int]:
    """Runs pending jobs until they are done or a worker dies; the jobs that were in flight
    when it died (to be run again alone)."""
    with ProcessPoolExecutor(
        max_workers=workers, initializer=_worker_init, initargs=(memory_budget,)
    ) as pool:
        in_flight: dict[Future[Result], int] = {}
        while pending or in_flight:
            try:
                while pending and len(in_flight) < workers * IN_FLIGHT_PER_WORKER:
                    index = pending[0]
                    in_flight[pool.submit(work, jobs[index])] = index
                    pending.popleft()
            except BrokenProcessPool:
                return sorted(in_flight.values())
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    value = future.result()
                except BrokenProcessPool:
                    return sorted(in_flight.values())
                finished(in_flight.pop(future), value)
    return []


def _run_alone(work: Callable[[Job], Result], job: Job, memory_budget: int) -> Result:
    """One job in a process of its own; BrokenProcessPool when it dies there too."""
    with ProcessPoolExecutor(
        max_workers=1, initializer=_worker_init, initargs=(memory_budget,)
    ) as pool:
        return pool.submit(work, job).result()
