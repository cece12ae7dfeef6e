"""The logo pass: find each garment logo on a try-on image and redraw all of them in one batched Fill call.

    validate_boxes -> locate_logos (OpenCV multi-scale template matching, below threshold = not found)
    -> logo_pass: one small diptych (logo crop | target crop) per found logo, all in ONE ``pipeline.tryon``
       call (or one call per logo), resized back and pasted with a feathered alpha -> draw_boxes

A logo the matcher cannot find is reported and skipped, never guessed. Every diptych uses its own CPU
generator (``seed + i``), so the batched and the sequential pass give the same images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .lora import use_adapter
from .oom import split_on_oom
from .pipeline import TryOnRequest, TryOnSettings, tryon
from .timers import Timings

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (pixels, x1/y1 exclusive)
DEFAULT_SCALES = tuple(float(s) for s in np.round(np.geomspace(0.4, 1.6, 15), 3))


@dataclass
class LogoMatch:
    index: int  # position in the garment's box list
    garment_box: Box
    box: Box | None  # where it is on the try-on image; None when not found
    confidence: float  # best TM_CCOEFF_NORMED score over all scales and positions
    scale: float
    found: bool


@dataclass
class LogoPassResult:
    image: Image.Image  # the try-on with every found logo redrawn
    patches: list[Image.Image]  # generated target crops, at the diptych size, one per found logo
    matches: list[LogoMatch]
    timings: dict[str, float]  # prepare / generate / paste (+ total), seconds
    batched: bool
    calls: int  # pipeline calls made
    skipped: list[int] = field(default_factory=list)  # indices of logos not found
    lora: str | None = None
    recoveries: list[str] = field(default_factory=list)  # out-of-memory splits and retries made on the way


def validate_box(box, size: tuple[int, int], name: str = "box") -> Box:
    """Integer box inside an image of ``size`` (width, height) with positive area, else a ValueError saying why."""
    try:
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {box!r}: expected four numbers x0, y0, x1, y1.") from None
    w, h = size
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{name} ({x0}, {y0}, {x1}, {y1}) has zero size: need x1 > x0 and y1 > y0 "
                         f"(image is {w}x{h}).")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise ValueError(f"{name} ({x0}, {y0}, {x1}, {y1}) lies outside the image of {w}x{h}: "
                         f"keep 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}.")
    return x0, y0, x1, y1


def validate_boxes(boxes, size: tuple[int, int], what: str = "logo box") -> list[Box]:
    return [validate_box(b, size, f"{what} {i}") for i, b in enumerate(boxes)]


def parse_boxes(text: str) -> list[Box]:
    """``"x0,y0,x1,y1; x0,y0,x1,y1"`` -> boxes (empty text -> no boxes); bad syntax -> ValueError."""
    boxes = []
    for i, part in enumerate(p.strip() for p in (text or "").replace("\n", ";").split(";")):
        if not part:
            continue
        nums = [v for v in part.replace(" ", ",").split(",") if v]
        try:
            vals = tuple(int(round(float(v))) for v in nums)
        except ValueError:
            raise ValueError(f"logo box {i} {part!r}: not numbers; write boxes as 'x0,y0,x1,y1; ...'.") from None
        if len(vals) != 4:
            raise ValueError(f"logo box {i} {part!r}: needs 4 numbers x0,y0,x1,y1, got {len(vals)}.")
        boxes.append(vals)
    return boxes


def format_boxes(boxes) -> str:
    return "; ".join(",".join(str(int(v)) for v in b) for b in boxes)


def _gray(img) -> np.ndarray:
    img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
    return np.asarray(img.convert("L"), dtype=np.float32)


def _match_one(template: np.ndarray, search: np.ndarray, allowed: np.ndarray | None, scales) -> tuple[float, Box | None, float]:
    best = (-1.0, None, 0.0)
    th0, tw0 = template.shape
    for s in scales:
        tw, th = max(3, round(tw0 * s)), max(3, round(th0 * s))
        if tw > search.shape[1] or th > search.shape[0]:
            continue
        t = cv2.resize(template, (tw, th), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        if float(t.std()) < 1e-3:  # a flat template correlates with nothing
            continue
        res = cv2.matchTemplate(search, t, cv2.TM_CCOEFF_NORMED)
        res = np.nan_to_num(res, nan=-1.0, posinf=-1.0, neginf=-1.0)
        if allowed is not None:  # the template's centre must lie in the search mask
            centre = allowed[th // 2: th // 2 + res.shape[0], tw // 2: tw // 2 + res.shape[1]]
            res = np.where(centre, res, -1.0)
        _, score, _, (x, y) = cv2.minMaxLoc(res)
        if score > best[0]:
            best = (float(score), (int(x), int(y), int(x + tw), int(y + th)), float(s))
    return best


def locate_logos(garment, boxes, tryon_image, search_mask=None, threshold: float = 0.7,
                 scales=DEFAULT_SCALES) -> list[LogoMatch]:
    """Find each garment logo (``boxes`` on ``garment``) on ``tryon_image`` by multi-scale template matching.

    ``search_mask`` (an image the try-on's size, white = allowed) restricts where a logo's centre may be.
    A best score below ``threshold`` means not found (``box=None``): the logo is skipped, never guessed.
    """
    garment = garment if isinstance(garment, Image.Image) else Image.fromarray(np.asarray(garment))
    boxes = validate_boxes(boxes, garment.size, "garment logo box")
    search = _gray(tryon_image)
    allowed = None
    if search_mask is not None:
        m = search_mask if isinstance(search_mask, Image.Image) else Image.fromarray(np.asarray(search_mask))
        if m.size != (search.shape[1], search.shape[0]):
            raise ValueError(f"search_mask is {m.size[0]}x{m.size[1]}, the try-on image "
                             f"{search.shape[1]}x{search.shape[0]}: give a mask the try-on image's size.")
        allowed = np.asarray(m.convert("L")) >= 128
    g = _gray(garment)
    out = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        score, box, scale = _match_one(g[y0:y1, x0:x1], search, allowed, scales)
        found = box is not None and score >= threshold
        out.append(LogoMatch(i, (x0, y0, x1, y1), box if found else None, score, scale, found))
    return out


def diptych_mask(size: int, margin: int | None = None) -> Image.Image:
    """The repaint mask of a target crop: all but a ``margin`` border kept as context."""
    margin = max(1, size // 8) if margin is None else margin
    m = np.zeros((size, size), np.uint8)
    m[margin:size - margin, margin:size - margin] = 255
    return Image.fromarray(m, "L")


def feather(mask: Image.Image, size: tuple[int, int], radius: float) -> Image.Image:
    """``mask`` resized to ``size`` and Gaussian-blurred: the alpha a patch is pasted with."""
    alpha = mask.resize(size, Image.BILINEAR)
    return alpha.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else alpha


def logo_requests(tryon_image: Image.Image, garment: Image.Image, matches: list[LogoMatch], size: int = 64,
                  seed: int = 0) -> tuple[list[TryOnRequest], list[LogoMatch]]:
    """One diptych request per found logo: garment = logo crop, person = target crop at ``size`` x ``size``."""
    found = [m for m in matches if m.found]
    mask = diptych_mask(size)
    reqs = [TryOnRequest(tryon_image.crop(m.box).convert("RGB").resize((size, size), Image.BICUBIC),
                         garment.crop(m.garment_box).convert("RGB").resize((size, size), Image.BICUBIC),
                         mask, seed=seed + m.index, name=f"logo{m.index}") for m in found]
    return reqs, found


def logo_pass(pipe, tryon_image, garment, matches: list[LogoMatch], settings: TryOnSettings | None = None,
              batched: bool = True, lora=None, size: int = 64, seed: int = 0, feather_px: float | None = None,
              callback=None) -> LogoPassResult:
    """Redraw every found logo: one batched ``pipeline.tryon`` call (``batched``) or one call per logo.

    ``lora``: path of a logo LoRA, loaded on first use and kept loaded (a different one is hotswapped in if
    ``prepare_hotswap`` was called), enabled only during the pass; None runs the plain model. Patches are pasted
    with a feathered alpha.
    """
    settings = settings or TryOnSettings(progress=False)
    tryon_image = tryon_image if isinstance(tryon_image, Image.Image) else Image.fromarray(np.asarray(tryon_image))
    tryon_image = tryon_image.convert("RGB")
    garment = garment if isinstance(garment, Image.Image) else Image.fromarray(np.asarray(garment))
    timings = Timings(device=getattr(pipe, "device", None))
    with timings.stage("prepare"):
        for m in matches:
            if m.found:
                validate_box(m.box, tryon_image.size, f"matched box of logo {m.index}")
        reqs, found = logo_requests(tryon_image, garment, matches, size, seed)
        used = use_adapter(pipe, lora) if reqs else None
    patches: list[Image.Image] = []
    calls = 0
    recoveries: list[str] = []
    with timings.stage("generate"):
        try:
            if reqs and batched:  # one call; halved and retried while it runs out of memory
                def run(batch):
                    out = tryon(pipe, list(batch), settings, callback=callback)
                    recoveries.extend(out.recoveries)
                    return out.images

                patches, calls = split_on_oom(run, reqs, recoveries)
            else:
                for r in reqs:
                    out = tryon(pipe, r, settings, callback=callback)
                    recoveries.extend(out.recoveries)
                    patches += out.images
                    calls += 1
        finally:
            if used:  # kept loaded for the next pass, off for everything else
                pipe.fill.disable_lora()
    with timings.stage("paste"):
        out = tryon_image.copy()
        mask = diptych_mask(size)
        for m, patch in zip(found, patches, strict=True):
            x0, y0, x1, y1 = m.box
            bw, bh = x1 - x0, y1 - y0
            radius = feather_px if feather_px is not None else max(0.5, min(bw, bh) / 12)
            out.paste(patch.resize((bw, bh), Image.BICUBIC), (x0, y0), feather(mask, (bw, bh), radius))
    return LogoPassResult(out, patches, list(matches), timings.as_dict(), batched, calls,
                          [m.index for m in matches if not m.found], used, recoveries)


def draw_boxes(image, matches: list[LogoMatch], color=(0, 255, 0), width: int = 1) -> Image.Image:
    """A copy of ``image`` with every found logo's box outlined."""
    img = (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    for m in matches:
        if m.found:
            x0, y0, x1, y1 = m.box
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=color, width=width)
    return img


def match_rows(matches: list[LogoMatch]) -> list[dict]:
    """One table row per logo: where it was found, how sure, or that it was skipped."""
    return [{"logo": m.index, "garment box": str(m.garment_box), "found": m.found,
             "box": str(m.box) if m.found else "not found (skipped)", "confidence": round(m.confidence, 3),
             "scale": m.scale} for m in matches]


def known_matches(garment_boxes, target_boxes) -> list[LogoMatch]:
    """Matches from known boxes (e.g. a sample's ``target_logo_boxes``), for benchmarks: confidence 1."""
    return [LogoMatch(i, tuple(g), tuple(t), 1.0, 1.0, True)
            for i, (g, t) in enumerate(zip(garment_boxes, target_boxes, strict=True))]
