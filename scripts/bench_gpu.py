"""Step speed and cold start of full-size FLUX Fill on one GPU, against stock eager, in one call.

    python scripts/bench_gpu.py --out benchmarks                           # on the GPU: step variants + cold start
    python scripts/bench_gpu.py --out benchmarks --no-cold                 # step variants only
    python scripts/bench_gpu.py --out benchmarks --variants ""             # cold start only
    python scripts/bench_gpu.py --profile fp8_row_fused_regional           # GPU time of one step by kernel kind
    python scripts/bench_gpu.py --tiny --out /tmp/bench                    # the same code on a CPU, tiny model
"""

from __future__ import annotations

import argparse

from tryon_lab.experiments import gpu_bench


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench_gpu")
    ap.add_argument("--variants", default=gpu_bench.DEFAULT,
                    help=f"comma list from: {', '.join(gpu_bench.RECIPES)} (empty: none)")
    ap.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold-start processes")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole run (keep under the call limit)")
    ap.add_argument("--work", default="/tmp/bench_gpu_work", help="local disk for weights and compile artefacts")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU: the same code path in seconds")
    ap.add_argument("--profile", metavar="VARIANT", help="only: where one step's GPU time goes, by kernel kind")
    a = ap.parse_args(argv)
    if a.profile:
        import json

        print(json.dumps(gpu_bench.profile_step(a.profile, a.tiny, a.steps or 8), indent=1))
        return 0
    gpu_bench.benchmark(a.out, a.variants, a.cold, a.tiny, a.steps, a.budget, a.work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
