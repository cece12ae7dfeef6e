"""One try-on spread over several GPUs with diffusers' context parallelism (one process per GPU, ``torchrun``).

Every rank builds the slim pipeline with ``configure.build_pipeline(..., context_parallel=...)`` (cached
embeddings, optional FP8 / compile) on its own GPU, the transformer's tokens are split over the ranks, and rank 0
saves the image. ``compare`` then runs the same request on rank 0 through the plain pipeline (one process, no
context parallelism, FP8 or compile) and reports final-latent rel-L2 and image PSNR against it; every run
reports the peak memory of each rank. Context parallelism needs an accelerator (diffusers places each rank on
one); on the CPU ``parallel.enable_context_parallel`` refuses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import checkpoint, pipeline, samples
from ..configure import PipelineOptions, build_pipeline
from ..metrics import psnr, rel_l2
from ..parallel import ContextParallel, init_distributed
from ..timers import peak_memory_bytes


def run(model: str = "default", sample: str = "s000", steps: int = 28, seed: int = 0, ulysses: int | None = None,
        ring: int = 1, backend: str | None = None, exact_split: bool = False, quant: str = "none",
        compile: str = "none", dtype: str = "auto", compare: bool = False, out: str | Path = "context_parallel.png",
        json_out: str | Path | None = None) -> dict:
    """Every rank calls this; rank 0 saves the image to ``out`` and returns (and prints, and writes to
    ``json_out``) the numbers: seconds per stage, peak memory per rank and, with ``compare``, the difference to
    one process."""
    import torch.distributed as dist

    # before joining the process group: transformers' save_pretrained writes nothing on a non-main rank, so a
    # random checkpoint built after init_distributed by rank 1 would lack its text and image encoders
    model_dir = checkpoint.resolve_model_dir(model)
    rank, world, device = init_distributed()
    cp = ContextParallel(ulysses_degree=ulysses or world // ring, ring_degree=ring, attention_backend=backend,
                         anything=not exact_split)
    options = PipelineOptions(dtype=dtype, fp8=quant, compile=compile)
    pipe = build_pipeline(model_dir, options, context_parallel=cp)
    s = samples.load_sample(sample)
    request = pipeline.TryOnRequest(s.person, s.garment, s.mask, seed=seed, name=s.id)
    settings = pipeline.TryOnSettings(steps=steps, progress=rank == 0)
    if compile != "none":
        pipeline.tryon(pipe, request, pipeline.TryOnSettings(steps=2, progress=False))  # compile outside the timing
    result = pipeline.tryon(pipe, request, settings)
    peaks = [None] * world
    dist.all_gather_object(peaks, peak_memory_bytes(device))
    res = {"world_size": world, "context_parallel": {"ulysses": cp.ulysses_degree, "ring": cp.ring_degree,
                                                     "backend": cp.backend, "anything": cp.anything},
           "quant": quant, "compile": compile, "steps": steps, "seconds": result.timings,
           "peak_memory_bytes_per_rank": peaks, "model": result.model}
    if rank == 0:
        result.images[0].save(out)
        if compare:
            single = build_pipeline(model_dir, PipelineOptions(device=device, dtype=dtype))
            ref = pipeline.tryon(single, request, settings)
            res["vs_one_gpu"] = {"final_latent_rel_l2": float(rel_l2(result.latents, ref.latents)),
                                 "image_psnr_db": float(psnr(result.images[0], ref.images[0])),
                                 "one_gpu_seconds": ref.timings}
        text = json.dumps(res, indent=2, default=str)
        print(text)
        if json_out:
            Path(json_out).write_text(text + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return res


def padding_effect(model: str = "default", sample_ids: tuple[str, ...] = ("s004", "s005", "s006", "s007"),
                   steps: int = 20, pad_tokens: int = 1) -> dict:
    """What the even split's text padding does to a try-on, in one process: each sample with and without
    ``pad_tokens`` extra T5 padding positions (as ``text_multiple`` adds them), image PSNR and latent rel-L2."""
    pipe = build_pipeline(checkpoint.resolve_model_dir(model), PipelineOptions())
    settings = pipeline.TryOnSettings(steps=steps, progress=False)
    text, rows = pipe.prompt_embeds, []
    for sid in sample_ids:
        s = samples.load_sample(sid)
        request = pipeline.TryOnRequest(s.person, s.garment, s.mask, seed=0, name=s.id)
        plain = pipeline.tryon(pipe, request, settings)
        n = text.shape[1] + next(iter(pipe.redux_cache.values())).shape[1]
        pipe.prompt_embeds = torch.cat([text, text[:, -1:].expand(-1, pad_tokens, -1)], dim=1)  # as conditioning pads
        try:
            padded = pipeline.tryon(pipe, request, settings)
        finally:
            pipe.prompt_embeds = text
        rows.append({"sample": s.id, "text_tokens": n, "padded_to": n + pad_tokens,
                     "image_psnr_db": psnr(padded.images[0], plain.images[0]),
                     "latent_rel_l2": rel_l2(padded.latents, plain.latents)})
    return {"model": pipe.description, "steps": steps, "rows": rows,
            "min_psnr_db": min(r["image_psnr_db"] for r in rows),
            "max_latent_rel_l2": max(r["latent_rel_l2"] for r in rows)}
