"""Provenance: one sha256 (with one on-disk cache), one model fingerprint, one stamp (git, versions, device).

Runs, benchmarks and the checkpoint code all use these, so a number and the files it came from are
described the same way everywhere. The hash cache lives under ``cache_dir()``, which ``TRYON_LAB_CACHE``
overrides (CI points it at a fresh folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".txt", ".model")
CARD_FILE = "tryon_lab_card.json"  # written beside trained weights by the trainer: how they were trained
CONFIG_FILE = "tryon_lab_config.json"  # an embedded model's shape (``checkpoint.SmallModelConfig``)
NOT_WEIGHTS = (CARD_FILE,)  # the card describes the weights; it is not part of them


def cache_dir() -> Path:
    """Where generated checkpoints and the file-hash cache live (``TRYON_LAB_CACHE`` overrides)."""
    root = os.environ.get("TRYON_LAB_CACHE") or Path.home() / ".cache" / "tryon_lab"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


_HASHES: dict[str, dict[str, str]] = {}  # cache file -> its entries, read once per process


def _hash_cache() -> tuple[Path, dict[str, str]]:
    path = cache_dir() / "file_hashes.json"
    if str(path) not in _HASHES:
        try:
            _HASHES[str(path)] = json.loads(path.read_text())
        except (OSError, ValueError):
            _HASHES[str(path)] = {}
    return path, _HASHES[str(path)]


def sha256_file(path: str | Path, cache: bool = True) -> str:
    """sha256 of a file, cached by (path, size, mtime) so large weight files are hashed once per machine."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_file, db = _hash_cache() if cache else (None, {})
    if key in db:
        return db[key]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if cache_file is not None:
        db[key] = digest
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(db))
            os.replace(tmp, cache_file)
        except OSError:  # a read-only cache folder costs only speed
            pass
    return digest


def file_hashes(paths: str | os.PathLike | Sequence, base: str | Path | None = None,
                cache: bool = True) -> dict[str, str | None]:
    """{path as given (folders recursed, hidden entries skipped): sha256}; a missing file maps to None.

    Keys are the paths as given, relative to ``base`` when they are relative, so a record made in one
    clone compares with one made in another.
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    out: dict[str, str | None] = {}
    for p in items:
        full = Path(p) if base is None or Path(p).is_absolute() else Path(base) / p
        if full.is_dir():
            for f in sorted(full.rglob("*")):
                rel = f.relative_to(full)
                if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                    out[(Path(p) / rel).as_posix()] = sha256_file(f, cache)
        else:
            out[Path(p).as_posix()] = sha256_file(full, cache) if full.is_file() else None
    return out


def fingerprint(folder: str | Path, subfolders: tuple[str, ...] | None = None) -> str:
    """One hash of every config and weight file under a model folder (or only the named subfolders).

    Built from paths relative to the folder and file hashes, so the same weights anywhere give the same
    fingerprint. A folder with no such files is an error, not the hash of nothing.
    """
    folder = Path(folder)
    roots = [folder / s for s in subfolders] if subfolders else [folder]
    files = sorted(p for root in roots for p in root.rglob("*")
                   if p.is_file() and p.suffix in FINGERPRINT_SUFFIXES and p.name not in NOT_WEIGHTS)
    if not files:
        raise FileNotFoundError(f"no model files (config or safetensors) under {folder}; nothing to fingerprint.")
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def device_name(device: str | torch.device | None = None) -> str:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str:
    """The checkout's commit (+ '-dirty'); ``TRYON_LAB_COMMIT`` names it where the copy has no git history."""
    if os.environ.get("TRYON_LAB_COMMIT"):
        return os.environ["TRYON_LAB_COMMIT"]
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        sha = res.stdout.strip() if res.returncode == 0 else ""
        if not sha:
            return "unknown (no git history in this copy)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


SOURCE_FOLDERS = ("tryon_lab", "scripts")


def _source_digest(files: Sequence[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


def source_hash() -> str:
    """16 hex digits over the Python sources of ``SOURCE_FOLDERS`` (path and bytes): names the code a result came
    from where the git metadata beside it is stale or missing (a copied working tree); ``source_hash_at(commit)``
    gives the same digits for a commit, so a reviewer can match a results file to the commit that made it."""
    return _source_digest([(f.relative_to(REPO_ROOT).as_posix(), f.read_bytes())
                           for folder in SOURCE_FOLDERS for f in (REPO_ROOT / folder).rglob("*.py")])


def source_hash_at(commit: str) -> str:
    """``source_hash`` of the sources as committed in ``commit`` (read from git, the working tree untouched)."""
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", commit, "--", *SOURCE_FOLDERS], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return _source_digest([(name, subprocess.run(["git", "show", f"{commit}:{name}"], cwd=REPO_ROOT,
                                                 capture_output=True, check=True).stdout)
                           for name in listed if name.endswith(".py")])


def portable(text: str) -> str:
    """Text for a committed results file: paths inside this checkout made relative to it, the home folder as ``~``
    (so a file says the same on every machine, and names no machine's folders)."""
    return text.replace(f"{REPO_ROOT}/", "").replace(f"{Path.home()}/", "~/")


def stamp(device: str | torch.device | None = None) -> dict:
    """Where and when a number was measured: device, commit, date, library versions."""
    import diffusers

    return {
        "device": device_name(device),
        "commit": git_commit(),
        "source": source_hash(),  # the code itself: ``source_hash_at(commit)`` finds its commit
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
    }


def report_probe(results: dict, device: str, out: str | Path | None = None) -> dict:
    """A probe's results, stamped: written to ``out`` as JSON when given, and printed as one ``PROBE {json}`` line
    (what a GPU call's log keeps when no file comes back)."""
    results = {"stamp": stamp(device), **results}
    if out:
        Path(out).write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    print("PROBE " + json.dumps(results, default=str), flush=True)
    return results


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
        path.with_name(f"{name}.md").write_text(table_md.rstrip("\n") + "\n")  # one final newline, as committed
    return path
