"""Headless notebook runs: manifests, sweeps, verification and notebook hygiene.

Notebook conventions
--------------------
* Notebooks live in ``notebooks/NN_name.ipynb``, paired with ``notebooks/NN_name.py`` (jupytext percent
  format, metadata ``jupytext: formats: ipynb,py:percent``) and are committed with outputs stripped
  (``python -m tryon_lab.runs sync --check`` enforces this; ``sync`` rewrites each .ipynb from its .py).
* The first code cell is tagged ``parameters``.  Every notebook declares ``output_dir`` (str) and usually
  ``seed``.  The runner injects only declared parameters (others are warned about and listed in the
  manifest as ``ignored_parameters``), sets ``output_dir`` to ``<run>/<NN_name>/`` and executes with the
  repo root as working directory.
* Notebooks record what they produce and use with the import-light helpers of this module:
  ``save_image(output_dir, name, image)``, ``save_metrics(output_dir, metrics, name="metrics")``,
  ``record_inputs(output_dir, {"transformer": "models/flux-fill", "coeffs": ["a.json", "b.json"]})``
  (sha256 of every file, folders recursed, hidden files skipped) and, for outputs that are not
  bit-exact (compiled, FP8), ``record_tolerances(output_dir, {"image_psnr_min": 40.0,
  "metrics_rtol": 1e-3, "metrics_ignore": ["*_ms", "peak_mem_*"]})``.  Timings belong in
  ``metrics_ignore`` (fnmatch patterns on dotted keys), otherwise a re-run can never match.

Run folder: ``runs/<YYYY-MM-DD-HHMMSS>-<name>/`` with ``manifest.json``, ``index.html`` and per notebook
``<NN_name>/`` holding ``<NN_name>.ipynb`` (executed, partial on failure), ``<NN_name>.html``, the record
files ``_inputs.json`` / ``_tolerances.json`` and whatever the notebook wrote to ``output_dir``.
A sweep folder holds one such run per grid point plus ``sweep.json``, ``summary.csv``, ``summary.md``.

``manifest.json`` (rewritten atomically after every notebook)::

    {"format": 1, "name", "created", "finished", "command", "status": running|ok|failed|interrupted,
     "git": {"commit", "dirty"}, "host", "python", "platform",
     "packages": {"torch": "2.6.0" | null, ...}, "device": {"type": "cuda"|"cpu", "name", ...},
     "notebooks": [{"notebook", "stem", "dir", "notebook_sha256",
                    "status": pending|running|ok|failed|interrupted, "parameters" (as injected),
                    "ignored_parameters", "duration_s", "error", "traceback",
                    "inputs": {name: {"paths": [...], "files": {path: sha256 | null}}},
                    "tolerances": {...}, "outputs": {relative path: sha256}}]}
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import fnmatch
import hashlib
import html
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike
INPUTS_FILE, TOLERANCES_FILE = "_inputs.json", "_tolerances.json"
PACKAGES = ("torch", "diffusers", "transformers", "torchao", "peft", "papermill", "numpy")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
HASH_CACHE_MIN_BYTES = 64 << 20  # only big files (weights) go through the on-disk hash cache


# ----------------------------------------------------------------------------- hashing & JSON
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


def _hash_cache_path() -> Path | None:
    env = os.environ.get("TRYON_LAB_HASH_CACHE")
    if env is not None:
        return Path(env) if env else None
    return Path.home() / ".cache" / "tryon_lab" / "sha256.json"


def sha256_file(path: PathLike, cache: bool = True) -> str:
    """sha256 of a file; files >= 64 MiB are cached by (path, size, mtime_ns) unless cache=False."""
    path = Path(path)
    st = path.stat()
    cache_file = _hash_cache_path() if cache and st.st_size >= HASH_CACHE_MIN_BYTES else None
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    db = read_json(cache_file, {}) if cache_file else {}
    if key in db:
        return db[key]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if cache_file:
        try:
            write_json(cache_file, {**read_json(cache_file, {}), key: digest})
        except OSError:
            pass
    return digest


def fingerprint(paths: PathLike | Sequence[PathLike], base: PathLike | None = None,
                cache: bool = True) -> dict[str, str | None]:
    """{path: sha256} for each file (folders recursed, hidden entries skipped); missing -> None."""
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
    """Write ``<output_dir>/<name>.json`` (numpy/torch scalars converted)."""
    return write_json(Path(output_dir) / f"{name}.json", dict(metrics))


def record_inputs(output_dir: PathLike, paths: Mapping[str, PathLike | Sequence[PathLike]]) -> dict:
    """Fingerprint input files/folders (weights, embeddings, coefficient JSON) into ``_inputs.json``."""
    target = Path(output_dir) / INPUTS_FILE
    rec = read_json(target, {})
    for name, p in paths.items():
        listed = [_rel(Path(x)) for x in ([p] if isinstance(p, str | os.PathLike) else p)]
        rec[name] = {"paths": listed, "files": fingerprint(listed, base=repo_root())}
    write_json(target, rec)
    return rec


def record_tolerances(output_dir: PathLike, tolerances: Mapping[str, Any]) -> dict:
    """Declare non-bit-exact comparisons for verify: image_psnr_min, metrics_rtol, metrics_ignore."""
    target = Path(output_dir) / TOLERANCES_FILE
    rec = {**read_json(target, {}), **tolerances}
    write_json(target, rec)
    return rec


# ----------------------------------------------------------------------------- environment
@lru_cache(maxsize=1)
def repo_root() -> Path:
    here = Path(__file__).resolve().parents[1]
    if (here / "pyproject.toml").exists():
        return here
    top = _git("rev-parse", "--show-toplevel", cwd=Path.cwd())
    return Path(top) if top else Path.cwd()


def _git(*args: str, cwd: Path | None = None) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=cwd or repo_root(), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def _device_info() -> tuple[tuple[str, Any], ...]:
    if importlib.util.find_spec("torch") is not None:
        try:
            import torch

            if torch.cuda.is_available():
                smi = shutil.which("nvidia-smi")
                drv = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=30).stdout if smi else ""
                return (("type", "cuda"), ("name", torch.cuda.get_device_name(0)),
                        ("count", torch.cuda.device_count()), ("cuda", torch.version.cuda),
                        ("driver", drv.strip().splitlines()[0] if drv.strip() else None))
        except Exception as e:  # a broken CUDA setup must not stop a run
            warnings.warn(f"device query failed: {e}", stacklevel=2)
    return (("type", "cpu"), ("name", _cpu_name()))


def environment() -> dict:
    """Git state, host, Python, key package versions and device of this process."""
    status = _git("status", "--porcelain")
    return {"git": {"commit": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)},
            "host": socket.gethostname(), "python": platform.python_version(),
            "platform": platform.platform(), "packages": {p: _version(p) for p in PACKAGES},
            "device": dict(_device_info())}


# ----------------------------------------------------------------------------- running
@dataclass
class Job:
    notebook: Path
    params: dict = field(default_factory=dict)


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "-", s).strip("-") or "run"


def _rel(p: Path) -> str:
    """Repo-relative posix path when under the repo root, else absolute (symlinks not followed)."""
    p = Path(os.path.abspath(p))
    try:
        return p.relative_to(repo_root()).as_posix()
    except ValueError:
        return p.as_posix()


def _new_dir(root: PathLike, name: str) -> Path:
    root = Path(root) if Path(root).is_absolute() else repo_root() / root
    base, i = f"{dt.datetime.now():%Y-%m-%d-%H%M%S}-{_slug(name)}", 1
    while True:
        d = root / (base if i == 1 else f"{base}-{i}")
        try:
            d.mkdir(parents=True)
            return d
        except FileExistsError:
            i += 1


def resolve_notebooks(notebooks: Sequence[PathLike]) -> list[Path]:
    """Resolve paths against cwd, then the repo root; ``x.py`` maps to its paired ``x.ipynb``."""
    out = []
    for nb in notebooks:
        p = Path(nb)
        if not p.is_absolute():
            p = Path.cwd() / p if (Path.cwd() / p).exists() else repo_root() / p
        if p.suffix == ".py" and p.with_suffix(".ipynb").exists():
            p = p.with_suffix(".ipynb")
        if not p.is_file():
            raise FileNotFoundError(f"notebook not found: {nb}")
        out.append(p.resolve())
    return out


def all_notebooks() -> list[Path]:
    return sorted((repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def notebook_params(params: Mapping[str, Any], stem: str, stems: Sequence[str]) -> dict:
    """Global keys plus the per-notebook section ``params[stem]`` (sections are keyed by notebook stem)."""
    out = {k: v for k, v in params.items() if k != "grid" and not (k in stems and isinstance(v, dict))}
    return {**out, **(params[stem] if isinstance(params.get(stem), dict) else {})}


def merge_params(base: Mapping[str, Any], overrides: Mapping[str, Any], stems: Sequence[str]) -> dict:
    """Overrides (CLI ``-p``, grid points) win over global keys and over per-notebook sections."""
    out = {k: ({kk: vv for kk, vv in v.items() if kk not in overrides} if k in stems and isinstance(v, dict)
               else v) for k, v in base.items()}
    return {**out, **overrides}


def _describe(e: BaseException) -> tuple[str, str]:
    if hasattr(e, "ename") and hasattr(e, "traceback"):  # papermill.PapermillExecutionError
        tb = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(e.traceback))
        return f"{e.ename}: {e.evalue} (cell [{e.exec_count}])", "\n".join(tb.splitlines()[-30:])
    return f"{type(e).__name__}: {e}", "".join(traceback.format_exception(e)[-10:])


@lru_cache(maxsize=1)
def _html_exporter() -> Any:
    from nbconvert import HTMLExporter

    return HTMLExporter()


def _execute(job: Job, nb_dir: Path, entry: dict, kernel: str, progress: bool) -> None:
    """Run one notebook into ``nb_dir`` and fill ``entry`` with status, error, records and outputs."""
    import papermill

    stem, executed, t0 = job.notebook.stem, nb_dir / f"{job.notebook.stem}.ipynb", time.monotonic()
    nb_dir.mkdir(parents=True, exist_ok=True)
    try:
        declared = papermill.inspect_notebook(str(job.notebook))
        params = {**job.params, "output_dir": str(nb_dir)}
        injected = {k: v for k, v in params.items() if k in declared}
        entry.update(parameters=injected, ignored_parameters=sorted(set(params) - set(declared)))
        if entry["ignored_parameters"]:
            warnings.warn(f"{stem}: not declared in its parameters cell, not injected: "
                          f"{', '.join(entry['ignored_parameters'])}", stacklevel=3)
        papermill.execute_notebook(str(job.notebook), str(executed), parameters=injected, kernel_name=kernel,
                                   progress_bar=progress, cwd=str(repo_root()))
        entry["status"] = "ok"
    except KeyboardInterrupt:
        entry["status"], entry["error"] = "interrupted", "KeyboardInterrupt"
        raise
    except Exception as e:
        entry["error"], entry["traceback"] = _describe(e)
        if getattr(e, "ename", None) == "KeyboardInterrupt":  # Ctrl-C reached the kernel too
            entry["status"] = "interrupted"
            raise KeyboardInterrupt from e
        entry["status"] = "failed"
    finally:
        entry["duration_s"] = round(time.monotonic() - t0, 3)
        if executed.exists():
            try:
                executed.with_suffix(".html").write_text(_html_exporter().from_filename(str(executed))[0])
            except Exception as e:
                warnings.warn(f"{stem}: HTML export failed: {e}", stacklevel=3)
        entry["inputs"] = read_json(nb_dir / INPUTS_FILE, {})
        entry["tolerances"] = read_json(nb_dir / TOLERANCES_FILE, {})
        entry["outputs"] = _output_hashes(nb_dir, stem)


def _output_hashes(nb_dir: Path, stem: str) -> dict[str, str]:
    skip = {f"{stem}.ipynb", f"{stem}.html", INPUTS_FILE, TOLERANCES_FILE}
    files = (f for f in sorted(nb_dir.rglob("*")) if f.is_file())
    return {f.relative_to(nb_dir).as_posix(): sha256_file(f, cache=False) for f in files
            if not any(p.startswith(".") for p in f.relative_to(nb_dir).parts)
            and f.relative_to(nb_dir).as_posix() not in skip}


def _run_in(run_dir: Path, jobs: Sequence[Job], name: str, kernel: str, progress: bool,
            command: str | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """Execute ``jobs`` one after another into ``run_dir``; returns the manifest (also written)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dirs = [j.notebook.stem if [x.notebook.stem for x in jobs[:i]].count(j.notebook.stem) == 0
            else f"{j.notebook.stem}-{i}" for i, j in enumerate(jobs)]
    manifest = {"format": 1, "name": name, "created": _now(), "finished": None,
                "command": command or shlex.join(sys.argv), "status": "running", **(extra or {}),
                **environment(),
                "notebooks": [{"notebook": _rel(j.notebook), "stem": j.notebook.stem, "dir": d,
                               "notebook_sha256": sha256_file(j.notebook, cache=False), "status": "pending"}
                              for j, d in zip(jobs, dirs, strict=True)]}
    write_json(run_dir / "manifest.json", manifest)
    try:
        for job, entry in zip(jobs, manifest["notebooks"], strict=True):
            entry.update(status="running", parameters=None, ignored_parameters=None, error=None, traceback=None)
            write_json(run_dir / "manifest.json", manifest)
            try:
                _execute(job, run_dir / entry["dir"], entry, kernel, progress)
            finally:
                write_json(run_dir / "manifest.json", manifest)
        manifest["status"] = "ok" if all(e["status"] == "ok" for e in manifest["notebooks"]) else "failed"
    except KeyboardInterrupt:
        manifest["status"] = "interrupted"
        print(f"interrupted; partial run in {run_dir}", file=sys.stderr)
        raise
    finally:
        manifest["finished"] = _now()
        write_json(run_dir / "manifest.json", manifest)
        _write_index(run_dir, manifest)
    return manifest


