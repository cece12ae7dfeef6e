"""GPU memory benchmark: the VRAM budget table, each memory mode's peak and time, capped runs, the hot path.

Full-size FLUX Fill + Redux shapes with random bf16 weights, one try-on of a 768x1024 person; every part in its
own process (``tryon_lab.experiments.memory_bench`` says what each part measures). Results merge into
``--budget`` (benchmarks/memory_budget.json, the planner's table: modes not measured again are kept, each mode
stamped with the run that measured it, so a partial run or a fresh ``--raw`` loses nothing) and ``--results``
(key memory_gpu).

    python scripts/bench_memory_gpu.py --parts budget,bf16+model-offload,expandable
    python scripts/bench_memory_gpu.py --parts bf16+group-offload,bf16+sequential-offload,cap:24,cap:16
    python scripts/bench_memory_gpu.py --tiny --parts budget        # CPU smoke run (writes under /tmp)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tryon_lab.experiments import fullsize, memory_bench  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=memory_bench.DEFAULT_PARTS)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--logos", type=int, default=5)
    ap.add_argument("--logo-size", type=int, default=256)
    ap.add_argument("--logo-steps", type=int, default=4)
    ap.add_argument("--async-requests", type=int, default=4)
    ap.add_argument("--config", default=str(fullsize.CONFIG_FILE))
    ap.add_argument("--budget", default=None, help="the planner's table (default benchmarks/memory_budget.json)")
    ap.add_argument("--results", default=None, help="default benchmarks/results.json")
    ap.add_argument("--raw", default=None, help="all parts, merged (default benchmarks/memory_gpu_raw.json)")
    ap.add_argument("--part-timeout", type=float, default=240.0, help="seconds before a part is recorded as failed")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny config (files under /tmp)")
    a = ap.parse_args(argv)
    root = Path(tempfile.gettempdir()) / "memory_bench_tiny" if a.tiny else REPO / "benchmarks"
    b = memory_bench.Bench(a.steps, a.width, a.height, a.logos, a.logo_size, a.logo_steps, a.async_requests, a.tiny,
                           a.config, a.budget or str(root / "memory_budget.json"))
    failed = memory_bench.run(a.parts, b, a.raw or root / "memory_gpu_raw.json", a.results or root / "results.json",
                              a.part_timeout)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
