"""One try-on: person, garment, mask -> images + a timing record, as a few plain functions.

    prepare -> encode_garments (Redux, cached by garment hash) -> conditioning (+ cached text)
    -> denoise (FLUX Fill, tqdm, hooks) -> decode (VAE) -> crop the person side back

Denoising is diffusers' own ``FluxFillPipeline`` loop (called with pre-computed embeddings and
``output_type="latent"``), so caches, compilation, FP8 and LoRA act on the same transformer module
the stock pipeline uses, and the slim path reproduces the stock one exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from .checkpoint import FLUX_TEXT_TOKENS, TRYON_PROMPT, describe_model, text_tokens
from .fill_setup import unpack
from .images import ImageInputError, PreparedInput, image_hash, paste_back, person_half, prepare_input
from .loading import SlimPipeline, StandardPipeline
from .oom import retry_with_vae_tiling
from .redux_process import encode_garment  # the one Redux encode (callers import it from here too)
from .timers import Timings


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
    hot_path: bool | None = None  # the preallocated, bit-identical loop (hotpath.py); None: the pipeline's default


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


def check_even_split(prepared: list[PreparedInput], multiple: int) -> None:
    """Context parallelism without ``ulysses_anything`` needs the image tokens to divide by the degree too."""
    width, height = prepared[0].diptych.size
    tokens = (width // 16) * (height // 16)
    if multiple > 1 and tokens % multiple:
        raise ImageInputError(f"the diptych {width}x{height} has {tokens} image tokens, which do not split evenly over "
                              f"{multiple} GPUs; choose a person size whose (width/8 x height/16) divides by {multiple}, "
                              "or use ContextParallel(anything=True).")


def garment_of(p: PreparedInput) -> Image.Image:
    tw, th = p.fitted_size
    return p.diptych.crop((0, 0, tw, th))


@torch.no_grad()
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


def conditioning(text_embeds: torch.Tensor, pooled: torch.Tensor, image_tokens: torch.Tensor, multiple: int = 1):
    """Cached text embeddings followed by each request's Redux tokens, as Redux concatenates them.

    ``multiple``: pad the text part with copies of its last position (a T5 padding token's encoding) until the
    whole text sequence divides by it, so context parallelism splits it evenly without ``ulysses_anything``.
    """
    batch = image_tokens.shape[0]
    pad = -(text_embeds.shape[1] + image_tokens.shape[1]) % multiple
    if pad:
        text_embeds = torch.cat([text_embeds, text_embeds[:, -1:].expand(-1, pad, -1)], dim=1)
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
    if not callable(fill):  # fill_setup.FillParts: built without diffusers' pipeline class (redux_process=True)
        raise ValueError("this pipeline was built with redux_process=True, which runs the hot path only; leave "
                         "TryOnSettings.hot_path at None (the pipeline's default) or True.")
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
    latents = unpack(latents, height, width, fill.vae_scale_factor)
    latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


def decode(fill, latents: torch.Tensor, height: int, width: int, hot_path: bool = False,
           copy_streams: dict | None = None) -> list[Image.Image]:
    """Packed latents to PIL images.

    ``hot_path``: the same pixels, postprocessed on the device and copied to the host as uint8 (on the
    side streams in ``copy_streams``, the pipeline's).
    """
    image = vae_decode(fill, latents, height, width)
    if hot_path:
        from .hotpath import pixels_to_host

        return pixels_to_host(image, streams=copy_streams).images()
    return fill.image_processor.postprocess(image, output_type="pil")


def decode_async(fill, latents: torch.Tensor, height: int, width: int, copy_streams: dict | None = None):
    """``decode`` on the hot path without waiting: a ``hotpath.HostImages`` whose ``images()`` waits for the copy."""
    from .hotpath import pixels_to_host

    return pixels_to_host(vae_decode(fill, latents, height, width), streams=copy_streams)


def _finish(fill, prepared, latents, timings: Timings, settings: TryOnSettings, recoveries: list[str],
            copy_streams: dict | None = None) -> tuple[list[Image.Image], list[Image.Image]]:
    width, height = prepared[0].diptych.size
    with timings.stage("decode"):
        diptychs = retry_with_vae_tiling(
            lambda: decode(fill, latents, height, width, bool(settings.hot_path), copy_streams), fill.vae,
            recoveries, "decode")
    cut = paste_back if settings.paste_back else person_half  # paste-back at the input's own size (images.py)
    return [cut(d, p) for d, p in zip(diptychs, prepared, strict=True)], diptychs


def tryon(pipe: SlimPipeline, requests: TryOnRequest | list[TryOnRequest],
          settings: TryOnSettings | None = None, callback=None) -> TryOnResult:
    """Run one or a batch of try-ons on the slim pipeline.

    Out of memory in the denoise (its VAE encode) or the decode: retried once with VAE tiling, noted in
    ``recoveries``; latents already made are kept, never recomputed.
    """
    settings = settings or TryOnSettings()
    if settings.hot_path is None:
        settings = replace(settings, hot_path=pipe.hot_path)
    requests = [requests] if isinstance(requests, TryOnRequest) else list(requests)
    timings = Timings(device=pipe.device)
    recoveries: list[str] = []
    with timings.stage("prepare"):
        prepared = prepare(requests, settings.fit)
        check_even_split(prepared, pipe.text_multiple)
    with timings.stage("redux"):
        tokens, hits = encode_garments(pipe, [garment_of(p) for p in prepared])
        prompt_embeds, pooled = conditioning(pipe.prompt_embeds, pipe.pooled_prompt_embeds, tokens, pipe.text_multiple)
    with timings.stage("denoise"):
        latents = retry_with_vae_tiling(
            lambda: denoise(pipe.fill, prepared, prompt_embeds, pooled, settings, [r.seed for r in requests], callback),
            pipe.fill.vae, recoveries, "denoise")
    images, diptychs = _finish(pipe.fill, prepared, latents, timings, settings, recoveries, pipe.copy_streams)
    return TryOnResult(images, diptychs, latents.float().cpu(), timings.as_dict(), [p.notes for p in prepared], hits,
                       pipe.description, recoveries)


def stock_prompt(std: StandardPipeline) -> dict:
    """The prompt arguments of a stock Redux call: the prompt itself, which the Redux pipeline pads to 512 T5
    tokens, or for a model padded to another length (``checkpoint.text_tokens``) the stock ``encode_prompt`` run
    live at that length (what a stock user of such a model passes)."""
    n = text_tokens(std.model_dir)
    if n == FLUX_TEXT_TOKENS:
        return {"prompt": TRYON_PROMPT}
    embeds, pooled, _ = std.redux.encode_prompt(prompt=TRYON_PROMPT, prompt_2=None, device=torch.device(std.device),
                                                max_sequence_length=n)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


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
        outs = [std.redux(garment_of(p), **stock_prompt(std), return_dict=False) for p in prepared]
        prompt_embeds = torch.cat([o[0] for o in outs], dim=0)
        pooled = torch.cat([o[1] for o in outs], dim=0)
    with timings.stage("denoise"):
        latents = denoise(std.fill, prepared, prompt_embeds, pooled, settings, [r.seed for r in requests])
    images, diptychs = _finish(std.fill, prepared, latents, timings, settings, [])
    return TryOnResult(images, diptychs, latents.float().cpu(), timings.as_dict(), [p.notes for p in prepared], 0,
                       describe_model(std.model_dir))
