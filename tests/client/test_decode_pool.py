"""Worker isolation: a file whose decoder kills its process, or asks for more memory than the
worker's cap, costs that file only."""

from __future__ import annotations

import os
import resource
import signal

from fedrad.client.ingest.decode_pool import GIB, limit_memory, map_isolated


def _work(job: int) -> str:
    if job == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # a decoder bug, or the kernel's OOM killer
    if job == 5:
        try:
            bytearray(4 * GIB)  # more than the cap below
        except MemoryError:
            return "out of memory"
        return "allocated"
    return f"ok {job}"


def _spin(job: int) -> str:
    while job == 1:  # a decoder that loops
        pass
    return f"ok {job}"


def _crashed(job: int) -> str:
    return f"crashed {job}"


def test_a_crashing_file_costs_only_itself() -> None:
    seen: list[int] = []
    results = map_isolated(
        _work,
        list(range(10)),
        workers=2,
        on_crash=_crashed,
        progress=seen.append,
        memory_budget=GIB,
    )
    assert results[3] == "crashed 3"
    assert results[5] == "out of memory"
    assert [r for i, r in enumerate(results) if i not in (3, 5)] == [
        f"ok {i}" for i in range(10) if i not in (3, 5)
    ]
    assert len(seen) == 10


def test_a_looping_file_is_ended_by_its_cpu_time() -> None:
    results = map_isolated(_spin, [0, 1, 2], workers=2, on_crash=_crashed, cpu_seconds=1)
    assert results == ["ok 0", "crashed 1", "ok 2"]


def test_the_cap_is_the_current_size_plus_the_budget() -> None:
    """Run in a child so the test process keeps its own limit."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read)
        cap = limit_memory(GIB)
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        os.write(write, f"{cap} {soft}".encode())
        os._exit(0)
    os.close(write)
    cap, soft = (int(x) for x in os.read(read, 100).split())
    os.waitpid(pid, 0)
    assert cap == soft
    assert GIB < cap < 1024 * GIB
