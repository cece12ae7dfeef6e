"""Image input handling: validate, convert, fit to the model's grid, and build the in-context diptych.

Documented conversions (everything else is a clear ``ImageInputError``); ``prepare_input`` lists each one it
applied in ``PreparedInput.notes`` (so ``TryOnResult.notes`` reports them):
- an EXIF orientation (phone photos): turned upright, as image viewers show them;
- RGBA / LA / PA / P with transparency: composited over white (garment photos are product shots on white);
- CMYK, P, L, I;16 / I (16/32-bit), F (float in [0, 1] or [0, 255]): converted to 8-bit RGB; a 16-bit RGB(A) PNG
  (which PIL reads as 8 bits per channel) and uint16 / float arrays are reduced to 8 bits, each noted;
- masks: any mode becomes 8-bit ``L`` (transparent pixels = keep) and is binarised at 128 (white = repaint,
  black = keep); a mask of the person's aspect ratio but another size is resized to it (nearest neighbour);
- sizes that are not multiples of 16: the person and mask are padded (edge pixels, mask 0) up to the
  next multiple of 16 and the output is cropped back, so the result has the input size exactly
  (``fit="pad"``, default), or resized to the nearest multiple (``fit="resize"``), the generated person resized
  back and pasted into the original person at its own size (pixels outside the mask stay the input's);
- a garment of another size than the person: resized to fit inside the person frame, keeping its
  aspect, and centred on white.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MULTIPLE = 16  # FLUX packs 2x2 latents of an 8x VAE: pixel sizes must be multiples of 16
MIN_SIDE = 32


class ImageInputError(ValueError):
    """A bad try-on input; the message names the problem and the fix."""


MODE_NOTES = {m: " (transparency composited over white)" for m in ("RGBA", "LA", "PA", "RGBa", "La")}
MODE_NOTES.update({m: " (16/32-bit values scaled to 0..255)" for m in ("I;16", "I;16B", "I;16L", "I")})
MODE_NOTES.update(F=" (float values scaled to 0..255)", P=" (palette colours; any transparency over white)",
                  CMYK=" (CMYK inks to RGB by PIL's plain formula, no colour profile: colours may shift)")
DEPTH_NOTE = "_tryon_lab_depth_note"  # img.info key: a bit-depth reduction made while opening, for read_image


def _open(source: str | Path | Image.Image | np.ndarray, what: str) -> Image.Image:
    """The image as given (no mode conversion): a path, PIL image or array; unreadable or empty is an error."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ImageInputError(f"{what}: file not found: {path}. Check the path (relative paths are from the repo root).")
        if path.is_dir():
            raise ImageInputError(f"{what}: {path} is a folder, not an image file. Give the path of a PNG or JPEG file.")
        try:
            img = Image.open(path)
            rawmodes = [str(t.args) for t in getattr(img, "tile", None) or []]
            img.load()
            if img.mode in ("RGB", "RGBA") and any(";16" in r for r in rawmodes):  # PIL keeps 8 of the 16 bits
                img.info[DEPTH_NOTE] = f"16-bit {img.mode} PNG reduced to 8 bits per channel"
        except Image.DecompressionBombError as e:
            raise ImageInputError(f"{what}: {path} is too large to open safely ({e}). Downscale it first.") from e
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ImageInputError(f"{what}: {path} is not a readable image ({e}). Use a PNG or JPEG file.") from e
    elif isinstance(source, np.ndarray):
        img = _array_to_image(source, what)
    elif isinstance(source, Image.Image):
        img = source
    else:
        raise ImageInputError(f"{what}: expected a path, PIL image or numpy array, got {type(source).__name__}.")
    if 0 in img.size:
        raise ImageInputError(f"{what}: the image is empty ({img.size[0]}x{img.size[1]} pixels).")
    return img