def _jobs(paths: Sequence[Path], params: Mapping[str, Any]) -> list[Job]:
    stems = [p.stem for p in paths]
    return [Job(p, notebook_params(params, p.stem, stems)) for p in paths]


def run(notebooks: Sequence[PathLike], params: Mapping[str, Any] | None = None, name: str = "run",
        runs_root: PathLike = "runs", kernel: str = "python3", progress: bool = True,
        command: str | None = None) -> Path:
    """Run notebooks headlessly into ``<runs_root>/<YYYY-MM-DD-HHMMSS>-<name>/``; returns that folder.

    ``params`` holds global keys plus optional per-notebook sections keyed by notebook stem.  A failing
    notebook is recorded and the rest still run; check ``manifest.json``'s ``status``.
    """
    paths = resolve_notebooks(notebooks)
    run_dir = _new_dir(runs_root, name)
    _run_in(run_dir, _jobs(paths, params or {}), name, kernel, progress, command)
    return run_dir


def expand_grid(grid: Mapping[str, Any]) -> list[dict]:
    """Cartesian product of the grid values, first key varying slowest."""
    values = [list(v) if isinstance(v, list | tuple) else [v] for v in grid.values()]
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*values)]


def sweep(notebooks: Sequence[PathLike], base_params: Mapping[str, Any] | None, grid: Mapping[str, Any],
          name: str = "sweep", runs_root: PathLike = "runs", kernel: str = "python3", progress: bool = True,
          command: str | None = None, executor: str = "local", ray_address: str | None = None) -> Path:
    """One sub-run per grid point in one sweep folder, plus summary.csv / summary.md.

    ``executor="local"`` runs the points one after another; ``"ray"`` runs each as a Ray task (one GPU each) on
    a local Ray instance or the cluster at ``ray_address`` (see ``parallel.run_sweep_ray``): same folders.
    """
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    paths = resolve_notebooks(notebooks)
    stems = [p.stem for p in paths]
    sweep_dir = _new_dir(runs_root, name)
    record = {"format": 1, "name": name, "created": _now(), "command": command or shlex.join(sys.argv),
              "grid": dict(grid), "base_params": dict(base_params or {}), "executor": executor, "points": []}
    points = [(f"{i:03d}-" + _slug("-".join(f"{k}={v}" for k, v in point.items()))[:80], point,
               _jobs(paths, merge_params(base_params or {}, point, stems))) for i, point in enumerate(expand_grid(grid))]
    try:
        if executor == "ray":
            from .parallel import run_sweep_ray

            record["points"] = [{"params": point, "run": sub} for sub, point, _ in points]
            write_json(sweep_dir / "sweep.json", record)
            errors = run_sweep_ray(sweep_dir, name, points, kernel, command, ray_address, progress=progress)
            for pt in record["points"]:
                pt.update({"error": errors[pt["run"]]} if pt["run"] in errors else {})
        else:
            for sub, point, jobs in points:
                record["points"].append({"params": point, "run": sub})
                write_json(sweep_dir / "sweep.json", record)
                _run_in(sweep_dir / sub, jobs, f"{name}/{sub}", kernel, progress, command, {"sweep_point": point})
    finally:
        for pt in record["points"]:
            pt["status"] = read_json(sweep_dir / pt["run"] / "manifest.json", {}).get("status", "missing")
            if pt.get("error") and pt["status"] != "failed":  # a worker lost twice leaves no finished manifest
                pt["status"] = "failed"
        write_json(sweep_dir / "sweep.json", record)
        _write_summary(sweep_dir, record)
    return sweep_dir


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif v is None or isinstance(v, bool | int | float | str):
            out[f"{prefix}{k}"] = v
    return out


