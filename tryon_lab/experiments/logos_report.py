"""Notebook 04's logo-pass comparisons: the batched pass against one pipeline call per logo (same seeds), and the
logo-box PSNR against ground truth before and after the pass, plain model against the trained logo adapter."""

from __future__ import annotations

from dataclasses import dataclass

from .. import logos, metrics
from ..notebook import CPU_TIMING
from ..pipeline import TryOnRequest, TryOnSettings, tryon
from .train_data import box_mask


@dataclass
class LogoComparison:
    matches: list[logos.LogoMatch]
    passes: dict[str, logos.LogoPassResult]  # "sequential" and "batched"
    rows: list[dict]  # per mode: logos found, pipeline calls, seconds per stage
    max_abs: int  # largest pixel difference between the two modes' patches (0..255)

    @property
    def found(self) -> int:
        return sum(m.found for m in self.matches)


def compare_passes(pipe, sample, boxes, steps: int, seed: int) -> LogoComparison:
    """The logo pass on ``sample``'s ground-truth try-on (where its logos are known to be), sequential and batched.

    No ground truth: nothing located, both passes are no-ops."""
    settings = TryOnSettings(steps=steps, progress=False)
    matches = logos.locate_logos(sample.garment, boxes, sample.target, search_mask=sample.mask) if sample.target else []
    passes = {mode: logos.logo_pass(pipe, sample.target, sample.garment, matches, settings,
                                    batched=mode == "batched", seed=seed) for mode in ("sequential", "batched")}
    found = sum(m.found for m in matches)
    rows = [{"mode": mode, "logos found": found, "pipeline calls": p.calls, **p.timings} for mode, p in passes.items()]
    diff = max((int(metrics.max_abs(a, b)) for a, b in zip(passes["batched"].patches, passes["sequential"].patches,
                                                            strict=True)), default=0)
    return LogoComparison(matches, passes, rows, diff)


def display_rows(c: LogoComparison, cpu: bool) -> list[dict]:
    """The comparison for reading: calls always; seconds only on a GPU with more than one logo to batch."""
    timed = not cpu and c.found > 1
    return [{k: v for k, v in r.items() if timed or k in ("mode", "logos found", "pipeline calls")} for r in c.rows]


def timing_note(c: LogoComparison, cpu: bool) -> str:
    """Why the seconds are (not) shown."""
    if c.found <= 1:
        return (f"With {c.found} logo found there is nothing to batch: both modes make the same single call, so their "
                "seconds say nothing about batching (they stay in the recorded metrics).")
    if cpu:
        return f"Seconds left out: on this CPU they are {CPU_TIMING} only (they stay in the recorded metrics)."
    return ""


def adapter_rows(pipe, sample, steps: int, seed: int, adapter=None) -> list[dict]:
    """Logo-box PSNR (dB) against ``sample``'s ground truth, at its known logo boxes: on the ground truth itself (a
    good pass keeps a crisp logo crisp) and on the model's try-on of the same pair (a good pass sharpens it), before
    and after the batched pass of the plain model and, when given, of the ``adapter`` LoRA."""
    if not (sample.target and sample.target_logo_boxes):
        return []
    settings = TryOnSettings(steps=steps, progress=False)
    known = logos.known_matches(sample.garment_logo_boxes, sample.target_logo_boxes)
    inside = box_mask(sample.target_logo_boxes, sample.target.size)
    made = tryon(pipe, TryOnRequest(sample.person, sample.garment, sample.mask, seed=seed), settings).images[0]
    rows = []
    for name, image in (("ground truth", sample.target), ("model's try-on", made)):
        before = metrics.psnr(image, sample.target, mask=inside) if image is not sample.target else None  # None: inf
        row = {"logo pass on": name, "before": before}
        for label, lora in (("plain model", None), ("logo adapter", adapter)) if adapter else (("plain model", None),):
            after = logos.logo_pass(pipe, image, sample.garment, known, settings, lora=lora, seed=seed).image
            row[f"after, {label}"] = metrics.psnr(after, sample.target, mask=inside)
        rows.append(row)
    return rows
