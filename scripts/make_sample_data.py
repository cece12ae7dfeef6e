#!/usr/bin/env python
"""Write the procedural try-on sample set (PNGs + manifest.json + README.md); re-runs are byte-identical.

    python scripts/make_sample_data.py --out data --seed 1234 --count 8
"""

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tryon_lab.synthetic import SyntheticConfig, write_sample_set  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--count", type=int, default=8, help="number of samples")
    defaults = SyntheticConfig()
    for name, value in asdict(defaults).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    args = ap.parse_args(argv)
    cfg = SyntheticConfig(args.height, args.width, args.min_logos, args.max_logos)
    out = write_sample_set(args.out, args.seed, args.count, cfg)
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if v != getattr(defaults, k))
    (out / "README.md").write_text(
        "# Synthetic try-on sample set\n\n"
        f"{args.count} procedural try-on pairs (seed {args.seed}, {cfg.height}x{cfg.width}) from "
        "`tryon_lab.synthetic`: a flat garment,\na person wearing another garment, the repaint mask "
        "(255 = repaint) and the ground-truth target,\nwith logo boxes (x0, y0, x1, y1; x1/y1 exclusive) "
        "and logo ids in `manifest.json`.\n\nGenerated, do not edit. Remake (byte-identical) with\n\n"
        f"    python scripts/make_sample_data.py --out {out.name} --seed {args.seed} --count {args.count}{flags}\n")
    print(f"wrote {args.count} samples to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
