"""One try-on: person, garment, mask -> images + a timing record, as a few plain functions.

    prepare -> encode_garments (Redux, cached by garment hash) -> conditioning (+ cached text)
    -> denoise (FLUX Fill, tqdm, hooks) -> decode (VAE) -> crop the person side back

Denoising is diffusers' own ``FluxFillPipeline`` loop (called with pre-computed embeddings and
``output_type="latent"``), so caches, compilation, FP8 and LoRA act on the same transformer module
the stock pipeline uses, and the slim path reproduces the stock one exactly.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from .bench import Timings, sync
from .checkpoint import TRYON_PROMPT, describe_model
from .images import ImageInputError, PreparedInput, image_hash, person_half, prepare_input
from .loading import SlimPipeline, StandardPipeline
from .memory import retry_with_vae_tiling


@dataclass
class TryOnRequest:
    person: object  # path, PIL image or array
    garment: object
    mask: object
    seed: int = 0
    name: str = ""


@dataclass
class TryOnSettings:
    steps: int = 20
    guidance_scale: float = 30.0  # FLUX Fill is used around 30
    fit: str = "pad"  # 'pad' or 'resize' to multiples of 16 (see images.py)
    progress: bool = True
    paste_back: bool = True  # keep the person's own pixels outside the mask (the VAE round trip blurs them)
    hot_path: bool = False  # the preallocated, bit-identical denoise loop and on-device postprocess (hotpath.py)


@dataclass
class TryOnResult:
    images: list[Image.Image]  # the person side, at each input's size (pasted back outside the mask)
    diptychs: list[Image.Image]  # full generated diptychs (garment | person), as decoded
    latents: torch.Tensor  # final packed latents (batch, tokens, channels), on the CPU
    timings: dict[str, float]
    notes: list[list[str]] = field(default_factory=list)  # conversions applied to each input
    redux_cache_hits: int = 0
    model: str = ""
    recoveries: list[str] = field(default_factory=list)  # out-of-memory recoveries made on the way


def prepare(requests: list[TryOnRequest], fit: str = "pad") -> list[PreparedInput]:
    """Validate and compose every request; a batch must share one fitted size."""
    prepared = [prepare_input(r.person, r.garment, r.mask, fit) for r in requests]
    sizes = {p.fitted_size for p in prepared}
    if len(sizes) > 1:
        raise ImageInputError(f"a batch must share one image size after fitting; got {sorted(sizes)}. "
                              "Resize the persons to one size or run them as separate calls.")
    return prepared


def garment_of(p: PreparedInput) -> Image.Image:
    tw, th = p.fitted_size
    return p.diptych.crop((0, 0, tw, th))


@torch.no_grad()
def encode_garment(redux, garment: Image.Image) -> torch.Tensor:
    """Redux image tokens for one garment (1, tokens, joint_attention_dim), as the stock Redux pipeline makes them."""
    device = redux.image_encoder.device
    hidden = redux.encode_image(garment, device, 1)
    return redux.image_embedder(hidden).image_embeds.to(device=device)


def encode_garments(pipe: SlimPipeline, garments: list[Image.Image]) -> tuple[torch.Tensor, int]:
    """Redux tokens for each garment, reusing the process-level cache keyed by pixel hash."""
    tokens, hits = [], 0
    for g in garments:
        key = image_hash(g)
        if key in pipe.redux_cache:
            hits += 1
        else:
            pipe.redux_cache[key] = encode_garment(pipe.redux, g)
        tokens.append(pipe.redux_cache[key])
    return torch.cat(tokens, dim=0), hits


def conditioning(text_embeds: torch.Tensor, pooled: torch.Tensor, image_tokens: torch.Tensor):
    """Cached text embeddings followed by each request's Redux tokens, as Redux concatenates them."""
    batch = image_tokens.shape[0]
    prompt_embeds = torch.cat([text_embeds.expand(batch, -1, -1).to(image_tokens.dtype), image_tokens], dim=1)
    return prompt_embeds, pooled.expand(batch, -1)


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per request: the same seed gives the same noise on any device and batch position."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def denoise(fill, prepared: list[PreparedInput], prompt_embeds: torch.Tensor, pooled: torch.Tensor,
            settings: TryOnSettings, seeds: list[int], callback=None) -> torch.Tensor:
    """FLUX Fill sampling; returns the final packed latents."""
    width, height = prepared[0].diptych.size
    if settings.hot_path:
        from . import hotpath

        state = hotpath.prepare_state(fill, [p.diptych for p in prepared], [p.mask for p in prepared],
                                      prompt_embeds, pooled, height, width, settings.steps,
                                      settings.guidance_scale, generators(seeds))
        on_step = None if callback is None else lambda i: callback(fill, i, None, {})
        return hotpath.denoise_hot(fill, state, settings.progress, on_step)
    fill.set_progress_bar_config(disable=not settings.progress, desc="denoise", leave=False)
    return fill(
        image=[p.diptych for p in prepared],
        mask_image=[p.mask for p in prepared],
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        height=height,
        width=width,
        guidance_scale=settings.guidance_scale,
        num_inference_steps=settings.steps,
        generator=generators(seeds),
        output_type="latent",
        callback_on_step_end=callback,
    ).images


