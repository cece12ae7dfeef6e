"""Running notebooks headlessly with papermill: parameters, manifests and each run's ``index.html``."""

from __future__ import annotations

import datetime as dt
import difflib
import html
import re
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .record import (
    INPUTS_FILE,
    TOLERANCES_FILE,
    PathLike,
    device_text,
    environment,
    portable_path,
    read_json,
    repo_root,
    write_json,
)

MANIFEST_FORMAT = 2  # 2: portable paths (repo-relative, <cache>/...), run-level error/traceback
STEM = re.compile(r"\d\d_\w+")  # a notebook section in a params file (notebooks/NN_name)


@dataclass
class Job:
    notebook: Path
    params: dict = field(default_factory=dict)


class UnknownParameter(ValueError):
    """A parameter no notebook of the run declares (a typo would otherwise run with the default)."""


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "-", s).strip("-") or "run"


def unique_dir(parent: Path, base: str) -> Path:
    """A new folder ``parent/base`` (``base-2``, ``base-3``, ... if taken); never an existing one."""
    i = 1
    while True:
        d = parent / (base if i == 1 else f"{base}-{i}")
        try:
            d.mkdir(parents=True)
            return d
        except FileExistsError:
            i += 1


def new_run_dir(root: PathLike, name: str) -> Path:
    """``<root>/<YYYY-MM-DD-HHMMSS>-<name>/`` (root relative to the repo root), created."""
    root = Path(root) if Path(root).is_absolute() else repo_root() / root
    return unique_dir(root, f"{dt.datetime.now():%Y-%m-%d-%H%M%S}-{_slug(name)}")


# ----------------------------------------------------------------------------- notebooks and parameters
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


def declared_parameters(notebook: Path) -> list[str]:
    """The names the notebook's ``parameters`` cell declares."""
    import papermill

    return list(papermill.inspect_notebook(str(notebook)))


def check_parameters(paths: Sequence[Path], params: Mapping[str, Any], more: Sequence[str] = ()) -> None:
    """Refuse parameters that no notebook of the run declares (``more``: grid keys), naming the known ones.

    A global key must be declared by at least one of the notebooks (the others do not get it); a key in a
    per-notebook section by that notebook. Sections for notebooks not in this run are left alone.
    """
    stems = [p.stem for p in paths]
    declared = {p.stem: set(declared_parameters(p)) for p in paths}
    known = set().union(*declared.values())
    problems = []

    def refuse(key: str, choices: set[str], where: str) -> None:
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], sorted(choices), n=1)
        problems.append(f"unknown parameter {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                        + f"; known parameters ({where}): {', '.join(sorted(choices)) or 'none'}")

    for k, v in {**params, **dict.fromkeys(more)}.items():
        if k == "grid":
            continue
        if isinstance(v, Mapping) and (k in stems or STEM.fullmatch(k)):
            for kk in v if k in stems else ():
                if kk not in declared[k]:
                    refuse(f"{k}.{kk}", declared[k], f"declared by {k}")
        elif k not in known:
            refuse(k, known, "declared by " + ", ".join(stems))
    if problems:
        raise UnknownParameter("\n".join(problems))


def _describe(e: BaseException) -> tuple[str, str]:
    if hasattr(e, "ename") and hasattr(e, "traceback"):  # papermill.PapermillExecutionError
        tb = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(e.traceback))
        return f"{e.ename}: {e.evalue} (cell [{e.exec_count}])", "\n".join(tb.splitlines()[-30:])
    return f"{type(e).__name__}: {e}", "".join(traceback.format_exception(e)[-10:])


# ----------------------------------------------------------------------------- executing
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
        entry.update(parameters={**injected, "output_dir": portable_path(nb_dir)},
                     ignored_parameters=sorted(set(params) - set(declared)))
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
    from ..provenance import sha256_file

    skip = {f"{stem}.ipynb", f"{stem}.html", INPUTS_FILE, TOLERANCES_FILE}
    files = (f for f in sorted(nb_dir.rglob("*")) if f.is_file())
    return {f.relative_to(nb_dir).as_posix(): sha256_file(f, cache=False) for f in files
            if not any(p.startswith(".") for p in f.relative_to(nb_dir).parts)
            and f.relative_to(nb_dir).as_posix() not in skip}


