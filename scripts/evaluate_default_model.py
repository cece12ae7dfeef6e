"""Held-out quality of the default model against ground truth, trained against random weights.

    python scripts/evaluate_default_model.py            # 8 pairs from seed 999 (never used in training), 20 steps

Writes the numbers to benchmarks/results.json (entry ``heldout_quality``) and the grid to docs/heldout_grid.png
(``tryon_lab.experiments.default_model.evaluate_default``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab.experiments import default_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=999)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--results", default=str(Path(__file__).resolve().parent.parent / "benchmarks" / "results.json"))
    p.add_argument("--grid", default=str(Path(__file__).resolve().parent.parent / "docs" / "heldout_grid.png"))
    args = p.parse_args(argv)
    default_model.evaluate_default(args.seed, args.count, args.steps, args.results, args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