def _write_summary(sweep_dir: Path, record: dict) -> None:
    rows = []
    for pt in record["points"]:
        m = read_json(sweep_dir / pt["run"] / "manifest.json", {})
        row = {"run": pt["run"], **pt["params"], "status": pt.get("status")}
        nbs = m.get("notebooks", [])
        for e in nbs:
            for f in (f for f in e.get("outputs", {}) if f.endswith(".json")):
                tag = ("" if len(nbs) == 1 else f"{e['stem']}.") + ("" if f == "metrics.json" else f[:-5] + ".")
                data = read_json(sweep_dir / pt["run"] / e["dir"] / f, {})
                row.update({tag + k: v for k, v in _flatten(data if isinstance(data, dict) else {}).items()})
        rows.append(row)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)

    def cell(v: Any) -> str:
        return ("" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)).replace("|", "\\|")

    md = [f"# Sweep {record['name']}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    (sweep_dir / "summary.md").write_text("\n".join(md) + "\n")
    links = [[f'<a href="{html.escape(r["run"])}/index.html">{html.escape(r["run"])}</a>']
             + [html.escape(cell(r.get(c))) for c in cols[1:]] for r in rows]
    _write_html(sweep_dir / "index.html", f"Sweep {record['name']}", [f"created {record['created']}"],
                cols, links)


def _write_html(path: Path, title: str, info: Sequence[str], cols: Sequence[str],
                rows: Sequence[Sequence[str]]) -> None:
    """Small static page; ``rows`` cells are already-escaped HTML."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    path.write_text(f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px 8px}"
                    "table{border-collapse:collapse}.failed,.interrupted{color:#b00}.ok{color:#070}</style>"
                    f"<h1>{html.escape(title)}</h1>" + "".join(f"<p>{html.escape(i)}</p>" for i in info)
                    + f"<table><tr>{head}</tr>{body}</table>\n")


def _write_index(run_dir: Path, m: dict) -> None:
    def link(rel: str, text: str) -> str:
        return f'<a href="{html.escape(rel)}">{html.escape(text)}</a>' if (run_dir / rel).exists() else ""

    rows = [[link(f"{e['dir']}/{e['stem']}.html", e["stem"]) or html.escape(e["stem"]),
             f"<span class='{e['status']}'>{e['status']}</span>", str(e.get("duration_s", "")),
             link(f"{e['dir']}/{e['stem']}.ipynb", "ipynb"), html.escape(e.get("error") or "")]
            for e in m["notebooks"]]
    info = [f"status {m['status']}, created {m['created']}, finished {m['finished']}",
            f"git {m['git']['commit']} (dirty: {m['git']['dirty']}), {m['host']}, {m['device']}",
            f"command: {m['command']}"]
    _write_html(run_dir / "index.html", f"Run {m['name']}", info,
                ["notebook", "status", "duration_s", "executed", "error"], rows)


# ----------------------------------------------------------------------------- verify
def _psnr(a: Path, b: Path) -> float:
    from PIL import Image

    from .metrics import psnr  # the workbench's one PSNR (imported late: runs stays import-light)

    with Image.open(a) as ia, Image.open(b) as ib:
        if ia.mode != ib.mode or ia.size != ib.size:
            return -math.inf
        return psnr(ia.convert("RGB"), ib.convert("RGB"))


def _json_diff(a: Any, b: Any, rtol: float, ignore: Sequence[str], key: str = "") -> list[str]:
    if any(fnmatch.fnmatch(key, pat) for pat in ignore):
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b))
                for d in _json_diff(a.get(k), b.get(k), rtol, ignore, f"{key}.{k}" if key else k)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _json_diff(x, y, rtol, ignore, f"{key}[{i}]")]
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        return [] if math.isclose(a, b, rel_tol=rtol) else [f"{key}: {a} -> {b}"]
    return [] if a == b else [f"{key}: {a!r} -> {b!r}"]


def compare_output(name: str, old: Path, new: Path, recorded_sha: str, new_sha: str,
                   tol: Mapping[str, Any]) -> str:
    """One report line comparing a recorded output with its re-run; FAIL lines start with 'FAIL'."""
    if recorded_sha == new_sha:
        return f"ok    {name} (bit-exact: matches the recorded sha256)"
    use_psnr = old.suffix.lower() in IMAGE_SUFFIXES and "image_psnr_min" in tol
    use_json = old.suffix == ".json" and ("metrics_rtol" in tol or "metrics_ignore" in tol)
    if not (use_psnr or use_json):
        return f"FAIL  regression: {name} differs (bit-exact expected)"
    if not old.is_file() or sha256_file(old, cache=False) != recorded_sha:
        return f"FAIL  cannot compare {name}: recorded file changed or missing"
    if use_psnr:
        p, lim = _psnr(old, new), float(tol["image_psnr_min"])
        return f"{'ok   ' if p >= lim else 'FAIL  regression:'} {name} PSNR {p:.2f} dB (min {lim})"
    diffs = _json_diff(read_json(old), read_json(new), float(tol.get("metrics_rtol", 0.0)),
                       list(tol.get("metrics_ignore", [])))
    if not diffs:
        return f"ok    {name} (within metrics_rtol={tol.get('metrics_rtol', 0.0)})"
    return f"FAIL  regression: {name} values differ: " + "; ".join(diffs[:8])


def verify(run_dir: PathLike, kernel: str = "python3", progress: bool = False,
           keep: bool = False) -> tuple[bool, str]:
    """Re-run a recorded run with its recorded parameters and compare against it.

    Inputs are re-hashed first (a changed input is reported as ``input changed``, and that notebook is
    not re-run); recorded outputs must still hash as in the manifest (else ``output modified after
    run``); re-run outputs must be bit-exact, or within the notebook's recorded tolerances.  The re-run
    goes to the sibling ``<run>.verify/`` (removed when everything passed, unless ``keep``).  A sweep
    folder verifies each of its runs.
    """
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "manifest.json").is_file():
        subs = sorted(p.parent for p in run_dir.glob("*/manifest.json") if not p.parent.name.endswith(".verify"))
        if not subs:
            return False, f"FAIL  no manifest.json in {run_dir}"
        results = [verify(s, kernel, progress, keep) for s in subs]
        return all(ok for ok, _ in results), "\n\n".join(r for _, r in results)
    m = read_json(run_dir / "manifest.json")
    env = environment()
    lines = [f"verify {run_dir}"] + [
        f"  {when:<9} git {x['git']['commit']} dirty={x['git']['dirty']} on {x['host']}, "
        f"{x['device'].get('type')}: {x['device'].get('name')}" for when, x in (("recorded:", m), ("now:", env))]
    checks: dict[str, list[str]] = {}
    jobs, pairs = [], []
    for e in m["notebooks"]:
        msgs = checks.setdefault(e["dir"], [])
        if e["status"] != "ok":
            msgs.append(f"FAIL  cannot verify: status in recorded run was {e['status']}")
        for f, sha in e.get("outputs", {}).items():
            p = run_dir / e["dir"] / f
            if not p.is_file() or sha256_file(p, cache=False) != sha:
                msgs.append(f"FAIL  output modified after run: {e['dir']}/{f}"
                            + ("" if p.is_file() else " (missing)"))
        changed = False
        for iname, rec in e.get("inputs", {}).items():
            now = fingerprint(rec["paths"], base=repo_root(), cache=False)
            for path in sorted(set(now) | set(rec["files"])):
                if now.get(path) != rec["files"].get(path):
                    changed = True
                    why = " (missing)" if now.get(path) is None else " (new file)" if path not in rec["files"] else ""
                    msgs.append(f"FAIL  input changed: {iname} {path}{why}")
        nb = Path(e["notebook"]) if Path(e["notebook"]).is_absolute() else repo_root() / e["notebook"]
        if not nb.is_file():
            msgs.append(f"FAIL  notebook missing: {e['notebook']}")
        elif changed or e["status"] != "ok":
            msgs.append("skip  re-run (see above)")
        else:
            if sha256_file(nb, cache=False) != e.get("notebook_sha256"):
                msgs.append(f"note  {e['notebook']} changed since the recorded run")
            params = {k: v for k, v in e["parameters"].items() if k != "output_dir"}
            jobs.append(Job(nb, params))
            pairs.append(e)
    out = run_dir.parent / f"{run_dir.name}.verify"
    if jobs:
        shutil.rmtree(out, ignore_errors=True)
        new = _run_in(out, jobs, f"verify {m['name']}", kernel, progress, extra={"verify_of": str(run_dir)})
        for e, n in zip(pairs, new["notebooks"], strict=True):
            msgs = checks[e["dir"]]
            if n["status"] != "ok":
                msgs.append(f"FAIL  regression: re-run {n['status']}: {n.get('error')}")
                continue
            old_o, new_o = e.get("outputs", {}), n["outputs"]
            for f in sorted(set(old_o) | set(new_o)):
                if f not in new_o:
                    msgs.append(f"FAIL  regression: {f} not produced by the re-run")
                elif f not in old_o:
                    msgs.append(f"FAIL  regression: {f} is new (not in the recorded run)")
                else:
                    msgs.append(compare_output(f, run_dir / e["dir"] / f, out / n["dir"] / f, old_o[f], new_o[f],
                                               e.get("tolerances", {})))
    fails = sum(msg.startswith("FAIL") for msgs in checks.values() for msg in msgs)
    for d, msgs in checks.items():
        bad = any(msg.startswith("FAIL") for msg in msgs)
        lines += [f"[{d}] {'FAILED' if bad else 'OK'}"] + [f"  {msg}" for msg in msgs]
    if jobs and (fails or keep):
        lines.append(f"re-run kept in {out}")
    elif jobs:
        shutil.rmtree(out, ignore_errors=True)
    lines.append(f"RESULT: {'OK' if not fails else f'FAILED ({fails} problem(s))'}")
    return not fails, "\n".join(lines)


# ----------------------------------------------------------------------------- notebook hygiene
def _cells(nb: Any) -> list[tuple]:
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", []))) for c in nb.cells]


def _problems(nb: Any, paired: Any) -> list[str]:
    out = []
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code" and c.get("outputs"):
            out.append(f"cell {i} has outputs")
        if c.cell_type == "code" and c.get("execution_count") is not None:
            out.append(f"cell {i} has an execution count")
    if "py:percent" not in str(nb.metadata.get("jupytext", {}).get("formats", "")):
        out.append("metadata lacks jupytext formats ipynb,py:percent")
    code = [c for c in nb.cells if c.cell_type == "code"]
    if not code or "parameters" not in code[0].metadata.get("tags", []):
        out.append("first code cell is not tagged 'parameters'")
    if _cells(nb) != _cells(paired):
        out.append("out of sync with its paired .py")
    return out


def sync_notebooks(check: bool = True, notebooks_dir: PathLike | None = None) -> list[str]:
    """check=True: problems (outputs, execution counts, unpaired, out of sync), empty if clean.
    check=False: rewrite each problematic .ipynb from its .py, stripped (pairing a lone .ipynb first)."""
    import jupytext

    d = Path(notebooks_dir) if notebooks_dir else repo_root() / "notebooks"
    msgs = []
    for stem in sorted({p.stem for p in d.glob("*.ipynb")} | {p.stem for p in d.glob("[0-9][0-9]_*.py")}):
        ipynb, py = d / f"{stem}.ipynb", d / f"{stem}.py"
        if not py.exists():
            if check:
                msgs.append(f"{ipynb.name}: no paired {py.name}")
                continue
            jupytext.write(jupytext.read(ipynb), py, fmt="py:percent")
            msgs.append(f"wrote {py.name} from {ipynb.name}")
        src = jupytext.read(py)
        src.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
        problems = _problems(jupytext.read(ipynb), src) if ipynb.exists() else ["missing (paired .py exists)"]
        if check:
            msgs += [f"{ipynb.name}: {p}" for p in problems]
        elif problems:
            for c in src.cells:
                if c.cell_type == "code":
                    c.outputs, c.execution_count = [], None
            jupytext.write(src, ipynb, fmt="ipynb")
            msgs.append(f"wrote {ipynb.name} from {py.name} ({'; '.join(problems)})")
    return msgs


# ----------------------------------------------------------------------------- CLI
def parse_value(text: str) -> Any:
    """YAML scalar parsing (``4`` -> int, ``true`` -> bool), plus ``1e-3`` -> float."""
    import yaml

    v = yaml.safe_load(text) if text.strip() else ""
    if isinstance(v, str):
        try:
            return float(text)
        except ValueError:
            return v
    return v


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), v


def _cmd_run(a: argparse.Namespace) -> int:
    import yaml

    if bool(a.all) == bool(a.notebooks):
        raise SystemExit("give notebook paths or --all (not both)")
    paths = all_notebooks() if a.all else resolve_notebooks(a.notebooks)
    if not paths:
        raise SystemExit(f"no notebooks match {repo_root() / 'notebooks'}/[0-9][0-9]_*.ipynb")
    stems = [p.stem for p in paths]
    file_params = (yaml.safe_load(Path(a.params_file).read_text()) or {}) if a.params_file else {}
    grid = dict(file_params.pop("grid", None) or {})
    grid.update({k: [parse_value(x) for x in v.split(",")] for k, v in a.grid})
    params = merge_params(file_params, {k: parse_value(v) for k, v in a.param}, stems)
    name = a.name or ("all" if a.all else stems[0] if len(stems) == 1 else a.cmd)
    common = dict(name=name, runs_root=a.runs_root, kernel=a.kernel, progress=not a.no_progress,
                  command=shlex.join(["python", "-m", "tryon_lab.runs", *a.argv]))
    if a.cmd == "sweep":
        if not grid:
            raise SystemExit("sweep needs --grid key=v1,v2 or a grid: section in --params-file")
        out = sweep(paths, params, grid, **common, executor="local" if a.ray is None else "ray",
                    ray_address=a.ray or None)
        statuses = [(pt["run"], pt["status"]) for pt in read_json(out / "sweep.json")["points"]]
    else:
        if grid:
            raise SystemExit("--grid / grid: given; use the sweep command")
        out = run(paths, params, **common)
        statuses = [(e["stem"], e["status"] + (f"  {e['error']}" if e.get("error") else ""))
                    for e in read_json(out / "manifest.json")["notebooks"]]
    for what, status in statuses:
        print(f"  {what}: {status}")
    print(f"run folder: {out}")
    print(f"open this: {(out / 'index.html').as_uri()}")
    return 0 if all(s.startswith("ok") for _, s in statuses) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run | sweep | verify | sync (see ``--help``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="tryon-runs", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("run", "sweep"):
        p = sub.add_parser(cmd, help="run notebooks headlessly into runs/" if cmd == "run"
                           else "one run per --grid point, plus summary.csv / summary.md")
        p.add_argument("notebooks", nargs="*")
        p.add_argument("--all", action="store_true", help="every notebooks/[0-9][0-9]_*.ipynb in order")
        p.add_argument("-p", "--param", action="append", type=_kv, default=[], metavar="KEY=VALUE")
        p.add_argument("--params-file", help="YAML: global keys, per-notebook sections, optional grid:")
        p.add_argument("--grid", action="append", type=_kv, default=[], metavar="KEY=V1,V2")
        p.add_argument("--name")
        p.add_argument("--runs-root", default="runs")
        p.add_argument("--kernel", default="python3")
        p.add_argument("--no-progress", action="store_true")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the points as Ray tasks, one GPU each: on a new local Ray instance, or on the cluster at "
                   "ADDRESS ('auto': the one running here); put it after the notebooks or write --ray=ADDRESS")
    p = sub.add_parser("verify", help="re-run a recorded run and compare")
    p.add_argument("run_dir")
    p.add_argument("--kernel", default="python3")
    p.add_argument("--keep", action="store_true", help="keep the <run>.verify folder even on success")
    p.add_argument("--progress", action="store_true")
    p = sub.add_parser("sync", help="check / rewrite paired, stripped notebooks")
    p.add_argument("--check", action="store_true")
    p.add_argument("--dir", default=None)
    a = ap.parse_args(argv)
    a.argv = argv
    try:
        if a.cmd == "verify":
            ok, report = verify(a.run_dir, a.kernel, a.progress, a.keep)
            print(report)
            return 0 if ok else 1
        if a.cmd == "sync":
            msgs = sync_notebooks(check=a.check, notebooks_dir=a.dir)
            print("\n".join(msgs) or "notebooks are paired and stripped")
            return 1 if a.check and msgs else 0
        return _cmd_run(a)
    except KeyboardInterrupt:
        print("interrupted; the manifest records where", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
