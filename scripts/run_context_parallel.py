"""One try-on spread over several GPUs with diffusers' context parallelism; launch one process per GPU.

Every rank loads the slim pipeline (cached embeddings, optional FP8 / compile) on its own GPU, the transformer's
tokens are split over the ranks, and rank 0 saves the image. ``--compare`` then runs the same request on rank 0
without context parallelism and reports final-latent rel-L2 and image PSNR against it; every run reports the peak
GPU memory of each rank.

    torchrun --nproc-per-node 2 scripts/run_context_parallel.py --sample s000 --out cp.png --compare
    torchrun --nproc-per-node 4 scripts/run_context_parallel.py --ring 2 --ulysses 2 --quant fp8_dynamic_row
    torchrun --nproc-per-node 2 scripts/run_context_parallel.py --model random --steps 2   # CPU smoke run (gloo)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def peak_memory(device: str) -> int:
    """Peak CUDA allocation of this rank's GPU; on the CPU, the process's peak RSS."""
    import torch

    from tryon_lab.bench import peak_rss_bytes

    return torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else peak_rss_bytes()


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

    import torch.distributed as dist

    from tryon_lab import checkpoint, loading, parallel, pipeline, samples
    from tryon_lab.metrics import psnr, rel_l2

    rank, world, device = parallel.init_distributed()
    _, dtype = loading.resolve_device_dtype("cuda" if device.startswith("cuda") else "cpu", a.dtype)
    cp = parallel.ContextParallel(ulysses_degree=a.ulysses or world // a.ring, ring_degree=a.ring,
                                  attention_backend=a.backend, anything=not a.exact_split)
    model_dir = checkpoint.resolve_model_dir(a.model)
    pipe = parallel.load_slim_parallel(model_dir, cp, dtype, quant=a.quant, compile=a.compile)
    s = samples.load_sample(a.sample)
    request = pipeline.TryOnRequest(s.person, s.garment, s.mask, seed=a.seed, name=s.id)
    settings = pipeline.TryOnSettings(steps=a.steps, progress=rank == 0)
    if a.compile != "none":
        pipeline.tryon(pipe, request, pipeline.TryOnSettings(steps=2, progress=False))  # compile outside the timing
    result = pipeline.tryon(pipe, request, settings)
    peaks = [None] * world
    dist.all_gather_object(peaks, peak_memory(device))
    out = {"world_size": world, "context_parallel": {"ulysses": cp.ulysses_degree, "ring": cp.ring_degree,
                                                     "backend": cp.backend, "anything": cp.anything},
           "quant": a.quant, "compile": a.compile, "steps": a.steps, "seconds": result.timings,
           "peak_memory_bytes_per_rank": peaks, "model": result.model}
    if rank == 0:
        result.images[0].save(a.out)
        if a.compare:
            single = loading.load_slim(model_dir, dtype, device)
            ref = pipeline.tryon(single, request, settings)
            out["vs_one_gpu"] = {"final_latent_rel_l2": float(rel_l2(result.latents, ref.latents)),
                                 "image_psnr_db": float(psnr(result.images[0], ref.images[0])),
                                 "one_gpu_seconds": ref.timings}
        text = json.dumps(out, indent=2, default=str)
        print(text)
        if a.json:
            Path(a.json).write_text(text + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
