"""Logo pass, batched against one call per logo, for 1..5 logos per garment (``tryon_lab.experiments.logos_bench``).

CPU mode (default): the default model, the sample's known target logo boxes, diptychs of ``--size`` px per half,
``--steps`` steps; median over ``--repeats`` after a warm-up. ``--full-size``: the full-size FLUX Fill transformer
+ VAE with random bf16 weights on the GPU and 256 px per half (run on an H100: benchmarks/logos_gpu_full_size.md).

    python scripts/bench_logos.py                         # CPU, default model -> benchmarks/results.json, logos_cpu.md
    python scripts/bench_logos.py --full-size --size 256  # GPU -> logos_gpu_full_size
    python scripts/bench_logos.py --full-size --tiny --results /tmp/r.json   # the full-size code on the CPU, toy size
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab.experiments import fullsize, logos_bench  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full-size", action="store_true", help="full-size transformer on the GPU (random bf16 weights)")
    ap.add_argument("--tiny", action="store_true", help="--full-size only: the toy-size model on the CPU (smoke run)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--sample", default="s000")
    ap.add_argument("--steps", type=int, default=None, help="8 on the CPU, 28 full size")
    ap.add_argument("--size", type=int, default=None, help="px per diptych half: 64 on the CPU, 256 full size")
    ap.add_argument("--max-logos", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default=str(fullsize.CONFIG_FILE))
    ap.add_argument("--results", default=str(logos_bench.RESULTS))
    a = ap.parse_args(argv)
    steps, size = a.steps or (28 if a.full_size else 8), a.size or (256 if a.full_size else 64)
    if a.full_size:
        logos_bench.run(True, a.results, steps=steps, size=size, max_logos=a.max_logos, repeats=a.repeats,
                        tiny=a.tiny, config=a.config)
    else:
        logos_bench.run(False, a.results, model=a.model, sample=a.sample, steps=steps, size=size,
                        max_logos=a.max_logos, repeats=a.repeats, threads=a.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
