"""Steps against quality: how few denoising steps a try-on needs, per scheduler, and with the step cache.

For each scheduler and step count: masked PSNR against the ground truth (``gt_psnr``), PSNR against the
default scheduler's ``reference_steps`` output (``psnr``) and the transformer passes per image (counted, so
schedulers and TeaCache rows that skip passes share one axis: what the time on a GPU is proportional to).

``FluxFillPipeline`` always hands the scheduler its own ``sigmas`` (and ``mu``) and noises the image latents
with ``scale_noise``, so only schedulers with both run; the others are reported with the error they raise
(diffusers' own message), not patched around.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

from .. import teacache
from .teacache_fit import run_counted, score_row

_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
# name -> (diffusers scheduler class, config changes over the model's own scheduler config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "euler_karras": ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_beta": ("FlowMatchEulerDiscreteScheduler", {"use_beta_sigmas": True}),
    "lcm": ("FlowMatchLCMScheduler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", _FLOW),
    "dpm++_singlestep": ("DPMSolverSinglestepScheduler", _FLOW),
    "unipc": ("UniPCMultistepScheduler", _FLOW),
    "deis": ("DEISMultistepScheduler", _FLOW),
}
DEFAULT_SCHEDULERS = ("euler", "euler_karras", "heun", "dpm++", "unipc", "deis")
FULL_GRID = {"steps": (8, 10, 12, 16, 20, 28, 36, 50), "schedulers": tuple(SCHEDULERS)}


@contextmanager
def scheduler(pipe, name: str):
    """``pipe`` samples with scheduler ``name`` (made from the model's scheduler config) inside the block."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}.")
    cls, changes = SCHEDULERS[name]
    original = pipe.fill.scheduler
    pipe.fill.scheduler = getattr(diffusers, cls).from_config(original.config, **changes)
    try:
        yield pipe.fill.scheduler
    finally:
        pipe.fill.scheduler = original


def steps_quality(pipe, requests: list, targets: list, settings, steps=(8, 12, 20, 28),
                  schedulers=DEFAULT_SCHEDULERS, reference_steps: int = 28,
                  caches: dict[int, teacache.TeaCacheConfig] | None = None) -> tuple[list[dict], list[dict]]:
    """Rows (scheduler, steps, computed, psnr vs the default scheduler at ``reference_steps``, gt_psnr, ...) and
    the schedulers that do not run with FLUX Fill (scheduler, reason).

    ``caches``: step count -> TeaCache config, each run with the default scheduler at that step count (rows named
    ``euler + teacache``): the step cache combined with fewer steps. ``FULL_GRID`` holds the full grid.
    """
    if reference_steps < 1 or any(int(n) < 1 for n in steps):
        raise ValueError(f"steps and reference_steps must be >= 1, got {list(steps)} and {reference_steps}.")
    if unknown := [n for n in schedulers if n not in SCHEDULERS]:  # before anything runs
        raise ValueError(f"unknown scheduler(s) {unknown}; choose from {', '.join(SCHEDULERS)}.")
    settings = replace(settings, progress=False)
    ref, ref_passes = run_counted(pipe, requests, replace(settings, steps=reference_steps))
    rows, failed = [], []
    for name in schedulers:
        mine = []
        try:
            with scheduler(pipe, name):
                for n in steps:
                    res, passes = ((ref, ref_passes) if (name, n) == ("euler", reference_steps)
                                   else run_counted(pipe, requests, replace(settings, steps=int(n))))
                    mine.append(_row(name, n, res, passes, ref, requests, targets))
        except (ValueError, AttributeError, TypeError, NotImplementedError) as e:  # the scheduler, not our inputs
            failed.append({"scheduler": name, "class": SCHEDULERS[name][0], "reason": f"{type(e).__name__}: {e}"})
            continue
        rows += mine
    for n, cfg in (caches or {}).items():
        with teacache.enabled(pipe.transformer, replace(cfg, num_inference_steps=int(n))):
            res, passes = run_counted(pipe, requests, replace(settings, steps=int(n)))
        label = f"euler + teacache order {cfg.order}, rel_l1_thresh={cfg.rel_l1_thresh}"
        rows.append(_row("euler + teacache", n, res, passes, ref, requests, targets, label))
    return rows, failed


def _row(name, steps, results, passes, ref, requests, targets, setting: str = "") -> dict:
    row = score_row(name, setting or name, float(steps), results, passes, ref, requests, targets)
    return {"scheduler": row.pop("method"), "steps": int(steps), **row}


def plot(rows: list[dict], reference_steps: int = 28):
    """Masked PSNR vs the ground truth and PSNR vs the reference output, against transformer passes per image."""
    import matplotlib.pyplot as plt

    from ..notebook import legend_outside

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    names = list(dict.fromkeys(r["scheduler"] for r in rows))
    for i, name in enumerate(names):
        pts = sorted((r["computed"], r.get("gt_psnr"), r["psnr"]) for r in rows if r["scheduler"] == name)
        style = dict(marker="o", ms=3, color=f"C{i}", ls="--" if "teacache" in name else "-", label=name)
        if all(p[1] is not None for p in pts):
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
        finite = [p for p in pts if p[2] != float("inf")]  # the reference itself is identical to itself
        axes[1].plot([p[0] for p in finite], [p[2] for p in finite], **style)
    axes[0].set(xlabel="transformer passes per image", ylabel="masked PSNR vs ground truth (dB)",
                title="quality vs the ground truth")
    axes[1].set(xlabel="transformer passes per image", ylabel=f"PSNR vs {reference_steps}-step output (dB)",
                title=f"distance to {reference_steps} steps")
    return legend_outside(fig, axes[0])


def failed_note(failed: list[dict]) -> str:
    """The schedulers that do not run with FLUX Fill, one line each with diffusers' reason."""
    if not failed:
        return ""
    return "Schedulers that do not run with `FluxFillPipeline`:\n" + "\n".join(
        f"- `{f['scheduler']}` ({f['class']}): {f['reason'].splitlines()[0]}" for f in failed)
