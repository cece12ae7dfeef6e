"""Interactive try-on: an ipywidgets app over the slim pipeline and the batched logo pass.

``TryOnApp(...).ui`` is the widget; ``app.run()`` is what the Run button calls (papermill calls it directly).
Pipelines come from a process-level cache (``get_pipeline``) keyed by model and options, so pressing Run
again never reloads. Bad inputs (an upload that is not an image, a bad box) are shown in ``app.error``.
TeaCache (threshold > 0) applies to the main try-on only; the logo LoRA only to the logo pass.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import ipywidgets as W
import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from . import checkpoint, loading, logos, pipeline, samples
from .bench import Timings
from .images import ImageInputError, load_image

_PIPELINES: dict[tuple, loading.SlimPipeline] = {}
_LOADS = {"count": 0}
UPLOAD = "upload"
MASK_MODES = ("manifest", "box", "ellipse")


def get_pipeline(model_dir, dtype: torch.dtype = torch.float32, device: str = "cpu", fp8: str = "none",
                 compile: str = "none") -> loading.SlimPipeline:
    """The slim pipeline for these options, loaded (and quantized / compiled) once per process."""
    key = (str(Path(model_dir).resolve()), str(dtype), str(device), fp8, compile)
    if key not in _PIPELINES:
        pipe = loading.load_slim(model_dir, dtype, device)
        if fp8 != "none" or compile != "none":
            from . import speed

            speed.quantize_transformer(pipe.transformer, fp8)
            speed.compile_transformer(pipe.transformer, compile)
        _PIPELINES[key] = pipe
        _LOADS["count"] += 1
    return _PIPELINES[key]


def load_count() -> int:
    """How many pipelines this process has loaded through ``get_pipeline``."""
    return _LOADS["count"]


def clear_pipelines() -> None:
    _PIPELINES.clear()


def png_bytes(img: Image.Image, scale: int = 1) -> bytes:
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode_upload(value, what: str) -> Image.Image:
    """The first file of a FileUpload value as RGB; anything else is an ImageInputError naming the file."""
    if not value:
        raise ImageInputError(f"{what}: 'upload' is chosen but no file was uploaded; upload a PNG or JPEG.")
    f = value[0]
    try:
        with Image.open(io.BytesIO(bytes(f["content"]))) as img:
            img.load()
            return load_image(img.copy(), what)
    except (UnidentifiedImageError, OSError) as e:
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


def overlay(person: Image.Image, mask: Image.Image, color=(255, 0, 0), alpha: float = 0.45) -> Image.Image:
    """The mask shown over the person as a translucent tint."""
    tint = Image.new("RGB", person.size, color)
    a = Image.fromarray((np.asarray(mask.convert("L").resize(person.size)) >= 128).astype(np.uint8) * round(255 * alpha))
    return Image.composite(tint, person.convert("RGB"), a)


def timing_rows(tryon_timings: dict, logo_timings: dict, extra: dict | None = None) -> list[dict]:
    rows = [{"stage": k, "seconds": tryon_timings.get(k, 0.0)} for k in ("redux", "denoise", "decode")]
    rows.append({"stage": "logo pass", "seconds": logo_timings.get("total", 0.0)})
    rows += [{"stage": k, "seconds": v} for k, v in (extra or {}).items()]
    return rows


def html_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{v:.3f}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
                                    for v in (r.get(c, "") for c in cols)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


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


class TryOnApp:
    """Pickers, mask, settings, logo boxes, Run + progress, and the three outputs with a timing table."""

    def __init__(self, model="default", device: str = "auto", dtype: str = "auto", person: str = "s000",
                 garment: str = "s001", steps: int = 8, seed: int = 0, guidance: float = 30.0, teacache: float = 0.0,
                 logos_text: str = "manifest", loras: dict | None = None, fp8: str = "none", compile: str = "none",
                 logo_size: int = 64, batched: bool = True, display_scale: int = 2):
        self.model_dir = checkpoint.resolve_model_dir(model)
        self.device, self.dtype = loading.resolve_device_dtype(device, dtype)
        self.fp8, self.compile, self.logo_size, self.batched, self.scale = fp8, compile, logo_size, batched, display_scale
        self.loras = {"none": None, **(loras or {})}
        self.last: AppResult | None = None
        self.last_error: Exception | None = None
        ids = samples.sample_ids()
        style = {"description_width": "90px"}
        self.person = W.Dropdown(options=[*ids, UPLOAD], value=person, description="person", style=style)
        self.person_upload = W.FileUpload(accept="image/*", multiple=False, description="person file")
        self.garment = W.Dropdown(options=[*ids, UPLOAD], value=garment, description="garment", style=style)
        self.garment_upload = W.FileUpload(accept="image/*", multiple=False, description="garment file")
        self.mask_mode = W.Dropdown(options=MASK_MODES, value="manifest", description="mask", style=style)
        self.sliders = {k: W.FloatSlider(value=v, min=0.0, max=1.0, step=0.01, description=k, style=style)
                        for k, v in (("cx", 0.5), ("cy", 0.5), ("w", 0.5), ("h", 0.4))}
        self.seed = W.IntText(value=seed, description="seed", style=style)
        self.steps = W.IntSlider(value=steps, min=1, max=50, description="steps", style=style)
        self.guidance = W.FloatText(value=guidance, description="guidance", style=style)
        self.teacache = W.FloatText(value=teacache, description="TeaCache", style=style,
                                    tooltip="rel-L1 threshold; 0 = off")
        self.lora = W.Dropdown(options=list(self.loras), value="none", description="logo LoRA", style=style)
        self.logo_boxes = W.Textarea(value="", description="logo boxes", placeholder="x0,y0,x1,y1; ...",
                                     style=style, layout=W.Layout(width="420px"))
        self.button = W.Button(description="Run", button_style="primary")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="progress", style=style)
        self.error = W.HTML("")
        self.mask_preview = W.Image(format="png")
        self.outputs = [W.Image(format="png") for _ in range(3)]
        self.timing_table = W.HTML("")
        self.match_table = W.HTML("")
        self._logos_from_manifest = logos_text == "manifest"
        if not self._logos_from_manifest:
            self.logo_boxes.value = "" if logos_text in ("none", None) else logos_text
        self.button.on_click(lambda _: self.run())
        self.garment.observe(lambda _: self._refresh_logo_boxes(), "value")
        for w in (self.person, self.person_upload, self.mask_mode, *self.sliders.values()):
            w.observe(lambda _: self.refresh_preview(), "value")
        self.person.observe(lambda _: self._fit_sliders(), "value")
        self._refresh_logo_boxes()
        self._fit_sliders()
        self.refresh_preview()
        titles = ["person", "try-on", "after logo pass"]
        outs = W.HBox([W.VBox([W.HTML(f"<b>{t}</b>"), img]) for t, img in zip(titles, self.outputs, strict=True)])
        self.ui = W.VBox([
            W.HBox([W.VBox([self.person, self.person_upload, self.garment, self.garment_upload, self.mask_mode,
                            *self.sliders.values()]), self.mask_preview,
                    W.VBox([self.seed, self.steps, self.guidance, self.teacache, self.lora, self.logo_boxes])]),
            W.HBox([self.button, self.progress]), self.error, outs, W.HBox([self.timing_table, self.match_table])])

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
            self.sliders[k].value = round(float(v), 2)

    def refresh_preview(self) -> None:
        try:
            person = self.person_image()
            self.mask_preview.value = png_bytes(overlay(person, self.mask_image(person)), self.scale)
        except (ValueError, KeyError, OSError) as e:
            self.mask_preview.value = b""
            self.show_error(e)

    def show_error(self, e: Exception) -> None:
        self.last_error = e
        self.error.value = f"<span style='color:#b00020'><b>Error:</b> {html.escape(str(e), quote=False)}</span>"

    def pipeline(self) -> loading.SlimPipeline:
        return get_pipeline(self.model_dir, self.dtype, self.device, self.fp8, self.compile)

    # ---------------------------------------------------------------- run
    def run(self) -> AppResult | None:
        """What the Run button does: try-on, logo pass, outputs and timing table; bad inputs -> ``app.error``."""
        self.error.value = ""
        self.last_error = None
        try:
            self.last = self._run()
        except (ValueError, KeyError, OSError) as e:  # ImageInputError and box errors are ValueErrors
            self.show_error(e)
            return None
        return self.last

    def _run(self) -> AppResult:
        from . import teacache

        t = Timings(device=self.device)
        with t.stage("inputs"):
            person, garment = self.person_image(), self.garment_image()
            mask = self.mask_image(person)
            boxes = logos.validate_boxes(logos.parse_boxes(self.logo_boxes.value), garment.size, "logo box")
            if self.teacache.value < 0:
                raise ValueError(f"TeaCache threshold must be >= 0 (0 = off), got {self.teacache.value}.")
            if self.steps.value < 1:
                raise ValueError(f"steps must be >= 1, got {self.steps.value}.")
        with t.stage("load"):
            pipe = self.pipeline()
        steps, seed = int(self.steps.value), int(self.seed.value)
        settings = pipeline.TryOnSettings(steps=steps, guidance_scale=float(self.guidance.value), progress=False)
        self.progress.max, self.progress.value = steps * 2, 0

        def step(_pipe, _i, _t, kwargs):
            self.progress.value = min(self.progress.max, self.progress.value + 1)
            return kwargs

        request = pipeline.TryOnRequest(person, garment, mask, seed=seed, name="app")
        if self.teacache.value > 0:
            cfg = teacache.TeaCacheConfig(rel_l1_thresh=float(self.teacache.value), num_inference_steps=steps)
            with teacache.enabled(pipe.transformer, cfg):
                out = pipeline.tryon(pipe, request, settings, callback=step)
        else:
            out = pipeline.tryon(pipe, request, settings, callback=step)
        tryon_img = out.images[0]
        self.progress.value = steps
        with t.stage("locate logos"):
            matches = logos.locate_logos(garment, boxes, tryon_img, search_mask=mask)
        lp = logos.logo_pass(pipe, tryon_img, garment, matches, settings, batched=self.batched,
                             lora=self.loras[self.lora.value], size=self.logo_size, seed=seed, callback=step)
        self.progress.value = self.progress.max
        boxed = logos.draw_boxes(lp.image, matches)
        rows = timing_rows(out.timings, lp.timings, {k: t.seconds[k] for k in ("load", "locate logos")})
        for img_w, img in zip(self.outputs, (person, tryon_img, boxed), strict=True):
            img_w.value = png_bytes(img, self.scale)
        recoveries = out.recoveries + lp.recoveries
        self.timing_table.value = html_table(rows) + "".join(
            f"<div style='color:#8a5a00'>recovered: {html.escape(r)}</div>" for r in recoveries)
        self.match_table.value = html_table(logos.match_rows(matches)) if matches else "<i>no logo boxes</i>"
        return AppResult(person, tryon_img, lp.image, boxed, matches, rows, out, lp,
                         {"steps": steps, "seed": seed, "guidance": settings.guidance_scale,
                          "teacache": float(self.teacache.value), "lora": self.lora.value, "batched": self.batched},
                         recoveries)
