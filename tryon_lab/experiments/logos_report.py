"""Notebook 04's logo-pass comparison: the batched pass against one pipeline call per logo, same seeds."""

from __future__ import annotations

from dataclasses import dataclass

from .. import logos, metrics
from ..notebook import CPU_TIMING
from ..pipeline import TryOnSettings


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
