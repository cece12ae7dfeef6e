"""The stock denoise loop against the hot path: allocations per step, bit-identity, and the output copy.

    compare_denoise_loops  one request through both loops: denoise seconds, allocations per step (CUDA),
                           whether the final latents are bit-identical
    async_copy             N requests back to back: PIL after a blocking decode against the copy to the host
                           overlapped with the next request (``pipeline.decode_async``)
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch

from ..hotpath import StepAllocations
from ..loading import SlimPipeline
from ..pipeline import (
    TryOnRequest,
    TryOnSettings,
    conditioning,
    decode,
    decode_async,
    denoise,
    encode_garments,
    garment_of,
    prepare,
)
from ..timers import measure


def _conditioned(pipe: SlimPipeline, request: TryOnRequest, fit: str):
    prepared = prepare([request], fit)
    tokens, _ = encode_garments(pipe, [garment_of(p) for p in prepared])
    prompt_embeds, pooled = conditioning(pipe.prompt_embeds, pipe.pooled_prompt_embeds, tokens)
    return prepared, prompt_embeds, pooled


def compare_denoise_loops(pipe: SlimPipeline, request: TryOnRequest, settings: TryOnSettings) -> tuple[list[dict], bool]:
    """The stock loop and the hot path on one request, each after a warm-up call: one row per loop with its
    denoise seconds and, on CUDA, allocations per step outside and inside the transformer (steps after the
    first); and whether the final latents are bit-identical."""
    prepared, prompt_embeds, pooled = _conditioned(pipe, request, settings.fit)
    cuda = torch.device(pipe.device).type == "cuda"
    rows, latents = [], []
    for name, hot in (("stock loop", False), ("hot path", True)):
        s = replace(settings, hot_path=hot, progress=False)
        run = lambda s=s: denoise(pipe.fill, prepared, prompt_embeds, pooled, s, [request.seed])  # noqa: E731
        run()  # warm-up
        counter = StepAllocations(pipe.transformer, pipe.device) if cuda else nullcontext()
        with measure(pipe.device) as m, counter:
            latents.append(run().clone())
        row = {"loop": name, "denoise s": m["seconds"]}
        if cuda:
            steps = counter.per_step()[1:]
            row["allocations per step outside the model"] = sum(r["loop"] for r in steps) / max(1, len(steps))
            row["allocations per step in the model"] = sum(r["model"] for r in steps) / max(1, len(steps))
        rows.append(row)
    return rows, bool(torch.equal(latents[0], latents[1]))


def async_copy(pipe: SlimPipeline, request: TryOnRequest, steps: int, requests: int = 4) -> dict:
    """``requests`` hot-path requests back to back, decoded with a blocking copy and with the copy overlapped
    with the next request (after one warm-up round): seconds of each, ms saved per request, same images."""
    prepared, prompt_embeds, pooled = _conditioned(pipe, request, "pad")
    w, h = prepared[0].diptych.size
    settings = TryOnSettings(steps=steps, progress=False, hot_path=True)

    def run(overlap: bool) -> tuple[float, list]:
        images, pending = [], None
        with measure(pipe.device) as m:
            for i in range(requests):
                latents = denoise(pipe.fill, prepared, prompt_embeds, pooled, settings, [i])
                if not overlap:
                    images += decode(pipe.fill, latents, h, w)
                    continue
                nxt = decode_async(pipe.fill, latents, h, w, pipe.copy_streams)
                if pending is not None:
                    images += pending.images()
                pending = nxt
            if pending is not None:
                images += pending.images()
        return m["seconds"], images

    run(True)
    t_sync, im_sync = run(False)
    t_async, im_async = run(True)
    return {"requests": requests, "sync_copy_s": t_sync, "async_copy_s": t_async,
            "saved_ms_per_request": 1e3 * (t_sync - t_async) / requests,
            "async_images_identical": all(np.array_equal(np.asarray(x), np.asarray(y))
                                          for x, y in zip(im_sync, im_async, strict=True))}


def hot_path_report(pipe: SlimPipeline, request: TryOnRequest, steps: int, requests: int = 4) -> dict:
    """``compare_denoise_loops`` and ``async_copy`` as one flat record (the memory benchmark's hot-path part)."""
    rows, identical = compare_denoise_loops(pipe, request, TryOnSettings(steps=steps))
    out = {}
    for key, row in zip(("stock", "hot"), rows, strict=True):
        if "allocations per step outside the model" in row:  # CUDA only
            out[f"{key}_loop_allocations_per_step"] = row["allocations per step outside the model"]
            out[f"{key}_model_allocations_per_step"] = row["allocations per step in the model"]
        out[f"{key}_denoise_s"] = row["denoise s"]
    return {**out, "bit_identical": identical, **async_copy(pipe, request, steps, requests)}