@torch.no_grad()
def vae_decode(fill, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Unpack, unscale and VAE-decode packed latents (the stock pipeline's final lines): images in [-1, 1]."""
    vae = fill.vae
    latents = fill._unpack_latents(latents, height, width, fill.vae_scale_factor)
    latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


def decode(fill, latents: torch.Tensor, height: int, width: int, hot_path: bool = False) -> list[Image.Image]:
    """Packed latents to PIL images.

    ``hot_path``: the same pixels, postprocessed on the device and copied to the host as uint8.
    """
    image = vae_decode(fill, latents, height, width)
    if hot_path:
        from .hotpath import pixels_to_host

        return pixels_to_host(image).images()
    return fill.image_processor.postprocess(image, output_type="pil")


def decode_async(fill, latents: torch.Tensor, height: int, width: int):
    """``decode`` on the hot path without waiting: a ``hotpath.HostImages`` whose ``images()`` waits for the copy."""
    from .hotpath import pixels_to_host

    return pixels_to_host(vae_decode(fill, latents, height, width))


def _finish(fill, prepared, latents, timings: Timings, settings: TryOnSettings,
            recoveries: list[str]) -> tuple[list[Image.Image], list[Image.Image]]:
    width, height = prepared[0].diptych.size
    with timings.stage("decode"):
        diptychs = retry_with_vae_tiling(lambda: decode(fill, latents, height, width, settings.hot_path), fill.vae,
                                         recoveries, "decode")
    if settings.paste_back:
        kept = [Image.composite(d, p.diptych, p.mask) for d, p in zip(diptychs, prepared, strict=True)]
    else:
        kept = diptychs
    return [person_half(d, p) for d, p in zip(kept, prepared, strict=True)], diptychs


def tryon(pipe: SlimPipeline, requests: TryOnRequest | list[TryOnRequest],
          settings: TryOnSettings | None = None, callback=None) -> TryOnResult:
    """Run one or a batch of try-ons on the slim pipeline.

    Out of memory in the denoise (its VAE encode) or the decode: retried once with VAE tiling, noted in
    ``recoveries``; latents already made are kept, never recomputed.
    """
    settings = settings or TryOnSettings()
    requests = [requests] if isinstance(requests, TryOnRequest) else list(requests)
    timings = Timings(device=pipe.device)
    recoveries: list[str] = []
    with timings.stage("prepare"):
        prepared = prepare(requests, settings.fit)
    with timings.stage("redux"):
        tokens, hits = encode_garments(pipe, [garment_of(p) for p in prepared])
        prompt_embeds, pooled = conditioning(pipe.prompt_embeds, pipe.pooled_prompt_embeds, tokens)
    with timings.stage("denoise"):
        latents = retry_with_vae_tiling(
            lambda: denoise(pipe.fill, prepared, prompt_embeds, pooled, settings, [r.seed for r in requests], callback),
            pipe.fill.vae, recoveries, "denoise")
    images, diptychs = _finish(pipe.fill, prepared, latents, timings, settings, recoveries)
    return TryOnResult(images, diptychs, latents.float().cpu(), timings.as_dict(), [p.notes for p in prepared], hits,
                       pipe.description, recoveries)


def tryon_standard(std: StandardPipeline, requests: TryOnRequest | list[TryOnRequest],
                   settings: TryOnSettings | None = None) -> TryOnResult:
    """The same try-on the stock way: Redux pipeline with live T5/CLIP prompt encoding, then Fill."""
    settings = settings or TryOnSettings()
    requests = [requests] if isinstance(requests, TryOnRequest) else list(requests)
    timings = Timings(device=std.device)
    with timings.stage("prepare"):
        prepared = prepare(requests, settings.fit)
    with timings.stage("redux"):
        # one Redux call per garment: the stock Redux pipeline sums a batch of images into one prompt
        outs = [std.redux(garment_of(p), prompt=TRYON_PROMPT, return_dict=False) for p in prepared]
        prompt_embeds = torch.cat([o[0] for o in outs], dim=0)
        pooled = torch.cat([o[1] for o in outs], dim=0)
    with timings.stage("denoise"):
        latents = denoise(std.fill, prepared, prompt_embeds, pooled, settings, [r.seed for r in requests])
    images, diptychs = _finish(std.fill, prepared, latents, timings, settings, [])
    return TryOnResult(images, diptychs, latents.float().cpu(), timings.as_dict(), [p.notes for p in prepared], 0,
                       describe_model(std.model_dir))


def compare_denoise_loops(pipe: SlimPipeline, request: TryOnRequest, settings: TryOnSettings) -> tuple[list[dict], bool]:
    """The stock loop and the hot path on one request, each after a warm-up call: one row per loop with its
    denoise seconds and, on CUDA, allocations per step outside and inside the transformer (steps after the
    first); and whether the final latents are bit-identical."""
    from .hotpath import StepAllocations

    prepared = prepare([request], settings.fit)
    tokens, _ = encode_garments(pipe, [garment_of(p) for p in prepared])
    prompt_embeds, pooled = conditioning(pipe.prompt_embeds, pipe.pooled_prompt_embeds, tokens)
    cuda = torch.device(pipe.device).type == "cuda"
    rows, latents = [], []
    for name, hot in (("stock loop", False), ("hot path", True)):
        s = replace(settings, hot_path=hot, progress=False)
        run = lambda s=s: denoise(pipe.fill, prepared, prompt_embeds, pooled, s, [request.seed])  # noqa: E731
        run()  # warm-up
        counter = StepAllocations(pipe.transformer, pipe.device) if cuda else nullcontext()
        sync(pipe.device)
        start = time.perf_counter()
        with counter:
            latents.append(run().clone())
        sync(pipe.device)
        row = {"loop": name, "denoise s": time.perf_counter() - start}
        if cuda:
            steps = counter.per_step()[1:]
            row["allocations per step outside the model"] = sum(r["loop"] for r in steps) / max(1, len(steps))
            row["allocations per step in the model"] = sum(r["model"] for r in steps) / max(1, len(steps))
        rows.append(row)
    return rows, bool(torch.equal(latents[0], latents[1]))
