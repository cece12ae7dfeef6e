"""Standard against slim loading of full-size FLUX.1 Fill + Redux (random weights), one GPU run.

Every component at the published sizes saved as a real snapshot on local disk, then loaded in fresh processes
the stock way and the slim way (``tryon_lab.experiments.loading_bench``).

    python scripts/bench_loading_gpu.py --out $OUT          # on the GPU machine
    python scripts/bench_loading_gpu.py --tiny --out /tmp/x  # same path on a CPU, small shapes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab.experiments import fullsize, loading_bench  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_loading")
    ap.add_argument("--work", default="/tmp/bench_loading_work", help="local disk for the saved snapshot")
    ap.add_argument("--config", default=str(fullsize.CONFIG_FILE))
    ap.add_argument("--tiny", action="store_true", help="toy shapes on the CPU (smoke test)")
    a = ap.parse_args(argv)
    loading_bench.run(a.out, a.work, a.tiny, a.config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
