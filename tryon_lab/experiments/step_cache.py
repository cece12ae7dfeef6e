"""The step cache's decisions, taken where they mean something and timed where time is real.

Cache decisions only mean something on trained weights: ``find_pattern`` fits TeaCache's coefficients on
calibration requests of the trained default model (CPU), picks the largest threshold whose held-out images stay
at or above ``min_psnr`` dB against full compute, and records the compute/skip pattern it makes there.
``scripts/bench_gpu.py --schedule`` replays that pattern (``TeaCacheConfig(schedule=...)``) on the full-size model
to time it (``gpu_bench``'s step-cache rows), so the speed number and the quality number come from one decision
pattern. A pattern found with ``order=1`` (the skipped residual extrapolated) is replayed with ``order=1`` too: the
decisions are the same, the skipped steps' values are not.
"""

from __future__ import annotations

from .. import checkpoint, pipeline, synthetic, teacache
from ..configure import PipelineOptions, build_pipeline
from ..metrics import psnr
from . import teacache_fit


def find_patterns(model: str = "default", steps: int = 28, calibration: int = 4, heldout: int = 4, seed: int = 0,
                  thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.4, 2.0),
                  min_psnr: float = 30.0, orders: tuple[int, ...] = (0, 1)) -> dict[int, dict]:
    """``find_pattern`` for each residual extrapolation order (``TeaCacheConfig.order``), sharing one calibration,
    one fit and one set of full-compute references: order -> result."""
    pipe = build_pipeline(checkpoint.resolve_model_dir(model), PipelineOptions())
    pairs = [synthetic.make_sample(seed, i) for i in range(calibration + heldout)]
    requests = [pipeline.TryOnRequest(p.person, p.garment, p.mask, seed=seed + i, name=f"sample{i}")
                for i, p in enumerate(pairs)]
    settings = pipeline.TryOnSettings(steps=steps, progress=False)
    cal = teacache_fit.calibrate(pipe, requests[:calibration], settings)
    fit = teacache_fit.fit_coefficients(cal)
    held = requests[calibration:]
    full = [pipeline.tryon(pipe, r, settings).images[0] for r in held]
    out = {}
    for order in orders:
        rows, best = [], None
        for t in sorted(thresholds):
            cfg = teacache.TeaCacheConfig(t, list(fit.coefficients), num_inference_steps=steps,
                                          input_range=fit.input_range, order=order)
            patterns, scores = [], []
            with teacache.enabled(pipe.transformer, cfg):
                for r, ref in zip(held, full, strict=True):
                    scores.append(psnr(pipeline.tryon(pipe, r, settings).images[0], ref))
                    patterns.append([s["computed"] for s in teacache.teacache_stats(pipe.transformer)["last_trajectory"]])
            row = {"threshold": t, "min_psnr_db": min(scores), "mean_psnr_db": sum(scores) / len(scores),
                   "computed": [sum(p) for p in patterns], "patterns": patterns}
            rows.append(row)
            if row["min_psnr_db"] >= min_psnr:
                best = row
        res = {"model": pipe.description, "fingerprint": pipe.fingerprint, "steps": steps, "order": order,
               "min_psnr_db_required": min_psnr, "sweep": rows, "coefficients": fit.coefficients,
               "input_range": list(fit.input_range)}
        if best is not None:
            schedule = max(best["patterns"], key=sum)  # the request that needed the most passes: a fair per-image cost
            res.update(threshold=best["threshold"], schedule=schedule, computed=sum(schedule),
                       min_psnr_db=best["min_psnr_db"])
        out[order] = res
    return out


def find_pattern(model: str = "default", steps: int = 28, calibration: int = 4, heldout: int = 4, seed: int = 0,
                 thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.4, 2.0),
                 min_psnr: float = 30.0, order: int = 0) -> dict:
    """Fit, sweep thresholds on held-out requests, keep the largest one at >= ``min_psnr`` dB (worst request),
    and return its per-request patterns and the most conservative one (most computed steps) as ``schedule``.
    ``order=1``: TeaCache extrapolates skipped residuals; replay it with ``TeaCacheConfig(schedule=..., order=1)``."""
    return find_patterns(model, steps, calibration, heldout, seed, thresholds, min_psnr, (order,))[order]