def run_jobs(run_dir: Path, jobs: Sequence[Job], name: str, kernel: str = "python3", progress: bool = False,
             command: str | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """Execute ``jobs`` one after another into ``run_dir``; returns the manifest (also written).

    A failing notebook is recorded and the rest still run. A crash outside the notebooks (a missing package,
    a full disk) ends the manifest ``failed`` with the error, then propagates; Ctrl-C ends it ``interrupted``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    dirs = [j.notebook.stem if [x.notebook.stem for x in jobs[:i]].count(j.notebook.stem) == 0
            else f"{j.notebook.stem}-{i}" for i, j in enumerate(jobs)]
    manifest = {"format": MANIFEST_FORMAT, "name": name, "created": _now(), "finished": None,
                "command": command or shlex.join(sys.argv), "status": "running", "error": None, **(extra or {}),
                "notebooks": [{"notebook": portable_path(j.notebook), "stem": j.notebook.stem, "dir": d,
                               "status": "pending"} for j, d in zip(jobs, dirs, strict=True)]}
    path = run_dir / "manifest.json"
    try:
        write_json(path, manifest)
        from ..provenance import sha256_file

        manifest.update(environment(), notebooks=manifest.pop("notebooks"))  # the notebooks stay last
        for job, entry in zip(jobs, manifest["notebooks"], strict=True):
            entry["notebook_sha256"] = sha256_file(job.notebook, cache=False)
        for job, entry in zip(jobs, manifest["notebooks"], strict=True):
            entry.update(status="running", parameters=None, ignored_parameters=None, error=None, traceback=None)
            write_json(path, manifest)
            try:
                _execute(job, run_dir / entry["dir"], entry, kernel, progress)
            finally:
                write_json(path, manifest)
        manifest["status"] = "ok" if all(e["status"] == "ok" for e in manifest["notebooks"]) else "failed"
    except KeyboardInterrupt:
        manifest["status"] = "interrupted"
        print(f"interrupted; partial run in {run_dir}", file=sys.stderr)
        raise
    except BaseException as e:
        manifest["status"] = "failed"
        manifest["error"], manifest["traceback"] = _describe(e)
        for entry in manifest["notebooks"]:
            if entry["status"] == "running":
                entry.update(status="failed", error=f"run crashed: {manifest['error']}")
        raise
    finally:
        manifest["finished"] = _now()
        write_json(path, manifest)
        write_index(run_dir, manifest)
    return manifest


def run_sweep_point(target: Path, jobs: Sequence[Job], name: str, kernel: str, command: str | None,
                    point: Mapping[str, Any]) -> str | None:
    """One sweep point's notebooks into ``target`` (as ``sweep`` runs it); None if all ok, else the error.

    This is the function ``jobs.run_sweep_ray`` runs in each Ray task.
    """
    try:
        m = run_jobs(Path(target), jobs, name, kernel, False, command, {"sweep_point": dict(point)})
    except Exception as e:  # the manifest records it; the caller decides on retries
        return f"{Path(target).name}: crashed ({_describe(e)[0]})"
    if m["status"] == "ok":
        return None
    bad = [f"{e['stem']}: {e.get('error')}" for e in m["notebooks"] if e["status"] != "ok"]
    return f"{Path(target).name}: {m['status']} ({'; '.join(bad)})"


def jobs_for(paths: Sequence[Path], params: Mapping[str, Any]) -> list[Job]:
    stems = [p.stem for p in paths]
    return [Job(p, notebook_params(params, p.stem, stems)) for p in paths]


def run(notebooks: Sequence[PathLike], params: Mapping[str, Any] | None = None, name: str = "run",
        runs_root: PathLike = "runs", kernel: str = "python3", progress: bool = True,
        command: str | None = None) -> Path:
    """Run notebooks headlessly into ``<runs_root>/<YYYY-MM-DD-HHMMSS>-<name>/``; returns that folder.

    ``params`` holds global keys plus optional per-notebook sections keyed by notebook stem; a key no notebook
    declares raises ``UnknownParameter`` before anything runs. A failing notebook is recorded and the rest
    still run; check ``manifest.json``'s ``status``.
    """
    paths = resolve_notebooks(notebooks)
    check_parameters(paths, params or {})
    run_dir = new_run_dir(runs_root, name)
    run_jobs(run_dir, jobs_for(paths, params or {}), name, kernel, progress, command)
    return run_dir


# ----------------------------------------------------------------------------- index.html
def write_html(path: Path, title: str, info: Sequence[str], cols: Sequence[str],
               rows: Sequence[Sequence[str]]) -> None:
    """Small static page; ``info`` lines and ``rows`` cells are already-escaped HTML."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    path.write_text(f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px 8px;"
                    "vertical-align:top}table{border-collapse:collapse}.failed,.interrupted{color:#b00}"
                    ".ok{color:#070}img{height:64px;margin:2px;border:1px solid #ddd}</style>"
                    f"<h1>{html.escape(title)}</h1>" + "".join(f"<p>{i}</p>" for i in info)
                    + f"<table><tr>{head}</tr>{body}</table>\n")


