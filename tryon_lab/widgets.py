"""Interactive try-on: an ipywidgets app over the slim pipeline and the batched logo pass.

``TryOnApp(...).ui`` is the widget; ``app.run()`` is what the Run button calls (papermill calls it directly).
Pipelines come from ``configure.get_pipeline`` (the one warm cache, keyed by model and options), so pressing
Run again never reloads; what Run does is ``flow.tryon_with_logos``, callable without the UI. Bad inputs (an upload that is not an image, a bad box) are shown in ``app.error``.
TeaCache (threshold > 0) applies to the main try-on only; the logo LoRA only to the logo pass.
Sample ids are checked when the app is made (before anything loads); an image that is not there yet shows a
placeholder, and a run that fails clears the previous result and the progress bar.
"""

from __future__ import annotations

import html
import io
import textwrap
from dataclasses import dataclass, field, replace

import ipywidgets as W
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, UnidentifiedImageError

from . import checkpoint, configure, flow, loading, logos, pipeline, samples
from . import lora as lora_mod
from .images import ImageInputError, load_image
from .timers import Timings

UPLOAD = "upload"
MASK_MODES = ("manifest", "box", "ellipse")
SLIDER_STEP = 0.005  # mask centre / size as fractions of the image; shown with 3 decimals
MAX_STEPS = 50
PREVIEW_HEIGHT = 384  # previews are scaled to at most this many pixels high (large uploads stay quick)


def png_bytes(img: Image.Image, scale: int = 1) -> bytes:
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def preview_png(img: Image.Image, scale: int = 1, max_height: int = PREVIEW_HEIGHT) -> bytes:
    """``png_bytes`` for a preview: ``scale`` times, but never taller than ``max_height``."""
    if img.height * scale <= max_height:
        return png_bytes(img, scale)
    h = max(1, max_height)
    return png_bytes(img.resize((max(1, round(img.width * h / img.height)), h), Image.LANCZOS))


