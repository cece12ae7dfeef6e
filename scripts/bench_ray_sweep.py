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
from tryon_lab.runs.cli import key_value, parse_grid, parse_value  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1,2", help="GPU counts (CPU counts where there is no GPU)")
    ap.add_argument("--notebook", default=str(ray_sweep_bench.DEFAULT_NOTEBOOK))
    ap.add_argument("-p", "--param", action="append", type=key_value, default=[], help="base parameter NAME=VALUE")
    ap.add_argument("--grid", action="append", type=key_value, default=[],
                    help="grid NAME=V1,V2,... (default: seed=0..5)")
    ap.add_argument("--runs-root", default="runs")
    ap.add_argument("--results", default=str(ray_sweep_bench.RESULTS))
    ap.add_argument("--bytecode", action="store_true", help="write the packages' bytecode first, as an image build "
                    "does (for packages installed with pip --no-compile: each point is a fresh process)")
    a = ap.parse_args(argv)
    ray_sweep_bench.bench(tuple(int(c) for c in a.counts.split(",")), a.notebook,
                          {k: parse_value(v) for k, v in a.param}, parse_grid(a.grid) or None, a.runs_root, a.results,
                          a.bytecode)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