def _model_of(nb_dir: Path, outputs: Sequence[str]) -> str:
    """The ``model`` a notebook recorded (metrics.json first, then its other JSON outputs), or ''."""
    for f in sorted((f for f in outputs if f.endswith(".json")), key=lambda f: f != "metrics.json"):
        data = read_json(nb_dir / f, {})
        if isinstance(data, dict) and data.get("model"):
            return str(data["model"])
    return ""


def write_index(run_dir: Path, m: dict) -> None:
    """``index.html``: per notebook its page, status, model, images, metrics and executed notebook."""
    from .record import IMAGE_SUFFIXES

    def link(rel: str, text: str, img: bool = False) -> str:
        if not (run_dir / rel).exists():
            return ""
        inner = f'<img src="{html.escape(rel)}" alt="{html.escape(text)}" title="{html.escape(text)}">' if img \
            else html.escape(text)
        return f'<a href="{html.escape(rel)}">{inner}</a>'

    rows = []
    for e in m["notebooks"]:
        outs = sorted(e.get("outputs") or {})
        images = [f for f in outs if Path(f).suffix.lower() in IMAGE_SUFFIXES]
        files = sorted((f for f in outs if f not in images), key=lambda f: f != "metrics.json")
        rows.append([link(f"{e['dir']}/{e['stem']}.html", e["stem"]) or html.escape(e["stem"]),
                     f"<span class='{html.escape(e['status'])}'>{html.escape(e['status'])}</span>",
                     html.escape(str(e.get("duration_s", ""))),
                     html.escape(_model_of(run_dir / e["dir"], outs)),
                     "".join(link(f"{e['dir']}/{f}", f, img=True) for f in images),
                     "<br>".join(link(f"{e['dir']}/{f}", f) for f in files),
                     link(f"{e['dir']}/{e['stem']}.ipynb", "ipynb"), html.escape(e.get("error") or "")])
    git = m.get("git") or {}
    info = [f"status <span class='{html.escape(m['status'])}'>{html.escape(m['status'])}</span>, created "
            f"{html.escape(str(m['created']))}, finished {html.escape(str(m['finished']))}"
            + (f"<br>error: {html.escape(m['error'])}" if m.get("error") else ""),
            f"device: {html.escape(device_text(m.get('device')))} on {html.escape(str(m.get('host', '?')))}",
            f"git {html.escape(str(git.get('commit')))} (dirty: {html.escape(str(git.get('dirty')))})",
            f"command: <code>{html.escape(m['command'])}</code>",
            '<a href="manifest.json">manifest.json</a> (parameters, inputs, output hashes, environment)']
    write_html(run_dir / "index.html", f"Run {m['name']}", info,
               ["notebook", "status", "duration_s", "model", "images", "files", "executed", "error"], rows)
