"""The prompt's padded length (T5 tokens) against CPU speed and held-out quality
(``tryon_lab.experiments.text_tokens_bench``).

    python scripts/bench_text_tokens.py                          # default model, 512 / 64 / 32 tokens
    python scripts/bench_text_tokens.py --lengths 512,16 --pairs 2 --results /tmp/r.json   # a quick look
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab.experiments import text_tokens_bench  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--lengths", default="512,64,32", help="comma-separated; the first is the reference")
    ap.add_argument("--steps", type=int, default=12, help="try-on and logo-pass steps (the notebooks' default)")
    ap.add_argument("--height", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=8, help="held-out pairs (seed 999)")
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(text_tokens_bench.RESULTS))
    a = ap.parse_args(argv)
    text_tokens_bench.run(a.model, tuple(int(x) for x in a.lengths.split(",")), a.steps, a.height, a.repeats,
                          a.pairs, a.eval_steps, a.threads, a.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
