"""Timers, memory readings and benchmark result files: one of each, imported everywhere."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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


def device_name(device: str | torch.device | None = None) -> str:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str:
    """The checkout's commit (+ '-dirty'); ``TRYON_LAB_COMMIT`` names it where the copy has no git history."""
    if os.environ.get("TRYON_LAB_COMMIT"):
        return os.environ["TRYON_LAB_COMMIT"]
    try:
        root = Path(__file__).resolve().parent.parent
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
        sha = res.stdout.strip() if res.returncode == 0 else ""
        if not sha:
            return "unknown (no git history in this copy)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def stamp(device: str | torch.device | None = None) -> dict:
    """Where and when a number was measured: device, commit, date, library versions."""
    import diffusers

    return {
        "device": device_name(device),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
    }


def write_results(path: str | Path, name: str, results: dict, table_md: str | None = None) -> Path:
    """Add one stamped benchmark entry to a JSON results file (keyed by name) and an optional markdown table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = results
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    if table_md is not None:
        path.with_name(f"{name}.md").write_text(table_md)
    return path


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = "{:.3g}") -> str:
    """A plain markdown table from a list of dicts (for notebooks and result files)."""
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(v):
        return floatfmt.format(v) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
