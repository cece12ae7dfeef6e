"""What a run records: the notebook-side helpers, portable paths, JSON files and the run's environment.

Records must not depend on where the checkout or the cache lives, so paths are written *portable*: relative to
the repo root when under it, ``<cache>/...`` when under the workbench cache (``provenance.cache_dir()``, which
``TRYON_LAB_CACHE`` moves), absolute otherwise. ``resolve_path`` turns them back into paths on this machine.

Hashes, the cache folder, the commit and the device name come from ``tryon_lab.provenance`` (imported where
needed: it imports torch, and notebooks that only save a PNG should not pay for that).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike
INPUTS_FILE, TOLERANCES_FILE = "_inputs.json", "_tolerances.json"
PACKAGES = ("torch", "diffusers", "transformers", "torchao", "peft", "papermill", "numpy")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
CACHE_PREFIX = "<cache>/"  # portable spelling of the workbench cache folder


# ----------------------------------------------------------------------------- JSON
def _jsonable(o: Any) -> Any:
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if hasattr(o, "item") and getattr(o, "size", 1) == 1:  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: PathLike, obj: Any) -> Path:
    """Write JSON atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=_jsonable)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def read_json(path: PathLike, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


# ----------------------------------------------------------------------------- portable paths
@lru_cache(maxsize=1)
def repo_root() -> Path:
    here = Path(__file__).resolve().parents[2]
    if (here / "pyproject.toml").exists():
        return here
    try:  # an installed (non-editable) package: the checkout we are run from
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        top = ""
    return Path(top) if top else Path.cwd()


def _roots() -> list[tuple[str, str]]:
    """(absolute folder, portable prefix), deepest first (a cache inside the checkout stays ``<cache>/``)."""
    from ..provenance import cache_dir

    pairs = {}
    for folder, prefix in ((repo_root(), ""), (cache_dir(), CACHE_PREFIX)):
        for form in (Path(os.path.abspath(folder)), Path(folder).resolve()):
            pairs[form.as_posix()] = prefix
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))


def portable_path(path: PathLike) -> str:
    """``path`` as a record keeps it: repo-relative, ``<cache>/...``, or absolute when under neither."""
    p = Path(os.path.abspath(path)).as_posix()
    for root, prefix in _roots():
        if p == root:
            return prefix.rstrip("/") or "."
        if p.startswith(root.rstrip("/") + "/"):
            return prefix + p[len(root.rstrip("/")) + 1:]
    return p


def resolve_path(recorded: str) -> Path:
    """A recorded (portable) path as a path on this machine."""
    if recorded.startswith(CACHE_PREFIX) or recorded == CACHE_PREFIX.rstrip("/"):
        from ..provenance import cache_dir

        return cache_dir() / recorded[len(CACHE_PREFIX):]
    return Path(recorded) if Path(recorded).is_absolute() else repo_root() / recorded


def portable_text(text: str) -> str:
    """Every absolute path under the repo root or the cache inside ``text`` written portably."""
    for root, prefix in _roots():
        text = text.replace(root.rstrip("/") + "/", prefix)
    return text


def portable_values(obj: Any) -> Any:
    """``portable_text`` on every string in a JSON-like structure (keys included)."""
    if isinstance(obj, str):
        return portable_text(obj) if "/" in obj else obj
    if isinstance(obj, Mapping):
        return {portable_values(k) if isinstance(k, str) else k: portable_values(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [portable_values(v) for v in obj]
    return obj


def _has_path(obj: Any) -> bool:
    if isinstance(obj, str):
        return "/" in obj
    if isinstance(obj, Mapping):
        return any(_has_path(k) or _has_path(v) for k, v in obj.items())
    return isinstance(obj, list | tuple) and any(_has_path(v) for v in obj)


def hash_inputs(paths: Sequence[str], cache: bool = True) -> dict[str, str | None]:
    """{portable path: sha256} of recorded input paths (folders recursed, hidden skipped; missing -> None)."""
    from ..provenance import file_hashes

    out: dict[str, str | None] = {}
    for recorded in paths:
        full = resolve_path(recorded)
        for k, v in file_hashes([full.as_posix()], cache=cache).items():
            rel = Path(k).relative_to(full).as_posix()
            out[recorded if rel == "." else f"{recorded.rstrip('/')}/{rel}"] = v
    return out


# ----------------------------------------------------------------------------- notebook-side helpers
def save_image(output_dir: PathLike, name: str, image: Any) -> Path:
    """Save a PIL image (or HxW[xC] uint8 array) as ``<output_dir>/<name>`` (.png unless suffixed)."""
    path = Path(output_dir) / name
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not hasattr(image, "save"):
        from PIL import Image

        image = Image.fromarray(image)
    image.save(path)
    return path


def save_metrics(output_dir: PathLike, metrics: Mapping[str, Any], name: str = "metrics") -> Path:
    """Write ``<output_dir>/<name>.json`` (numpy/torch scalars converted).

    Absolute paths under the repo root or the cache inside string values are written portably (e.g. a
    ``checkpoint.describe_model`` line), so the file is the same in every clone.
    """
    data = dict(metrics)
    return write_json(Path(output_dir) / f"{name}.json", portable_values(data) if _has_path(data) else data)


def record_inputs(output_dir: PathLike, paths: Mapping[str, PathLike | Sequence[PathLike]]) -> dict:
    """Fingerprint input files/folders (weights, embeddings, coefficient JSON) into ``_inputs.json``.

    Each input: ``{"paths": [portable path, ...], "files": {portable path: sha256}}``.
    """
    target = Path(output_dir) / INPUTS_FILE
    rec = read_json(target, {})
    for name, p in paths.items():
        listed = [portable_path(x) for x in ([p] if isinstance(p, str | os.PathLike) else p)]
        rec[name] = {"paths": listed, "files": hash_inputs(listed)}
    write_json(target, rec)
    return rec


def record_tolerances(output_dir: PathLike, tolerances: Mapping[str, Any]) -> dict:
    """Declare non-bit-exact comparisons for verify: image_psnr_min, metrics_rtol, metrics_ignore."""
    target = Path(output_dir) / TOLERANCES_FILE
    rec = {**read_json(target, {}), **tolerances}
    write_json(target, rec)
    return rec


# ----------------------------------------------------------------------------- environment
def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device() -> dict:
    import torch

    from ..provenance import device_name

    if torch.cuda.is_available():
        return {"type": "cuda", "name": device_name("cuda"), "count": torch.cuda.device_count(),
                "cuda": torch.version.cuda}
    return {"type": "cpu", "name": device_name("cpu")}


def device_text(device: Mapping[str, Any] | None) -> str:
    """A manifest's device as one readable line, e.g. ``2 x NVIDIA H200 (CUDA 12.8)``."""
    if not device:
        return "unknown device"
    name = str(device.get("name") or device.get("type") or "unknown device")
    if device.get("type") == "cuda":
        count = device.get("count") or 1
        return (f"{count} x " if count > 1 else "") + name + (f" (CUDA {device['cuda']})" if device.get("cuda") else "")
    return name if name.startswith("cpu") else f"cpu: {name}"


def environment() -> dict:
    """Git state, host, Python, key package versions and device of this process (``provenance`` for commit
    and device)."""
    from ..provenance import git_commit

    commit = git_commit()
    known = not commit.startswith("unknown")
    return {"git": {"commit": commit.removesuffix("-dirty") if known else None,
                    "dirty": commit.endswith("-dirty") if known else None},
            "host": socket.gethostname(), "python": platform.python_version(),
            "platform": platform.platform(), "packages": {p: _version(p) for p in PACKAGES},
            "device": _device()}
