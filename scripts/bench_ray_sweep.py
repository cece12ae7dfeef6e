"""Sweep throughput on Ray against GPU count: the same notebook grid through ``runs.sweep(executor="ray")`` on
1 and 2 GPUs (a fresh local Ray instance each). What is measured: ``tryon_lab.experiments.ray_sweep_bench``.

    python scripts/bench_ray_sweep.py                                   # notebook 01 over six seeds, 1 and 2 GPUs
    python scripts/bench_ray_sweep.py --counts 1,2,4 -p height=384 --grid seed=0,1,2,3,4,5,6,7
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab.experiments import ray_sweep_bench  # noqa: E402
from tryon_lab.runs.cli import parse_value  # noqa: E402


def assignments(items: list[str], grid: bool = False) -> dict:
    """NAME=VALUE (or NAME=V1,V2,... for a grid) as the runner's CLI reads them."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"expected NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = [parse_value(x) for x in v.split(",")] if grid else parse_value(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1,2", help="GPU counts (CPU counts where there is no GPU)")
    ap.add_argument("--notebook", default=str(ray_sweep_bench.DEFAULT_NOTEBOOK))
    ap.add_argument("-p", "--param", action="append", default=[], help="base parameter NAME=VALUE")
    ap.add_argument("--grid", action="append", default=[], help="grid NAME=V1,V2,... (default: seed=0..5)")
    ap.add_argument("--runs-root", default="runs")
    ap.add_argument("--results", default=str(ray_sweep_bench.RESULTS))
    a = ap.parse_args(argv)
    ray_sweep_bench.bench(tuple(int(c) for c in a.counts.split(",")), a.notebook, assignments(a.param),
                          assignments(a.grid, grid=True) or None, a.runs_root, a.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