def _upright(img: Image.Image, what: str, notes: list[str]) -> Image.Image:
    """Apply the EXIF orientation (phone photos are stored sideways and shown upright), noting it."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError):  # a broken EXIF block: keep the pixels as stored
        return img
    if orientation in (None, 1):
        return img
    from PIL import ImageOps

    notes.append(f"{what}: turned upright from its EXIF orientation {orientation} (as image viewers show it)")
    return ImageOps.exif_transpose(img)


def read_image(source: str | Path | Image.Image | np.ndarray, what: str = "image") -> tuple[Image.Image, list[str]]:
    """``load_image`` plus the conversions it applied, in words (empty when the input was upright 8-bit RGB)."""
    notes: list[str] = []
    img = _open(source, what)
    depth = img.info.get(DEPTH_NOTE)
    if depth:
        notes.append(f"{what}: {depth}")
    img = _upright(img, what, notes)
    if img.mode != "RGB":
        notes.append(f"{what}: {img.mode} converted to 8-bit RGB" + MODE_NOTES.get(img.mode, ""))
    return to_rgb(img, what), notes


def load_image(source: str | Path | Image.Image | np.ndarray, what: str = "image") -> Image.Image:
    """Open a path / PIL image / uint8 array and return 8-bit RGB, applying the documented conversions."""
    return read_image(source, what)[0]


def _array_to_image(arr: np.ndarray, what: str) -> Image.Image:
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4)):
        if 0 in arr.shape:
            raise ImageInputError(f"{what}: the array is empty (shape {arr.shape}).")
        note = None
        if arr.dtype == np.uint16:
            arr = (arr.astype(np.float32) / 257.0).round().astype(np.uint8)
            note = "uint16 array (16-bit) scaled to 8 bits"
        elif arr.dtype in (np.float16, np.float32, np.float64):
            if not np.isfinite(arr).all():
                raise ImageInputError(f"{what}: the float array holds NaN or infinite values; use values in [0, 1].")
            if arr.min() < 0 or arr.max() > 1:
                raise ImageInputError(f"{what}: float arrays must lie in [0, 1]; got [{arr.min():.3g}, {arr.max():.3g}]. "
                                      "Divide 0..255 values by 255.")
            arr = (arr.astype(np.float64) * 255).round().astype(np.uint8)
            note = "float array in [0, 1] scaled to 8 bits"
        elif arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype != np.uint8:
            raise ImageInputError(f"{what}: unsupported array dtype {arr.dtype}; use uint8, uint16 or float in [0, 1].")
        img = Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[2] == 1 else arr)
        if note:
            img.info[DEPTH_NOTE] = note
        return img
    raise ImageInputError(f"{what}: array of shape {arr.shape} is not an image; expected (H, W), (H, W, 3) or (H, W, 4).")


def to_rgb(img: Image.Image, what: str = "image") -> Image.Image:
    """8-bit RGB from any PIL mode (alpha over white, 16/32-bit and float scaled down, CMYK converted)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0
        img = Image.fromarray((arr / scale * 255).clip(0, 255).round().astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
            raise ImageInputError(f"{what}: a float image must hold values in [0, 1] or [0, 255]; got "
                                  f"[{np.nanmin(arr):.3g}, {np.nanmax(arr):.3g}]. Rescale it first.")
        arr = arr * 255 if arr.max() <= 1 else arr
        img = Image.fromarray(arr.round().astype(np.uint8), "L")
    if img.mode in ("La", "PA", "RGBa"):  # premultiplied or palette alpha: to plain alpha first
        img = img.convert("LA" if img.mode == "La" else "RGBA")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB") if img.mode != "RGB" else img


def _mask_l(img: Image.Image, notes: list[str]) -> Image.Image:
    """A mask of any mode as 8-bit L; transparent pixels are 'keep' (composited over black), noted."""
    if img.mode in ("L", "1"):
        return img.convert("L")
    if img.mode in ("RGBA", "LA", "La", "PA", "RGBa", "P") and (img.mode != "P" or "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        notes.append(f"mask: {img.mode} converted to grey; transparent pixels count as keep (black)")
        return Image.alpha_composite(black, rgba).convert("L")
    notes.append(f"mask: {img.mode} converted to grey")
    return to_rgb(img, "mask").convert("L")


def read_mask(source: str | Path | Image.Image | np.ndarray, size: tuple[int, int]) -> tuple[Image.Image, list[str]]:
    """``load_mask`` plus the conversions it applied, in words."""
    if isinstance(source, np.ndarray) and source.ndim == 3 and source.shape[2] not in (1, 3, 4):
        raise ImageInputError(f"mask: array of shape {source.shape} is not a mask; expected (H, W).")
    notes: list[str] = []
    img = _mask_l(_upright(_open(source, "mask"), "mask", notes), notes)
    size = tuple(size)
    if img.size != size:
        w, h = size
        if abs(img.width * h - img.height * w) <= w:  # the same aspect ratio, within a pixel of rounding
            notes.append(f"mask: {img.width}x{img.height} resized to the person's {w}x{h} (same aspect, nearest)")
            img = img.resize(size, Image.NEAREST)
        else:
            hint = (" It is the person's size turned 90 degrees: rotate the mask (or check the person's EXIF "
                    "orientation)." if img.size == size[::-1] else "")
            raise ImageInputError(
                f"mask: size {img.size[0]}x{img.size[1]} does not match the person image {w}x{h}.{hint} "
                "The mask marks the garment region on the person: make it the person image's size.")
    arr = np.asarray(img)
    if ((arr > 0) & (arr < 255)).any():
        notes.append("mask: grey levels binarised at 128 (>= 128 repaint, below keep)")
    arr = arr >= 128
    frac = arr.mean()
    if frac == 0:
        raise ImageInputError("mask: it is empty (no pixel >= 128), so there is nothing to repaint. "
                              "Paint the garment region white.")
    if frac == 1:
        raise ImageInputError("mask: it covers the whole person image, so nothing of the person would be kept. "
                              "Paint only the garment region white.")
    return Image.fromarray(arr.astype(np.uint8) * 255, "L"), notes


def load_mask(source: str | Path | Image.Image | np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Binary ``L`` mask (255 = repaint) of exactly ``size`` (width, height); empty or full is an error."""
    return read_mask(source, size)[0]


@dataclass
class PreparedInput:
    """A request fitted to the model grid: the diptych (garment | person), its mask, and how to undo the fit."""

    diptych: Image.Image
    mask: Image.Image
    person_size: tuple[int, int]  # original (width, height)
    fitted_size: tuple[int, int]  # (width, height) of the person half
    fit: str
    notes: list[str] = field(default_factory=list)
    person: Image.Image | None = None  # the person at its original size (paste-back after fit="resize")
    person_mask: Image.Image | None = None  # its binary mask at the original size


def _next_multiple(x: int) -> int:
    return -(-x // MULTIPLE) * MULTIPLE


def fit_garment(garment: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, str | None]:
    """Resize the garment to fit inside ``size`` keeping its aspect, centred on white."""
    if garment.size == tuple(size):
        return garment, None
    w, h = size
    scale = min(w / garment.width, h / garment.height)
    new = garment.resize((max(1, round(garment.width * scale)), max(1, round(garment.height * scale))), Image.BICUBIC)
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(new, ((w - new.width) // 2, (h - new.height) // 2))
    return canvas, f"garment {garment.width}x{garment.height} resized into the person frame {w}x{h} (aspect kept, white border)"


def prepare_input(person, garment, mask, fit: str = "pad") -> PreparedInput:
    """Validate one request and compose the diptych and its mask (``fit``: 'pad' or 'resize')."""
    if fit not in ("pad", "resize"):
        raise ImageInputError(f"fit must be 'pad' or 'resize', got {fit!r}.")
    person, person_notes = read_image(person, "person")
    garment, garment_notes = read_image(garment, "garment")
    if min(person.size) < MIN_SIDE:
        raise ImageInputError(f"person: {person.size[0]}x{person.size[1]} is too small; each side must be >= {MIN_SIDE} px.")
    mask_img, mask_notes = read_mask(mask, person.size)
    original, original_mask = person, mask_img
    notes: list[str] = []
    w, h = person.size
    tw, th = _next_multiple(w), _next_multiple(h)
    if (tw, th) != (w, h):
        if fit == "pad":
            arr = np.asarray(person)
            person = Image.fromarray(np.pad(arr, ((0, th - h), (0, tw - w), (0, 0)), mode="edge"))
            m = np.pad(np.asarray(mask_img), ((0, th - h), (0, tw - w)), constant_values=0)
            mask_img = Image.fromarray(m, "L")
            notes.append(f"person {w}x{h} padded to {tw}x{th} (multiples of {MULTIPLE}); output cropped back")
        else:
            tw, th = max(MULTIPLE, round(w / MULTIPLE) * MULTIPLE), max(MULTIPLE, round(h / MULTIPLE) * MULTIPLE)
            person = person.resize((tw, th), Image.BICUBIC)
            mask_img = mask_img.resize((tw, th), Image.NEAREST)
            notes.append(f"person {w}x{h} resized to {tw}x{th} (multiples of {MULTIPLE}); output resized back and "
                         f"pasted into the original {w}x{h} person with its mask (outside it: the input's pixels)")
    garment, note = fit_garment(garment, (tw, th))
    if note:
        notes.append(note)
    notes += person_notes + garment_notes + mask_notes  # after the size notes (callers read notes[0] for those)
    diptych = Image.new("RGB", (2 * tw, th))
    diptych.paste(garment, (0, 0))
    diptych.paste(person, (tw, 0))
    mask_full = Image.new("L", (2 * tw, th), 0)
    mask_full.paste(mask_img, (tw, 0))
    return PreparedInput(diptych, mask_full, (w, h), (tw, th), fit, notes, original, original_mask)


def person_half(image: Image.Image, prepared: PreparedInput) -> Image.Image:
    """Cut the person side out of a generated diptych and undo the fit (crop or resize back)."""
    tw, th = prepared.fitted_size
    half = image.crop((tw, 0, 2 * tw, th))
    w, h = prepared.person_size
    if prepared.fit == "pad":
        return half.crop((0, 0, w, h))
    return half.resize((w, h), Image.BICUBIC)


def paste_back(image: Image.Image, prepared: PreparedInput) -> Image.Image:
    """The person side of a generated diptych with the input's own pixels outside the mask.

    ``fit="pad"`` (or no resize): composited at the model's size, then cropped. ``fit="resize"``: the generated
    person is resized back first and composited with the original person and mask at the original size, so no
    pixel outside the mask goes through a resize round trip.
    """
    if prepared.fit == "resize" and prepared.person is not None and prepared.fitted_size != prepared.person_size:
        return Image.composite(person_half(image, prepared), prepared.person, prepared.person_mask)
    return person_half(Image.composite(image, prepared.diptych, prepared.mask), prepared)


def image_hash(img: Image.Image) -> str:
    """Content hash of an image's pixels (for caches keyed by garment)."""
    import hashlib

    return hashlib.sha256(img.tobytes() + repr((img.mode, img.size)).encode()).hexdigest()
