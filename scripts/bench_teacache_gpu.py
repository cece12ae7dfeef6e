"""Per-step cost of TeaCache on the full-size FLUX Fill transformer (random weights, no downloads).

Plain step, TeaCache compute step and TeaCache skipped step, eager and regionally compiled (no recompiles);
the measurement is ``tryon_lab.experiments.teacache_bench``.

    python scripts/bench_teacache_gpu.py --out benchmarks/teacache_gpu.json   # on a GPU
    python scripts/bench_teacache_gpu.py --tiny --out /tmp/teacache_tiny.json  # CPU smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tryon_lab.experiments import fullsize, teacache_bench  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(fullsize.CONFIG_FILE))
    p.add_argument("--out", default=str(teacache_bench.OUT))
    p.add_argument("--name", default="teacache_step_cost", help="entry name inside the results file")
    p.add_argument("--height", type=int, default=768, help="diptych height in pixels")
    p.add_argument("--width", type=int, default=1024, help="diptych width in pixels")
    p.add_argument("--text-tokens", type=int, default=None, help="T5 + Redux tokens (default 512 + 729)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--steps", type=int, default=28, help="trajectory length for the projected speed-ups")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="regional compile (auto: on CUDA)")
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU: checks the code, measures nothing")
    a = p.parse_args(argv)
    return teacache_bench.run(a.out, a.name, a.tiny, a.height, a.width, a.text_tokens, a.warmup, a.iters, a.steps,
                              a.compile, a.config)


if __name__ == "__main__":
    main()
