"""Candidate shapes for the default model against checkpoint size and CPU try-on time
(``tryon_lab.experiments.model_sizes``), before any of them is trained.

    python scripts/size_default_model.py                              # every candidate, 3 repeats
    python scripts/size_default_model.py --only "32 text tokens" --repeats 1 --results /tmp/r.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab.experiments import model_sizes  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=None, help="a candidate's name (repeatable); the committed "
                    "shape is always measured first, as the yardstick")
    ap.add_argument("--height", type=int, default=192)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(model_sizes.RESULTS))
    a = ap.parse_args(argv)
    if unknown := [n for n in a.only or [] if n not in model_sizes.CANDIDATES]:
        ap.error(f"unknown candidate(s) {unknown}; choose from {list(model_sizes.CANDIDATES)}")
    names = [model_sizes.COMMITTED, *(n for n in a.only or model_sizes.CANDIDATES if n != model_sizes.COMMITTED)]
    model_sizes.run({n: model_sizes.CANDIDATES[n] for n in names}, a.height, a.steps, a.repeats, a.threads,
                    a.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
