"""Sweeps: one sub-run per grid point in one sweep folder, locally or as Ray tasks, plus a summary."""

from __future__ import annotations

import csv
import html
import itertools
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .execute import (
    _now,
    _slug,
    check_parameters,
    jobs_for,
    merge_params,
    new_run_dir,
    resolve_notebooks,
    run_jobs,
    run_sweep_point,
    write_html,
)
from .record import PathLike, read_json, write_json


def expand_grid(grid: Mapping[str, Any]) -> list[dict]:
    """Cartesian product of the grid values, first key varying slowest."""
    values = [list(v) if isinstance(v, list | tuple) else [v] for v in grid.values()]
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*values)]


def sweep(notebooks: Sequence[PathLike], base_params: Mapping[str, Any] | None, grid: Mapping[str, Any],
          name: str = "sweep", runs_root: PathLike = "runs", kernel: str = "python3", progress: bool = True,
          command: str | None = None, executor: str = "local", ray_address: str | None = None) -> Path:
    """One sub-run per grid point in one sweep folder, plus summary.csv / summary.md.

    ``executor="local"`` runs the points one after another; ``"ray"`` runs each as a Ray task (one GPU each) on
    a local Ray instance or the cluster at ``ray_address`` (``jobs.run_sweep_ray`` running
    ``run_sweep_point``): same folders. Unknown parameters or grid keys raise ``UnknownParameter`` first.
    """
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    paths = resolve_notebooks(notebooks)
    stems = [p.stem for p in paths]
    check_parameters(paths, base_params or {}, more=list(grid))
    sweep_dir = new_run_dir(runs_root, name)
    command = command or shlex.join(sys.argv)
    record = {"format": 1, "name": name, "created": _now(), "command": command,
              "grid": dict(grid), "base_params": dict(base_params or {}), "executor": executor, "points": []}
    points = [(f"{i:03d}-" + _slug("-".join(f"{k}={v}" for k, v in point.items()))[:80], point,
               jobs_for(paths, merge_params(base_params or {}, point, stems))) for i, point in enumerate(expand_grid(grid))]
    try:
        if executor == "ray":
            from ..jobs import read_attempts, run_sweep_ray

            record["points"] = [{"params": point, "run": sub} for sub, point, _ in points]
            write_json(sweep_dir / "sweep.json", record)
            errors = run_sweep_ray(sweep_dir, [(sub, (jobs, f"{name}/{sub}", kernel, command, point))
                                               for sub, point, jobs in points],
                                   run_sweep_point, address=ray_address, progress=progress)
            for pt in record["points"]:
                pt.update({"error": errors[pt["run"]]} if pt["run"] in errors else {})
            tried = read_attempts(sweep_dir)  # where points ran in place (this machine, a shared filesystem)
            for pt in record["points"]:
                if tries := tried.get(pt["run"]):
                    pt.update(attempts=len(tries), point_s=round(tries[-1]["end"] - tries[-1]["start"], 3),
                              started=tries[0]["start"], ended=tries[-1]["end"])
        else:
            for sub, point, jobs in points:
                record["points"].append({"params": point, "run": sub})
                write_json(sweep_dir / "sweep.json", record)
                run_jobs(sweep_dir / sub, jobs, f"{name}/{sub}", kernel, progress, command, {"sweep_point": point})
    finally:
        for pt in record["points"]:
            pt["status"] = read_json(sweep_dir / pt["run"] / "manifest.json", {}).get("status", "missing")
            if pt.get("error") and pt["status"] != "failed":  # a worker lost twice leaves no finished manifest
                pt["status"] = "failed"
        write_json(sweep_dir / "sweep.json", record)
        write_summary(sweep_dir, record)
    return sweep_dir


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif v is None or isinstance(v, bool | int | float | str):
            out[f"{prefix}{k}"] = v
    return out


def write_summary(sweep_dir: Path, record: dict) -> None:
    """summary.csv / summary.md / index.html: one row per point, its parameters, status and JSON outputs."""
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
    write_html(sweep_dir / "index.html", f"Sweep {record['name']}",
               [f"created {html.escape(record['created'])}, executor {html.escape(record['executor'])}",
                '<a href="summary.csv">summary.csv</a> · <a href="summary.md">summary.md</a> · '
                '<a href="sweep.json">sweep.json</a>'], cols, links)
