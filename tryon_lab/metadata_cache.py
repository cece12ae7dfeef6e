"""A file cache of ``importlib.metadata.packages_distributions()``, for fresh processes on a serving image.

diffusers and transformers each build the map from import names to installed distributions while they are
imported (to see which optional packages are there): a walk over every installed distribution's file list.
On the H200 image (200 distributions) one walk took 0.54 s and a slim process makes two, inside its imports.
The map only changes when a package is installed or removed, and that changes the modification time of the
folder the package lives in, so the cache is keyed by ``sys.path`` and the modification times of its folders:
any install, removal or change of path makes it miss, and a miss computes the map as before and rewrites the file.

Call ``use(path)`` before the first import of diffusers or transformers (a serving script's first lines); write
the file at image build with ``write(path)``, as pip writes bytecode at install time.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

_ORIGINAL = importlib.metadata.packages_distributions


def path_key() -> list[list]:
    """``sys.path``'s folders with their modification times (ns): what a package install or removal changes."""
    return [[p, os.stat(p).st_mtime_ns] for p in sys.path if p and os.path.isdir(p)]


def write(path: str | Path) -> dict[str, list[str]]:
    """Compute the map (uncached) and write it with this process's key; returns the map."""
    mapping = _ORIGINAL()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # a reader never sees a half-written file
    tmp.write_text(json.dumps({"key": path_key(), "python": sys.version, "map": mapping}))
    os.replace(tmp, path)
    return mapping


def read(path: str | Path) -> dict[str, list[str]] | None:
    """The cached map, or None when the file is missing, unreadable or written for other folders or times."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if data.get("key") != path_key() or data.get("python") != sys.version:
        return None
    return data["map"]


def use(path: str | Path) -> dict:
    """Serve ``importlib.metadata.packages_distributions()`` from the cache at ``path`` in this process (written
    now if missing or stale); returns {"hit", "seconds"}. Each call gets its own copy of the map."""
    start = time.perf_counter()
    mapping = read(path)
    hit = mapping is not None
    if mapping is None:
        mapping = write(path)

    def packages_distributions() -> dict[str, list[str]]:
        return {k: list(v) for k, v in mapping.items()}

    packages_distributions.__doc__ = _ORIGINAL.__doc__
    importlib.metadata.packages_distributions = packages_distributions
    return {"hit": hit, "seconds": time.perf_counter() - start}


def restore() -> None:
    """Back to the uncached function (tests)."""
    importlib.metadata.packages_distributions = _ORIGINAL
