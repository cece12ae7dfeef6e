"""One timer (``Timings``/``measure``), one kernel timer (``kernel_ms``), one memory reader and a deadline for long
blocks; imports nothing of ours."""

from __future__ import annotations

import resource
import signal
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


def sync(device: str | torch.device | None = None) -> None:
    """Wait for queued device work so a host clock reads the real time."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


@dataclass
class Timings:
    """Named durations in seconds, filled in one place per stage (``with timings.stage("denoise"):``)."""

    seconds: dict[str, float] = field(default_factory=dict)
    device: str | None = None

    @contextmanager
    def stage(self, name: str):
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def total(self) -> float:
        return sum(self.seconds.values())

    def as_dict(self) -> dict[str, float]:
        return {**self.seconds, "total": self.total()}


def kernel_ms(fn, args: tuple, reps: int, device: str | torch.device) -> tuple[object, float, float]:
    """(output, first call s, median ms of ``reps`` later calls): CUDA events on a GPU, the wall clock elsewhere."""
    begin = time.perf_counter()
    out = fn(*args)
    sync(device)
    first, times = time.perf_counter() - begin, []
    cuda = torch.device(device).type == "cuda"
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(*args)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            begin = time.perf_counter()
            fn(*args)
            times.append(1000 * (time.perf_counter() - begin))
    return out, first, statistics.median(times)


class DeadlinePassed(TimeoutError):
    """Raised inside a ``deadline`` block when its time is up."""


@contextmanager
def deadline(seconds: float):
    """Interrupt the block after ``seconds`` of wall time with ``DeadlinePassed``, so a benchmark stopped by its
    budget still records what it measured (a compile that would outrun a machine's call limit, say). Main thread
    on POSIX only; elsewhere, or with ``seconds <= 0``, the block runs unguarded."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _passed(*_):
        raise DeadlinePassed(f"not done after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, _passed)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def rss_bytes() -> int:
    """Resident memory of this process now."""
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def measure(device: str | torch.device = "cpu"):
    """Wall time and memory of a block: CUDA peak allocation on a GPU, RSS growth on the CPU.

    Yields a dict filled on exit with ``seconds``, ``memory_bytes`` and ``memory_kind``.
    """
    out: dict = {}
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    start = time.perf_counter()
    try:
        yield out
    finally:
        sync(device)
        out["seconds"] = time.perf_counter() - start
        if cuda:
            out["memory_bytes"] = torch.cuda.max_memory_allocated() - base
            out["memory_kind"] = "cuda peak allocated"
        else:
            out["memory_bytes"] = max(0, rss_bytes() - base)
            out["memory_kind"] = "process RSS growth"


def peak_memory_bytes(device: str | torch.device | None = None, reserved: bool = False) -> int:
    """Peak memory of this process so far: CUDA peak allocation on a GPU (``reserved``: the caching
    allocator's peak reservation, what a card's limit is measured against), peak RSS on the CPU."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()
    return peak_rss_bytes()
