"""Probe: inductor's fused elementwise kernels in the best step's blocks (static FP8, fused QKV, FA3), under
inductor knob sets: block time, each Triton kernel's time, bytes and GB/s, and its generated source.

    python scripts/probe_block_kernels.py --out results.json                       # the H200, full width
    python scripts/probe_block_kernels.py --tiny --knobs default --calls 2        # the same code on the CPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab.experiments import fullsize  # noqa: E402
from tryon_lab.experiments.block_kernels import KNOBS, probe  # noqa: E402
from tryon_lab.provenance import report_probe  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (native attention)")
    ap.add_argument("--knobs", default="default,pointwise_autotune,nd_tiling,block_ptr,aggressive_fusion",
                    help=f"comma-separated, from: {', '.join(KNOBS)}")
    ap.add_argument("--attention", default=None, help="default: _flash_3 on a GPU, native on the CPU")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--budget", type=float, default=400.0, help="seconds; knob sets after it are skipped")
    ap.add_argument("--work", default=None, help="local disk for the inductor folders")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    knobs = a.knobs.split(",")
    if unknown := [k for k in knobs if k not in KNOBS]:
        ap.error(f"unknown knob sets {unknown}; choose from {list(KNOBS)}")
    s = fullsize.shape(tiny=a.tiny)
    attention = a.attention or ("native" if a.tiny else "_flash_3")
    with tempfile.TemporaryDirectory(dir=a.work) as work:
        res = probe(s, knobs, attention, Path(work), a.calls, a.budget)
    for k, r in res["rows"].items():
        if r["status"] != "ok":
            print(f"{k}: {r['status']}", flush=True)
            continue
        print(f"{k}: compile {r['compile_s']:.1f} s, blocks {r['block_ms']}, projected "
              f"{r['projected_blocks_ms_per_step']:.1f} ms/step, Triton {r['triton_ms_per_call']:.3f} ms/call "
              f"({r['projected_triton_ms_per_step']:.1f} ms/step), "
              f"rel-L2 {r['rel_l2_vs_eager']:.4f}", flush=True)
        for name, kr in sorted(r["kernels"].items(), key=lambda kv: -kv[1]["ms_per_call"])[:8]:
            print(f"   {kr['ms_per_call']:.3f} ms x{kr['launches_per_call']:.0f} "
                  f"{kr.get('gb_per_s', 0):.0f} GB/s  {name[:110]}", flush=True)
    report_probe(res, s.device, a.out)
    return 0 if any(r["status"] == "ok" for r in res["rows"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
