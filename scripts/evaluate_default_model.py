"""Held-out quality of the default model against ground truth, trained against random weights.

    python scripts/evaluate_default_model.py            # 8 pairs from seed 999 (never used in training), 20 steps

Writes the numbers to benchmarks/results.json (entry ``heldout_quality``) and the grid to docs/heldout_grid.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab import bench, checkpoint, training  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=999)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    results = {"stamp": bench.stamp("cpu")}
    for name, model_dir in (("trained", checkpoint.TRAINED_DIR), ("random", checkpoint.random_checkpoint())):
        summary, rows = training.evaluate_heldout(model_dir, args.seed, args.count, args.steps)
        summary["model"] = checkpoint.describe_model(model_dir)
        results[name] = summary
        print(f"{name}: masked PSNR {summary['psnr_masked_mean']:.2f} dB, masked SSIM {summary['ssim_masked_mean']:.3f}")
        if name == "trained":
            training.grid_image(rows).save(checkpoint.REPO_ROOT / "docs" / "heldout_grid.png")
    bench.write_results(checkpoint.REPO_ROOT / "benchmarks" / "results.json", "heldout_quality", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