def placeholder(text: str, size: tuple[int, int] = (128, 192), scale: int = 1) -> bytes:
    """A light grey PNG saying what will appear here (an empty ``W.Image`` shows a broken-image icon)."""
    img = Image.new("RGB", size, (240, 240, 240))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, size[0] - 1, size[1] - 1), outline=(200, 200, 200))
    lines = textwrap.wrap(text, max(8, size[0] // 7))
    draw.multiline_text((6, max(4, size[1] // 2 - 6 * len(lines))), "\n".join(lines), fill=(100, 100, 100))
    return png_bytes(img, scale)


def decode_upload(value, what: str) -> Image.Image:
    """The first file of a FileUpload value as RGB; anything else is an ImageInputError naming the file."""
    if not value:
        raise ImageInputError(f"{what}: 'upload' is chosen but no file was uploaded; upload a PNG or JPEG.")
    f = value[0]
    try:
        with Image.open(io.BytesIO(bytes(f["content"]))) as img:
            img.load()
            return load_image(img.copy(), what)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageInputError(f"{what}: the upload {f.get('name', '?')!r} is not an image ({type(e).__name__}). "
                              "Upload a PNG or JPEG file.") from None


def shape_mask(size: tuple[int, int], shape: str, cx: float, cy: float, w: float, h: float) -> Image.Image:
    """A box or ellipse mask from fractions of the image size (centre, width, height)."""
    iw, ih = size
    box = (round((cx - w / 2) * iw), round((cy - h / 2) * ih), round((cx + w / 2) * iw) - 1,
           round((cy + h / 2) * ih) - 1)
    m = Image.new("L", size, 0)
    draw = ImageDraw.Draw(m)
    (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=255)
    return m


def overlay(person: Image.Image, mask: Image.Image, color=(255, 0, 255), width: int = 2, hatch: int = 8) -> Image.Image:
    """The mask drawn on the person as an outline and sparse diagonal hatching (half-blended).

    Every other pixel keeps the person's own colour: a tint over the whole region would change the colour of
    the clothes the preview is meant to show. Only the person is drawn on, never the garment.
    """
    m = np.asarray(mask.convert("L").resize(person.size, Image.NEAREST)) >= 128
    padded = Image.fromarray(np.pad(m, width).astype(np.uint8) * 255)  # the image border counts as outside
    inner = np.asarray(padded.filter(ImageFilter.MinFilter(2 * width + 1)))[width:-width, width:-width] >= 128
    ys, xs = np.indices(m.shape)
    edge = m & ~inner
    hatched = inner & ((xs + ys) % hatch == 0)
    out = np.asarray(person.convert("RGB")).astype(np.float32)
    out[hatched] = (out[hatched] + np.asarray(color, np.float32)) / 2
    out[edge] = color
    return Image.fromarray(out.round().astype(np.uint8))


def check_choice(value: str, what: str) -> str:
    """A person/garment choice: ``UPLOAD`` or a sample id in the manifest (an error listing the ids otherwise)."""
    if value == UPLOAD:
        return value
    try:
        return samples.check_sample_id(value)
    except samples.UnknownSampleError as e:
        raise samples.UnknownSampleError(f"{what}: {e} Or choose {UPLOAD!r}.") from None


def _short(e: Exception, n: int = 80) -> str:
    text = str(e)
    return text if len(text) <= n else text[: n - 3] + "..."


def timing_rows(tryon_timings: dict, logo_timings: dict, extra: dict | None = None) -> list[dict]:
    rows = [{"stage": k, "seconds": tryon_timings.get(k, 0.0)} for k in ("redux", "denoise", "decode")]
    rows.append({"stage": "logo pass", "seconds": logo_timings.get("total", 0.0)})
    rows += [{"stage": k, "seconds": v} for k, v in (extra or {}).items()]
    return rows


def html_table(rows: list[dict], title: str = "") -> str:
    """Rows as an HTML table under an optional heading (two tables side by side never run together)."""
    heading = f"<h4 style='margin:4px 0'>{html.escape(title)}</h4>" if title else ""
    if not rows:
        return heading
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{v:.3f}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
                                    for v in (r.get(c, "") for c in cols)) + "</tr>" for r in rows)
    return f"{heading}<table><tr>{head}</tr>{body}</table>"


@dataclass
class AppResult:
    person: Image.Image
    tryon: Image.Image
    logo_image: Image.Image  # after the logo pass
    logo_boxes_image: Image.Image  # after the logo pass, matched boxes outlined
    matches: list[logos.LogoMatch]
    timings: list[dict]
    tryon_result: pipeline.TryOnResult
    logo_result: logos.LogoPassResult
    settings: dict = field(default_factory=dict)
    recoveries: list[str] = field(default_factory=list)  # out-of-memory recoveries, also shown under the timings


def adapter_options(logo_adapter=None, tryon_adapter=None) -> dict:
    """``TryOnApp`` keyword arguments offering (and selecting) these adapters in its two LoRA pickers."""
    loras = {"trained logo adapter": logo_adapter} if logo_adapter else {}
    tryon_loras = {"try-on adapter": tryon_adapter} if tryon_adapter else {}
    return {"loras": loras, "lora": next(iter(loras), "none"), "tryon_loras": tryon_loras}


class TryOnApp:
    """Pickers, mask and garment previews, settings, logo boxes, Run + progress, three outputs, timing and
    logo-match tables."""

    def __init__(self, model="default", device: str = "auto", dtype: str = "auto", person: str = "s000",
                 garment: str = "s001", steps: int = 8, seed: int = 0, guidance: float = 30.0, teacache: float = 0.0,
                 logos_text: str = "manifest", loras: dict | None = None, lora: str = "none",
                 tryon_loras: dict | None = None, tryon_lora: str = "none", fp8: str = "none", compile: str = "none",
                 logo_size: int = 64, batched: bool = True, display_scale: int = 2):
        # cheap checks first (the manifest, numbers), so a typo fails here and not after a model has loaded
        person, garment = (check_choice(v, what) for v, what in ((person, "person"), (garment, "garment")))
        if not 1 <= int(steps) <= MAX_STEPS:
            raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {steps}.")
        if logos_text not in ("manifest", "none", None):
            logos.parse_boxes(logos_text)
        self.loras = {"none": None, **(loras or {})}
        self.tryon_loras = {"none": None, **(tryon_loras or {})}
        for choice, given, what in ((lora, self.loras, "logo"), (tryon_lora, self.tryon_loras, "try-on")):
            if choice not in given:
                raise ValueError(f"{choice!r} is not one of the {what} LoRAs given ({', '.join(given)}).")
        self.model_dir = checkpoint.check_model_dir(checkpoint.resolve_model_dir(model))  # with both snapshots
        options = configure.PipelineOptions(device=device, dtype=dtype, fp8=fp8, compile=compile)
        adapters = [p for p in (*self.tryon_loras.values(), *self.loras.values()) if p]
        if adapters and compile != "none":  # one slot filled before compiling: every adapter then swaps in, no recompile
            options = replace(options, **lora_mod.pass_slot(adapters))
        self.options = options.resolved()
        self.device = self.options.device
        self.logo_size, self.batched, self.scale = logo_size, batched, display_scale
        self.last: AppResult | None = None
        self.last_error: Exception | None = None
        self._preview_errors: dict[str, Exception] = {}  # preview -> its input's error (cleared once it is fine)
        ids = samples.sample_ids()
        style = {"description_width": "90px"}
        self.person = W.Dropdown(options=[*ids, UPLOAD], value=person, description="person", style=style)
        self.person_upload = W.FileUpload(accept="image/*", multiple=False, description="person file")
        self.garment = W.Dropdown(options=[*ids, UPLOAD], value=garment, description="garment", style=style)
        self.garment_upload = W.FileUpload(accept="image/*", multiple=False, description="garment file")
        self.mask_mode = W.Dropdown(options=MASK_MODES, value="manifest", description="mask", style=style)
        self.sliders = {k: W.FloatSlider(value=v, min=0.0, max=1.0, step=SLIDER_STEP, readout_format=".3f",
                                         description=k, style=style)
                        for k, v in (("cx", 0.5), ("cy", 0.5), ("w", 0.5), ("h", 0.4))}
        self.seed = W.IntText(value=seed, description="seed", style=style)
        self.steps = W.IntSlider(value=steps, min=1, max=MAX_STEPS, description="steps", style=style)
        self.guidance = W.FloatText(value=guidance, description="guidance", style=style)
        self.teacache = W.FloatText(value=teacache, description="TeaCache", style=style,
                                    tooltip="rel-L1 threshold; 0 = off")
        self.lora = W.Dropdown(options=list(self.loras), value=lora, description="logo LoRA", style=style)
        self.tryon_lora = W.Dropdown(options=list(self.tryon_loras), value=tryon_lora, description="try-on LoRA",
                                     style=style)
        self.logo_boxes = W.Textarea(value="", description="logo boxes", placeholder="x0,y0,x1,y1; ...",
                                     style=style, layout=W.Layout(width="420px"))
        self.button = W.Button(description="Run", button_style="primary")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="progress", style=style)
        self.error = W.HTML("")
        self.mask_preview = W.Image(format="png")
        self.garment_preview = W.Image(format="png")
        self.outputs = [W.Image(format="png") for _ in range(3)]
        self.timing_table = W.HTML("")
        self.match_table = W.HTML("")
        self.clear_outputs()
        self._logos_from_manifest = logos_text == "manifest"
        if not self._logos_from_manifest:
            self.logo_boxes.value = "" if logos_text in ("none", None) else logos_text
        self.button.on_click(lambda _: self.run())
        self.garment.observe(lambda _: self._refresh_logo_boxes(), "value")
        for w in (self.person, self.person_upload, self.mask_mode, *self.sliders.values()):
            w.observe(lambda _: self.refresh_mask_preview(), "value")
        for w in (self.garment, self.garment_upload):
            w.observe(lambda _: self.refresh_garment_preview(), "value")
        self.person.observe(lambda _: self._fit_sliders(), "value")
        self._refresh_logo_boxes()
        self._fit_sliders()
        self.refresh_preview()
        titles = ["person", "try-on", "after logo pass"]
        outs = W.HBox([W.VBox([W.HTML(f"<b>{t}</b>"), img]) for t, img in zip(titles, self.outputs, strict=True)])
        previews = [W.VBox([W.HTML(f"<b>{t}</b>"), img])
                    for t, img in (("mask on the person", self.mask_preview), ("garment", self.garment_preview))]
        self.ui = W.VBox([
            W.HBox([W.VBox([self.person, self.person_upload, self.garment, self.garment_upload, self.mask_mode,
                            *self.sliders.values()]), *previews,
                    W.VBox([self.seed, self.steps, self.guidance, self.teacache, self.tryon_lora, self.lora,
                            self.logo_boxes])]),
            W.HBox([self.button, self.progress]), self.error, outs,
            W.HBox([self.timing_table, self.match_table], layout=W.Layout(grid_gap="24px"))])

    # ---------------------------------------------------------------- inputs
    def person_image(self) -> Image.Image:
        if self.person.value == UPLOAD:
            return decode_upload(self.person_upload.value, "person")
        return samples.load_sample(self.person.value).person

    def garment_image(self) -> Image.Image:
        if self.garment.value == UPLOAD:
            return decode_upload(self.garment_upload.value, "garment")
        return samples.load_sample(self.garment.value).garment

    def mask_image(self, person: Image.Image) -> Image.Image:
        if self.mask_mode.value == "manifest":
            if self.person.value == UPLOAD:
                raise ImageInputError("mask: an uploaded person has no manifest mask; choose 'box' or 'ellipse'.")
            return samples.load_sample(self.person.value).mask
        s = {k: w.value for k, w in self.sliders.items()}
        return shape_mask(person.size, self.mask_mode.value, s["cx"], s["cy"], s["w"], s["h"])

    def _refresh_logo_boxes(self) -> None:
        if self._logos_from_manifest:
            g = self.garment.value
            self.logo_boxes.value = "" if g == UPLOAD else logos.format_boxes(samples.load_sample(g).garment_logo_boxes)

    def _fit_sliders(self) -> None:
        """Start the box/ellipse sliders on the manifest mask's bounding box."""
        if self.person.value == UPLOAD:
            return
        m = np.asarray(samples.load_sample(self.person.value).mask) >= 128
        ys, xs = np.nonzero(m)
        h, w = m.shape
        vals = {"cx": (xs.min() + xs.max() + 1) / 2 / w, "cy": (ys.min() + ys.max() + 1) / 2 / h,
                "w": (xs.max() + 1 - xs.min()) / w, "h": (ys.max() + 1 - ys.min()) / h}
        for k, v in vals.items():
            self.sliders[k].value = round(float(v), 3)

    def refresh_preview(self) -> None:
        """Both previews (what cannot be shown yet is a placeholder; a bad input is also an error)."""
        self.refresh_mask_preview()
        self.refresh_garment_preview()

    def refresh_mask_preview(self) -> None:
        """The mask outlined on the person."""
        if self.person.value == UPLOAD and not self.person_upload.value:
            self._preview("mask", placeholder("upload a person image", scale=self.scale))
            return
        try:
            person = self.person_image()
            self._preview("mask", preview_png(overlay(person, self.mask_image(person)), self.scale))
        except (ValueError, KeyError, OSError) as e:
            self._preview("mask", placeholder(f"no mask preview: {_short(e)}", scale=self.scale), e)

    def refresh_garment_preview(self) -> None:
        """The chosen garment, as the try-on will see it."""
        if self.garment.value == UPLOAD and not self.garment_upload.value:
            self._preview("garment", placeholder("upload a garment image", scale=self.scale))
            return
        try:
            self._preview("garment", preview_png(self.garment_image(), self.scale))
        except (ValueError, KeyError, OSError) as e:
            self._preview("garment", placeholder(f"no garment: {_short(e)}", scale=self.scale), e)

    def _preview(self, which: str, png: bytes, error: Exception | None = None) -> None:
        """Show a preview; its input's error is shown, and cleared again once that input is fine."""
        (self.mask_preview if which == "mask" else self.garment_preview).value = png
        shown = self.last_error is not None and self.last_error is self._preview_errors.get(which)
        if error is not None:
            self._preview_errors[which] = error
            self.show_error(error)
            return
        self._preview_errors.pop(which, None)
        if shown:
            rest = list(self._preview_errors.values())
            if rest:
                self.show_error(rest[0])
            else:
                self.error.value, self.last_error = "", None

    def show_error(self, e: Exception) -> None:
        self.last_error = e
        self.error.value = f"<span style='color:#b00020'><b>Error:</b> {html.escape(str(e), quote=False)}</span>"

    def clear_outputs(self, text: str = "press Run") -> None:
        """Placeholders for the three outputs, empty tables, progress at 0 (no stale result stays up)."""
        for title, w in zip(("person", "try-on", "after logo pass"), self.outputs, strict=True):
            w.value = placeholder(f"{title}: {text}", scale=self.scale)
        self.timing_table.value = self.match_table.value = ""
        self.progress.value = 0

    def pipeline(self) -> loading.SlimPipeline:
        """The warm pipeline for this app's model and options (built once per process)."""
        return configure.get_pipeline(self.model_dir, self.options)

    # ---------------------------------------------------------------- run
    def run(self) -> AppResult | None:
        """What the Run button does: try-on, logo pass, outputs and timing table; bad inputs -> ``app.error``.

        The previous result is cleared first; after an error the outputs stay cleared and the progress at 0.
        """
        self.error.value = ""
        self.last_error, self.last = None, None
        self._preview_errors.clear()
        self.clear_outputs("running...")
        try:
            self.last = self._run()
        except (ValueError, KeyError, OSError) as e:  # ImageInputError and box errors are ValueErrors
            self.clear_outputs("failed (see the error above)")
            self.show_error(e)
            return None
        except Exception as e:  # anything else: shown too, never under a stale result, then raised
            self.clear_outputs("failed (see the error above)")
            self.show_error(e)
            raise
        return self.last

    def _run(self) -> AppResult:
        t = Timings(device=self.device)
        with t.stage("inputs"):
            person, garment = self.person_image(), self.garment_image()
            mask = self.mask_image(person)
            boxes = logos.validate_boxes(logos.parse_boxes(self.logo_boxes.value), garment.size, "logo box")
        with t.stage("load"):
            pipe = self.pipeline()
        steps, seed = int(self.steps.value), int(self.seed.value)
        settings = pipeline.TryOnSettings(steps=steps, guidance_scale=float(self.guidance.value), progress=False)
        self.progress.max, self.progress.value = steps * 2, 0

        def step(_pipe, _i, _t, kwargs):
            self.progress.value = min(self.progress.max, self.progress.value + 1)
            return kwargs

        request = pipeline.TryOnRequest(person, garment, mask, seed=seed, name="app")
        res = flow.tryon_with_logos(pipe, request, settings, boxes, float(self.teacache.value),
                                    self.loras[self.lora.value], self.batched, self.logo_size, on_step=step,
                                    tryon_lora=self.tryon_loras[self.tryon_lora.value])
        out, lp, matches, tryon_img = res.tryon, res.logos, res.matches, res.tryon.images[0]
        self.progress.value = self.progress.max
        t.seconds.update(res.timings)
        boxed = res.boxed
        rows = timing_rows(out.timings, lp.timings, {k: t.seconds[k] for k in ("load", "locate logos")})
        for img_w, img in zip(self.outputs, (person, tryon_img, boxed), strict=True):
            img_w.value = png_bytes(img, self.scale)
        recoveries = res.recoveries
        self.timing_table.value = html_table(rows, "timings (s)") + "".join(
            f"<div style='color:#8a5a00'>recovered: {html.escape(r)}</div>" for r in recoveries)
        self.match_table.value = (html_table(logos.match_rows(matches), "logo matches") if matches
                                  else html_table([], "logo matches") + "<i>no logo boxes</i>")
        return AppResult(person, tryon_img, lp.image, boxed, matches, rows, out, lp,
                         {"steps": steps, "seed": seed, "guidance": settings.guidance_scale,
                          "teacache": float(self.teacache.value), "lora": self.lora.value,
                          "tryon_lora": self.tryon_lora.value, "batched": self.batched},
                         recoveries)
