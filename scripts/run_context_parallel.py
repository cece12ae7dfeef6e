"""One try-on spread over several GPUs with diffusers' context parallelism; launch one process per GPU.

What runs and what is reported: ``tryon_lab.experiments.context_parallel``.

    torchrun --nproc-per-node 2 scripts/run_context_parallel.py --sample s000 --out cp.png --compare
    torchrun --nproc-per-node 4 scripts/run_context_parallel.py --ring 2 --ulysses 2 --quant fp8_dynamic_row
    torchrun --nproc-per-node 2 scripts/run_context_parallel.py --model random --steps 2 --compare   # fast check

Context parallelism needs an accelerator; on a CPU-only machine every rank stops with that message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab.experiments import context_parallel  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="default | random | trained | a model folder")
    ap.add_argument("--sample", default="s000")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ulysses", type=int, default=None, help="Ulysses degree (default: every process)")
    ap.add_argument("--ring", type=int, default=1, help="ring degree (needs a CUDA backend: cuDNN / flash)")
    ap.add_argument("--backend", default=None, help="attention backend (default: native, or _native_cudnn for ring)")
    ap.add_argument("--exact-split", action="store_true",
                    help="diffusers' plain split: token counts must divide by the degree (needed with --compile)")
    ap.add_argument("--quant", default="none", help="none | fp8_weight_only | fp8_dynamic_row | fp8_dynamic_tensor")
    ap.add_argument("--compile", default="none", help="none | regional | full")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compare", action="store_true", help="rank 0 also runs without context parallelism")
    ap.add_argument("--out", default="context_parallel.png")
    ap.add_argument("--json", default=None, help="write the numbers here (rank 0)")
    a = ap.parse_args(argv)
    context_parallel.run(a.model, a.sample, a.steps, a.seed, a.ulysses, a.ring, a.backend, a.exact_split, a.quant,
                         a.compile, a.dtype, a.compare, a.out, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
