"""Try-on + logo pass as one call: what the widget's Run does, callable from a notebook or a test without the UI.

    tryon (TeaCache on the main pass only) -> locate the garment's logos on the result
    -> one batched logo pass (logo LoRA enabled only there) -> result with timings and recoveries
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

from PIL import Image

from . import logos, teacache
from .images import load_image
from .loading import SlimPipeline
from .lora import adapter_enabled
from .pipeline import TryOnRequest, TryOnResult, TryOnSettings, tryon


@dataclass
class TryOnWithLogos:
    tryon: TryOnResult  # the main try-on
    logos: logos.LogoPassResult  # the logo pass on its first image
    matches: list[logos.LogoMatch]
    boxed: Image.Image  # the final image with every matched logo's box outlined
    timings: dict[str, float] = field(default_factory=dict)  # locate seconds (the passes carry their own)
    recoveries: list[str] = field(default_factory=list)  # out-of-memory recoveries of both passes
    model: str = ""

    @property
    def image(self) -> Image.Image:
        """The try-on after the logo pass."""
        return self.logos.image


def tryon_with_logos(pipe: SlimPipeline, request: TryOnRequest, settings: TryOnSettings, logo_boxes: list,
                     teacache_threshold: float = 0.0, logo_lora=None, batched: bool = True, logo_size: int = 64,
                     match_threshold: float = 0.7, on_step: Callable | None = None, tryon_lora=None) -> TryOnWithLogos:
    """One try-on, then every logo in ``logo_boxes`` (garment coordinates) located on it and redrawn in one batch.

    ``teacache_threshold`` > 0 applies TeaCache to the main try-on only; ``tryon_lora`` (a path) is enabled only for
    the try-on, ``logo_lora`` only for the logo pass: both go into one adapter slot, so on a pipeline built with
    ``lora.pass_slot`` they swap in without recompiling. ``on_step(pipe, i, t, kwargs)`` is called after every
    denoising step of both passes.
    """
    if teacache_threshold < 0:
        raise ValueError(f"TeaCache threshold must be >= 0 (0 = off), got {teacache_threshold}.")
    if settings.steps < 1:
        raise ValueError(f"steps must be >= 1, got {settings.steps}.")
    garment = load_image(request.garment, "garment")
    cache = (teacache.enabled(pipe.transformer, teacache.TeaCacheConfig(rel_l1_thresh=float(teacache_threshold),
                                                                         num_inference_steps=settings.steps))
             if teacache_threshold > 0 else nullcontext())
    with cache, adapter_enabled(pipe, tryon_lora):
        main = tryon(pipe, request, settings, callback=on_step)
    image = main.images[0]
    start = time.perf_counter()
    mask = request.mask if isinstance(request.mask, Image.Image) else None
    matches = logos.locate_logos(garment, logo_boxes, image, search_mask=mask, threshold=match_threshold)
    locate_s = time.perf_counter() - start
    passed = logos.logo_pass(pipe, image, garment, matches, settings, batched=batched, lora=logo_lora,
                             size=logo_size, seed=request.seed, callback=on_step)
    return TryOnWithLogos(main, passed, matches, logos.draw_boxes(passed.image, matches), {"locate logos": locate_s},
                          main.recoveries + passed.recoveries, main.model)
