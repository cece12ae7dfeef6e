"""Out-of-memory recovery: a small leaf the pipeline and the logo pass import (no quantization, no planner).

- ``retry_with_vae_tiling``: a try-on stage retries once with VAE tiling.
- ``split_on_oom``: a batch is halved and retried, down to batches of one.
Each recovery is appended to the caller's ``recoveries`` list, so results say what happened.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error from any device (CUDA raises torch.OutOfMemoryError)."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_cached() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def retry_with_vae_tiling(fn: Callable[[], object], vae, recoveries: list[str], stage: str):
    """``fn()``; on out-of-memory, once: free the cache, turn VAE tiling on, run ``fn()`` again.

    Tiling stays on afterwards (the next request would run out the same way), and ``recoveries`` says so;
    that also makes it once: an out-of-memory with tiling already on is raised.
    """
    try:
        return fn()
    except Exception as e:
        if not is_oom(e) or getattr(vae, "use_tiling", False):  # tiling on already: nothing left to try here
            raise
        free_cached()
        vae.enable_tiling()
        recoveries.append(f"{stage}: out of memory; retried with VAE tiling (left on for later requests)")
        return fn()


def split_on_oom(run: Callable[[Sequence], list], items: Sequence, recoveries: list[str]) -> tuple[list, int]:
    """``run(items)`` as one batch; on out-of-memory, halves and retries each half, down to batches of one.

    Returns the outputs in order and the number of ``run`` calls made. One item that still runs out of
    memory is raised.
    """
    try:
        return list(run(items)), 1
    except Exception as e:
        if not is_oom(e) or len(items) <= 1:
            raise
        free_cached()
        half = (len(items) + 1) // 2
        recoveries.append(f"batch of {len(items)} out of memory; split into {half} + {len(items) - half}")
        first, n1 = split_on_oom(run, items[:half], recoveries)
        second, n2 = split_on_oom(run, items[half:], recoveries)
        return first + second, 1 + n1 + n2
