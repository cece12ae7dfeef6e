#!/usr/bin/env python
"""Write the procedural try-on sample set (PNGs + manifest.json + README.md); re-runs are byte-identical.

    python scripts/make_sample_data.py --out data --seed 1234 --count 8
"""

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tryon_lab.experiments.assets import write_sample_data  # noqa: E402
from tryon_lab.synthetic import SyntheticConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--count", type=int, default=8, help="number of samples")
    for name, value in asdict(SyntheticConfig()).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    args = ap.parse_args(argv)
    write_sample_data(args.out, args.seed, args.count,
                      SyntheticConfig(**{k: getattr(args, k) for k in asdict(SyntheticConfig())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
