"""Past one GPU, measured: context-parallel latency and sweep throughput on 1, 2 and 4 GPUs (one launch per count).

Full-size FLUX Fill with random bf16 weights on each GPU; what is measured: ``tryon_lab.experiments.multi_gpu_bench``.
Each launch writes ``multi_gpu_<N>gpu`` to ``--results``; ``--summarise`` (no torchrun) adds ``multi_gpu``.

    torchrun --nproc-per-node 1 scripts/bench_multi_gpu.py        # run first: the reference latents
    torchrun --nproc-per-node 2 scripts/bench_multi_gpu.py
    torchrun --nproc-per-node 4 scripts/bench_multi_gpu.py
    python scripts/bench_multi_gpu.py --summarise
    torchrun --nproc-per-node 2 scripts/bench_multi_gpu.py --tiny --results /tmp/r.json   # CPU smoke run (gloo, unsplit)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab.experiments import fullsize, multi_gpu_bench  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(multi_gpu_bench.SIZES), help="diptych sizes, WxH")
    ap.add_argument("--steps", type=int, default=None, help="28 (tiny: 3)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3, help="throughput: requests per GPU (0: skip)")
    ap.add_argument("--ring", type=int, default=1, help="ring degree (the rest is Ulysses)")
    ap.add_argument("--config", default=str(fullsize.CONFIG_FILE))
    ap.add_argument("--work", default="/tmp/bench_multi_gpu", help="reference latents of the 1-GPU run")
    ap.add_argument("--results", default=str(multi_gpu_bench.RESULTS))
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (gloo): the same code path")
    ap.add_argument("--summarise", action="store_true", help="combine the per-count entries (no torchrun)")
    ap.add_argument("--variant", default="fp8", choices=list(multi_gpu_bench.VARIANTS),
                    help="fp8: FP8 + fused QKV + regional compile (the best one-GPU path); fp8_full: whole-model compile; "
                         "fp8_cudagraphs: whole-model compile with CUDA graphs; fp8_step_graph: regional compile, each "
                         "transformer call one CUDA graph; cache_dit_async(_fp8comm): the peer, cache-dit's own "
                         "Ulysses (asynchronous, FP8 all-to-alls); eager: bf16 eager; *_overlap: inductor "
                         "reorders the collectives against independent compute")
    ap.add_argument("--split-vae", action="store_true",
                    help="also split the VAE encode and decode over the ranks (a band of rows each, exact)")
    ap.add_argument("--text-multiple", type=int, default=2,
                    help="pad the text tokens to a multiple of this (use the largest GPU count you compare)")
    ap.add_argument("--ulysses-chunks", type=int, default=0,
                    help="0: diffusers' Ulysses (an all-to-all each for Q, K, V); n: one all-to-all for Q, K and V "
                         "together over n chunks of the heads, each chunk's exchange in flight while another attends")
    ap.add_argument("--profile", action="store_true",
                    help="also, per rank, denoising only: host time per step, how far the GPU trails the host, "
                         "device time by kernel kind (GEMM, attention, NCCL, ...) and the top kernels")
    a = ap.parse_args(argv)
    if a.summarise:
        multi_gpu_bench.summarise(a.results)
    else:
        graphs = multi_gpu_bench.graphed(a.variant)
        multi_gpu_bench.bench(tuple(a.sizes.split(",")), a.steps, a.repeats, a.requests, a.ring, a.work, a.results,
                              a.tiny, a.config, variant=a.variant, text_multiple=a.text_multiple, profile=a.profile,
                              split_vae=a.split_vae, ulysses_chunks=a.ulysses_chunks, teardown=not graphs)
        if graphs:  # results are written; the process group's teardown hung after graph replays, so skip it
            sys.stdout.flush()
            os._exit(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
