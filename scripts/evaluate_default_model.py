"""Held-out quality of the default model against ground truth, trained against random weights, and its limits.

    python scripts/evaluate_default_model.py                   # 8 pairs from seed 999 (never trained on), 20 steps
    python scripts/evaluate_default_model.py --pairs 2 --steps 4   # a quick look
    python scripts/evaluate_default_model.py --probe               # and what the model takes from each input

Writes benchmarks/default_model_quality.json: {"trained": {masked_psnr, masked_ssim, logo_match_rate,
logo_psnr_before, logo_psnr_after, vae_recon_psnr, ...}, "random": {...}, "data": {...}, "stamp": {...}}
(``tryon_lab.experiments.default_quality.evaluate_default``); the model's trained logo adapter is used when it has one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab import checkpoint, lora  # noqa: E402
from tryon_lab.experiments import default_quality  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=999)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default=str(checkpoint.TRAINED_DIR))
    p.add_argument("--logo-lora", default="auto",
                   help="a logo LoRA folder; 'auto' (default): the model's trained adapter beside it "
                        f"(<model>{lora.ADAPTER_SUFFIXES['logo']}) when there is one; 'none': off")
    p.add_argument("--results", default=str(default_quality.RESULTS))
    p.add_argument("--grid", default=None, help="write the trained model's grid here (e.g. docs/heldout_grid.png)")
    p.add_argument("--data-seconds", type=float, default=3.0, help="time per data-throughput measurement (0: skip)")
    p.add_argument("--probe", action="store_true",
                   help="also score the trained model with its garment changed in one or both paths and with 1, 2 "
                        "and 4 steps (what it takes from each input; about 2 minutes more on a 2-core CPU)")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.steps < 1:
        p.error(f"--pairs and --steps must be >= 1, got {args.pairs} and {args.steps}")
    adapter = lora.resolve_adapter(args.logo_lora, args.model, "logo")
    default_quality.evaluate_default(args.seed, args.pairs, args.steps, args.results, args.grid, args.model, adapter,
                                     args.data_seconds, args.probe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
