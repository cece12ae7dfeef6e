"""``python -m tryon_lab.runs run | sweep | verify | sync`` (also ``tryon-runs`` and scripts/run_notebooks.py).

Exit codes: 0 everything ok; 1 a notebook, point or verify check failed (or the run crashed: see the
manifest); 2 a usage error, e.g. a parameter no notebook declares; 130 interrupted.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .execute import UnknownParameter, all_notebooks, merge_params, resolve_notebooks, run
from .hygiene import sync_notebooks
from .record import read_json, repo_root
from .sweep import sweep
from .verify import verify


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


def key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` from the command line (an argparse ``type``); the value stays text."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), v


def parse_grid(pairs: Sequence[tuple[str, str]]) -> dict[str, list]:
    """``--grid KEY=V1,V2`` pairs as a sweep grid: each value list parsed like a parameter."""
    return {k: [parse_value(x) for x in v.split(",")] for k, v in pairs}


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
    grid.update(parse_grid(a.grid))
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


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tryon-runs", description="Headless notebook runs: manifests, sweeps, "
                                 "verification and notebook hygiene.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("run", "sweep"):
        p = sub.add_parser(cmd, help="run notebooks headlessly into runs/" if cmd == "run"
                           else "one run per --grid point, plus summary.csv / summary.md")
        p.add_argument("notebooks", nargs="*")
        p.add_argument("--all", action="store_true", help="every notebooks/[0-9][0-9]_*.ipynb in order")
        p.add_argument("-p", "--param", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                       help="a parameter some notebook declares (others are refused, exit code 2)")
        p.add_argument("--params-file", help="YAML: global keys, per-notebook sections, optional grid:")
        p.add_argument("--grid", action="append", type=key_value, default=[], metavar="KEY=V1,V2")
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
    p.add_argument("--keep", action="store_true", help="keep the <run>.verify-<time> folder even on success")
    p.add_argument("--progress", action="store_true")
    p = sub.add_parser("sync", help="check / rewrite paired, stripped notebooks")
    p.add_argument("--check", action="store_true")
    p.add_argument("--dir", default=None)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run | sweep | verify | sync (see ``--help``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(argv)
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
    except UnknownParameter as e:
        print(f"error: {e}\nnothing was run.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the manifest records where", file=sys.stderr)
        return 130
