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
    ap.add_argument("--cold-cases", help="only these cold-start cases, ';'-separated (default: all)")
    ap.add_argument("--cold-rounds", type=int, default=1, help="run the cases that save nothing this many times")
    ap.add_argument("--bytecode", action="store_true", help="write the packages' bytecode caches before the cold "
                    "cases, as an image build does (for packages installed with pip --no-compile)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole run (keep under the call limit)")
    ap.add_argument("--work", default="/tmp/bench_gpu_work", help="local disk for weights and compile artefacts")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU: the same code path in seconds")
    ap.add_argument("--profile", metavar="VARIANT", help="only: where one step's GPU time goes, by kernel kind "
                    "(written to OUT/profile_VARIANT.json)")
    ap.add_argument("--schedule", metavar="RESULTS_JSON", help="the step-cache rows replay `step_cache_pattern` "
                    "(or `step_cache_pattern_order1` when present) from this results file")
    a = ap.parse_args(argv)
    schedule = None
    if a.schedule:
        import json
        from pathlib import Path

        res = json.loads(Path(a.schedule).read_text())
        schedule = res.get("step_cache_pattern_order1", res["step_cache_pattern"])["schedule"]
        if a.tiny:  # the CPU smoke run has fewer steps: the same pattern's first steps
            schedule = schedule[: a.steps or 3]
    if a.profile:  # a stamped results file of its own: OUT/profile_VARIANT.json
        import json
        from pathlib import Path

        from tryon_lab.experiments import fullsize
        from tryon_lab.provenance import stamp

        s, n = fullsize.shape(tiny=a.tiny), a.steps or 8
        res = {"stamp": stamp(s.device), "variant": a.profile, "model": gpu_bench.MODEL,
               "shape": f"{s.describe()}, {n} steps profiled after a 2-step warm-up",
               "rows": gpu_bench.profile_step(a.profile, a.tiny, n, schedule)}
        path = Path(a.out) / f"profile_{a.profile}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1, default=str) + "\n")
        print(json.dumps(res, indent=1, default=str))
        return 0
    cold_cases = [c.strip() for c in a.cold_cases.split(";")] if a.cold_cases else None
    gpu_bench.benchmark(a.out, a.variants, a.cold, a.tiny, a.steps, a.budget, a.work, schedule, cold_cases,
                        a.bytecode, a.cold_rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
