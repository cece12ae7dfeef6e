"""Sweep throughput on Ray against GPU count, measured through ``runs.sweep(executor="ray")`` itself.

Each GPU count runs the same grid in a fresh process that starts a local Ray instance over that many GPUs
(``CUDA_VISIBLE_DEVICES``), so Ray runs at most that many points at once, one GPU each. On a machine without
GPUs each count is that many CPUs instead (one CPU per point): the same code path, not a GPU number.
Points per minute = points / the sweep's wall time (Ray's own start is not counted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..plots import markdown_table
from ..provenance import REPO_ROOT, stamp, write_results

RESULTS = REPO_ROOT / "benchmarks" / "results.json"
DEFAULT_NOTEBOOK = REPO_ROOT / "notebooks" / "01_slim_pipeline.ipynb"
DEFAULT_GRID = {"seed": [0, 1, 2, 3, 4, 5]}
TARGET = 1.9  # two GPUs' points per minute over one GPU's
COLUMNS = ["slots", "slot_kind", "points", "ok", "reruns", "wall_s", "point_s_median", "slots_busy", "points_per_min",
           "speedup_vs_1"]


def table(rows: list[dict]) -> str:
    """The sweep rows as markdown, with the columns they have (older entries lack the attempt-log ones)."""
    return markdown_table(rows, [c for c in COLUMNS if any(c in r for r in rows)])


def verdict(rows: list[dict]) -> str:
    """The two-slot row against the target."""
    two = [r for r in rows if r["slots"] == 2]
    if not two:
        return f"Target (2 slots >= {TARGET}x one): no two-slot row."
    s = two[-1]["speedup_vs_1"]
    return f"2 {two[-1]['slot_kind']} slots: {s:.2f}x one (target >= {TARGET}x: **{'met' if s >= TARGET else 'NOT met'}**)."


def sweep_with(slots: int, notebook: str, base: dict, grid: dict, runs_root: str) -> dict:
    """One sweep on a new local Ray instance of ``slots`` GPUs (CPUs where there is none); run in a fresh process."""
    import ray
    import torch

    from ..runs import sweep

    gpus = torch.cuda.device_count()
    if gpus and gpus < slots:
        raise SystemExit(f"{slots} GPUs asked for, {gpus} visible: run on a machine with {slots} GPUs.")
    ray.init(num_gpus=slots if gpus else 0, num_cpus=None if gpus else slots, include_dashboard=False,
             log_to_driver=False)
    try:
        start = time.perf_counter()
        sweep_dir = sweep([notebook], base, grid, name=f"ray-{slots}", runs_root=runs_root, progress=False,
                          executor="ray")
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    points = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    return {"slots": slots, "slot_kind": "GPU" if gpus else "CPU", "points": len(points),
            "ok": sum(p["status"] == "ok" for p in points), "wall_s": wall,
            "points_per_min": 60 * len(points) / wall, "sweep_dir": str(sweep_dir)} | attempt_stats(sweep_dir, slots, wall)


def attempt_stats(sweep_dir: Path, slots: int, wall: float) -> dict:
    """Where a sweep's wall time went, from its attempt log: reruns, the median point, and how busy the slots
    were (all attempts' time over slots x wall: below 1, the slots waited for Ray or for the tail)."""
    from ..jobs import read_attempts

    tries = [a for runs in read_attempts(Path(sweep_dir)).values() for a in runs]
    if not tries:
        return {}
    spans = sorted(a["end"] - a["start"] for a in tries)
    return {"reruns": len(tries) - len({a["run"] for a in tries}), "point_s_median": spans[len(spans) // 2],
            "slots_busy": sum(spans) / (slots * wall)}


def bench(counts: tuple[int, ...] = (1, 2), notebook: str | Path = DEFAULT_NOTEBOOK, base: dict | None = None,
          grid: dict | None = None, runs_root: str | Path = "runs", results: str | Path = RESULTS,
          bytecode: bool = False) -> dict:
    """The same sweep over each GPU count (fresh process each); writes ``ray_sweep`` and ``ray_sweep.md``.
    ``bytecode``: first write the packages' bytecode, as an image build would: every point's kernel is a fresh
    process, which otherwise compiles torch and the rest from source when the image ships no bytecode."""
    import torch

    grid = grid or DEFAULT_GRID
    rows = []
    built = None
    if bytecode:
        from .bytecode import compile_bytecode

        built = compile_bytecode()
        print(f"bytecode written in {built['seconds']:.0f} s", flush=True)
    for n in counts:
        env = dict(os.environ)
        if torch.cuda.is_available():
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
        args = json.dumps([n, str(notebook), base or {}, grid, str(runs_root)])
        code = ("import json, sys; from tryon_lab.experiments.ray_sweep_bench import sweep_with; "
                "print('SWEEP ' + json.dumps(sweep_with(*json.loads(sys.argv[1]))))")
        p = subprocess.run([sys.executable, "-c", code, args], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("SWEEP ")]
        if p.returncode or not lines:
            raise RuntimeError(f"the {n}-slot sweep failed (exit {p.returncode}): {p.stderr[-2000:]}")
        rows.append(json.loads(lines[-1][6:]))
        print(f"{n} slot(s): {rows[-1]['points']} points in {rows[-1]['wall_s']:.1f} s", flush=True)
    one = rows[0]["points_per_min"] / rows[0]["slots"]
    for r in rows:
        r["speedup_vs_1"] = r["points_per_min"] / one
    res = {"stamp": stamp(), "notebook": Path(notebook).name, "base_params": base or {}, "grid": grid, "rows": rows,
           "what": "runs.sweep(executor='ray'), one GPU (or CPU) per point, a fresh local Ray instance per count",
           "bytecode_build": built}
    md = (f"# Sweep throughput on Ray\n\n`{Path(notebook).name}` over {grid} (base {base or {}}), one "
          f"{rows[0]['slot_kind']} per point, a fresh local Ray instance per count; {res['stamp']['device']}, "
          f"{res['stamp']['date']}.\n\n" + table(rows) + "\n\n" + verdict(rows) + "\n")
    failed = [r for r in rows if r["ok"] < r["points"]]
    res["valid"] = not failed
    if failed:  # Ray retries a failed point once: the wall time then counts work twice
        md += ("\n**Not a throughput measurement:** " + ", ".join(f"{r['points'] - r['ok']} of {r['points']} points "
               f"failed with {r['slots']} slot(s) (`{r['sweep_dir']}`)" for r in failed)
               + "; Ray reran each failed point once, so the times are not comparable.\n")
    write_results(results, "ray_sweep", res, md)
    print(md)
    return res
