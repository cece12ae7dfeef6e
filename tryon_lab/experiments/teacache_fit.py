"""TeaCache experiments: calibration, coefficient fitting, the sweep against diffusers' caches, and plots.

    calibrate        full-compute trajectories (per step: change of block 0's modulated input and of the output)
    fit_coefficients numpy.polyfit of output change on input change, the degree chosen on held-out requests
    sweep            TeaCache thresholds (order 0 and 1), the published FLUX polynomial, First Block Cache,
                     MagCache, TaylorSeer and peers run elsewhere (cache-dit, ``cache_dit_peer``) on the same
                     requests, each against full compute (and the ground truth)

The hook itself and the coefficient files are ``tryon_lab.teacache``.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np

from ..images import load_image, load_mask
from ..metrics import psnr, rel_l2, ssim
from ..pipeline import prepare, tryon
from ..teacache import PUBLISHED_FLUX_COEFFICIENTS, TeaCacheConfig, enabled

# --------------------------------------------------------------------------- calibration and fit


@dataclass
class Calibration:
    """Full-compute trajectories: per request, per step the change of the modulated input (x) and output (y)."""

    requests: list[dict]  # {"name", "seed", "timesteps", "x", "y"}; step 0 has no change and is left out
    steps: int
    guidance_scale: float
    resolution: list[int]  # diptych (width, height) the transformer saw
    fingerprint: str
    model: str
    dtype: str


@dataclass
class Fit:
    coefficients: list[float]
    degree: int
    input_range: tuple[float, float]  # input changes seen in the fit (pass to TeaCacheConfig.input_range)
    rms_residual: float  # on the fitted pairs
    holdout_mae: float | None  # mean |predicted - measured| output change on held-out requests
    holdout_rel_error: float | None  # holdout_mae / mean measured output change
    degree_errors: dict[int, float]  # held-out MAE of every candidate degree
    published_holdout_mae: float | None  # the published FLUX text-to-image polynomial on the same pairs
    fit_requests: list[str]
    holdout_requests: list[str]


def calibrate(pipe, requests, settings) -> Calibration:
    """Run every request (one per call) with full compute and record both relative changes per step."""
    settings = replace(settings, progress=False)
    cfg = TeaCacheConfig(0.0, num_inference_steps=settings.steps, record=True)
    out = []
    with enabled(pipe.transformer, cfg) as hook:
        for i, r in enumerate(requests):
            tryon(pipe, [r], settings)
            steps = hook.trajectory[1:]
            out.append({"name": r.name or f"request{i}", "seed": int(r.seed), "timesteps": [s["timestep"] for s in steps],
                        "x": [s["input_rel_l1"] for s in steps], "y": [s["output_rel_l1"] for s in steps]})
    size = list(prepare(list(requests[:1]), settings.fit)[0].diptych.size)
    return Calibration(out, settings.steps, settings.guidance_scale, size, pipe.fingerprint, pipe.description,
                       str(pipe.dtype).replace("torch.", ""))


def _pairs(records) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([np.asarray(r["x"], dtype=np.float64) for r in records]) if records else np.empty(0)
    y = np.concatenate([np.asarray(r["y"], dtype=np.float64) for r in records]) if records else np.empty(0)
    return x, y


def _polyfit(x, y, degree: int) -> np.ndarray:
    with warnings.catch_warnings():  # high degrees on a narrow x range are ill-conditioned; the held-out error judges
        warnings.simplefilter("ignore", np.exceptions.RankWarning)
        return np.polyfit(x, y, degree)


def fit_coefficients(records, degree: int | None = None, holdout: int | None = None,
                     degrees=(1, 2, 3, 4, 5)) -> Fit:
    """Fit output change ~ polyval(c, input change) with ``numpy.polyfit``.

    ``records``: a ``Calibration`` or a list of ``{"name", "x", "y"}``. The last ``holdout`` requests (default a
    third, at least one when there are two or more) are never fitted; the degree is the one with the lowest
    held-out error, 4 when it ties (within 1%, or both at rounding level) or when nothing is held out.
    """
    recs = records.requests if isinstance(records, Calibration) else list(records)
    holdout = (len(recs) // 3 or (1 if len(recs) > 1 else 0)) if holdout is None else holdout
    if not 0 <= holdout < len(recs):
        raise ValueError(f"fit_coefficients: holdout must leave at least one request to fit; got {holdout} of {len(recs)}.")
    fit_recs, held = recs[: len(recs) - holdout], recs[len(recs) - holdout:]
    x, y = _pairs(fit_recs)
    hx, hy = _pairs(held)
    errors = {}
    if len(hx):
        for d in degrees:
            if len(x) > d:
                errors[d] = float(np.mean(np.abs(np.polyval(_polyfit(x, y, d), hx) - hy)))
    if degree is None:
        best = min(errors.values()) if errors else None
        noise = 1e-9 * float(np.abs(hy).mean()) if len(hy) else 0.0  # rounding-level differences are ties too
        tied = [d for d, e in errors.items() if e <= max(best * 1.01, noise)] if errors else []
        degree = min(4, max(1, len(x) - 1)) if (not tied or 4 in tied) else min(tied)
    if len(x) <= degree:
        raise ValueError(f"fit_coefficients: {len(x)} pairs cannot fit a degree-{degree} polynomial.")
    c = _polyfit(x, y, degree)
    mae = float(np.mean(np.abs(np.polyval(c, hx) - hy))) if len(hx) else None
    pub = float(np.mean(np.abs(np.polyval(PUBLISHED_FLUX_COEFFICIENTS, hx) - hy))) if len(hx) else None
    return Fit([float(v) for v in c], int(degree), (float(x.min()), float(x.max())), float(np.sqrt(np.mean((np.polyval(c, x) - y) ** 2))), mae,
               None if mae is None else mae / max(float(np.mean(np.abs(hy))), 1e-12), errors, pub,
               [r.get("name", "") for r in fit_recs], [r.get("name", "") for r in held])


def describe_fit(fit: Fit) -> str:
    """One markdown line: the polynomial, how well it fits, and how well it predicts held-out requests."""
    held = ("no held-out requests" if fit.holdout_mae is None else
            f"held-out MAE {fit.holdout_mae:.4g} ({100 * fit.holdout_rel_error:.1f}% of the mean output change; "
            f"published FLUX t2i coefficients: {fit.published_holdout_mae:.4g})")
    return (f"Degree {fit.degree}: coefficients {[float(f'{c:.6g}') for c in fit.coefficients]}, RMS residual "
            f"{fit.rms_residual:.4g}, {held}; input changes seen {fit.input_range[0]:.4g}..{fit.input_range[1]:.4g} "
            "(the hook clamps to that range).")


def degree_table(fit: Fit) -> list[dict]:
    """Held-out error of every candidate degree and of the published polynomial (rows for ``markdown_table``)."""
    rows = [{"degree": d, "held-out MAE": e, "chosen": "yes" if d == fit.degree else ""} for d, e in fit.degree_errors.items()]
    return rows + [{"degree": "published (FLUX t2i)", "held-out MAE": fit.published_holdout_mae, "chosen": ""}]


# --------------------------------------------------------------------------- sweep against full compute and diffusers' caches

DIFFUSERS_SETTINGS = {"first_block_cache": [0.2, 0.45, 0.7], "mag_cache": [0.06, 0.24], "taylorseer": [2, 4]}


def run_counted(pipe, requests, settings, context=nullcontext) -> tuple[list, list[int]]:
    """One call per request (TeaCache decides per batch); counts the last block's attention calls per image."""
    count = [0]
    handle = pipe.transformer.single_transformer_blocks[-1].attn.norm_q.register_forward_pre_hook(
        lambda *_: count.__setitem__(0, count[0] + 1))
    results, passes = [], []
    try:
        for r in requests:
            before = count[0]
            with context():
                results.append(tryon(pipe, [r], settings))
            passes.append(count[0] - before)
    finally:
        handle.remove()
    return results, passes


def score_row(method, setting, value, results, passes, ref, requests, targets) -> dict:
    """One sweep row: passes, fastest times, PSNR/SSIM/latent rel. L2 vs ``ref`` (if any), masked PSNR vs targets."""
    imgs = [r.images[0] for r in results]
    row = {"method": method, "setting": setting, "value": value, "computed": float(np.mean(passes)),  # fastest image:
           "s_per_image": min(r.timings["total"] for r in results),  # on a shared machine the minimum is the
           "denoise_s": min(r.timings["denoise"] for r in results)}  # estimate least disturbed by other work
    if ref is not None:
        refs = [r.images[0] for r in ref]
        row["psnr"] = float(np.mean([psnr(a, b) for a, b in zip(imgs, refs, strict=True)]))
        row["ssim"] = float(np.mean([ssim(a, b) for a, b in zip(imgs, refs, strict=True)]))
        row["latent_rel_l2"] = float(np.mean([rel_l2(a.latents, b.latents) for a, b in zip(results, ref, strict=True)]))
    gts = [(img, load_image(t, "target"), np.asarray(load_mask(q.mask, img.size)) > 0)
           for img, t, q in zip(imgs, targets, requests, strict=True) if t is not None]
    if gts:
        row["gt_psnr"] = float(np.mean([psnr(img, t, mask=m) for img, t, m in gts]))
    row["images"] = imgs
    return row


def mag_ratios(pipe, request, settings) -> list[float]:
    """diffusers' MagCache calibration mode on our model: it prints the ratios at the end of the trajectory."""
    import ast
    import contextlib
    import io

    from diffusers import MagCacheConfig

    buf = io.StringIO()
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=settings.steps))
    try:
        with contextlib.redirect_stdout(buf):
            run_counted(pipe, [request], settings)
    finally:
        pipe.transformer.disable_cache()
    lists = [ln for ln in buf.getvalue().splitlines() if ln.startswith("[")]
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios; the diffusers version may have changed its output.")
    return [float(v) for v in ast.literal_eval(lists[-1])]


def diffusers_configs(pipe, requests, settings, params: dict | None = None) -> list[tuple[str, str, float, object]]:
    """(method, setting, value, config) for First Block Cache, MagCache (ratios calibrated here) and TaylorSeer."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    p = {**DIFFUSERS_SETTINGS, **(params or {})}
    out = [("first_block_cache", f"threshold={v}", v, FirstBlockCacheConfig(threshold=v)) for v in p["first_block_cache"]]
    if p["mag_cache"]:
        ratios = mag_ratios(pipe, requests[0], settings)
        out += [("mag_cache", f"threshold={v}", v, MagCacheConfig(threshold=v, num_inference_steps=settings.steps,
                                                                  mag_ratios=ratios)) for v in p["mag_cache"]]
    out += [("taylorseer", f"cache_interval={v}", v, TaylorSeerCacheConfig(cache_interval=int(v), taylor_factors_dtype=pipe.dtype))
            for v in p["taylorseer"]]
    return out


def sweep(pipe, requests, thresholds, settings, coefficients, include_diffusers: bool = True, targets=None,
          published_thresholds=(), diffusers_params: dict | None = None, orders=(0,), peers=(),
          **teacache_kwargs) -> list[dict]:
    """Every method and setting on the same requests, each against full compute (and the ground truth, if any).

    ``orders``: TeaCache's residual extrapolation orders to sweep (order 1 rows are ``teacache_order1``).
    ``peers``: callables ``(pipe, requests, settings) -> [(method, setting, value, results, passes)]`` for methods
    that run elsewhere (``cache_dit_peer.runner()``: a child process), scored here like every other row.
    Rows: method, setting, value, computed (block-stack passes per image), s_per_image, denoise_s (fastest
    image), speedup (full-compute denoise time / this one), ideal_speedup (steps / computed), psnr, ssim (images
    vs full compute), latent_rel_l2, gt_psnr (masked, vs ``targets`` or ``request.target``), images.
    """
    requests = list(requests)
    targets = list(targets) if targets is not None else [getattr(r, "target", None) for r in requests]
    settings = replace(settings, progress=False)
    run_counted(pipe, requests, replace(settings, steps=1))  # warm-up: one-time costs and the Redux cache stay out of the rows
    ref, passes = run_counted(pipe, requests, settings)
    rows = [score_row("full", "full compute", 0.0, ref, passes, ref, requests, targets)]
    runs = [("teacache" + (f"_order{o}" if o else ""), coefficients, t, o) for o in orders for t in thresholds]
    runs += [("teacache_published", PUBLISHED_FLUX_COEFFICIENTS, t, 0) for t in published_thresholds]
    for method, coeffs, t, order in runs:
        cfg = TeaCacheConfig(t, list(coeffs), num_inference_steps=settings.steps, order=order, **teacache_kwargs)
        with enabled(pipe.transformer, cfg):
            res, passes = run_counted(pipe, requests, settings)
        rows.append(score_row(method, f"rel_l1_thresh={t}", float(t), res, passes, ref, requests, targets))
    for method, setting, value, cfg in diffusers_configs(pipe, requests, settings, diffusers_params) if include_diffusers else []:
        pipe.transformer.enable_cache(cfg)
        try:
            res, passes = run_counted(pipe, requests, settings, lambda: pipe.transformer.cache_context("cond"))
        finally:
            pipe.transformer.disable_cache()
        rows.append(score_row(method, setting, float(value), res, passes, ref, requests, targets))
    for peer in peers:
        rows += [score_row(method, setting, float(value), res, passes, ref, requests, targets)
                 for method, setting, value, res, passes in peer(pipe, requests, settings)]
    for row in rows:
        row["speedup"] = rows[0]["denoise_s"] / row["denoise_s"]
        row["ideal_speedup"], row["steps"] = settings.steps / max(row["computed"], 1e-9), settings.steps
    return rows


def recommend_threshold(rows: list[dict], min_psnr: float = 30.0, method: str = "teacache") -> float | None:
    """The largest threshold that keeps image PSNR vs full compute >= ``min_psnr``, as do all smaller ones."""
    best = None
    for row in sorted((r for r in rows if r["method"] == method), key=lambda r: r["value"]):
        if row["psnr"] < min_psnr:
            break
        best = row["value"]
    return best


TABLE_COLUMNS = ["method", "setting", "computed", "steps", "denoise_s", "speedup", "ideal_speedup", "psnr", "ssim",
                 "latent_rel_l2", "gt_psnr"]


def scalar_rows(rows: list[dict]) -> list[dict]:
    """Rows without images (for JSON metrics and tables)."""
    return [{k: v for k, v in r.items() if k != "images"} for r in rows]


# --------------------------------------------------------------------------- plots (each returns its Figure)


def plot_calibration(calibration: Calibration, fit: Fit):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    held = set(fit.holdout_requests)
    for label, recs in (("fitted", [r for r in calibration.requests if r["name"] not in held]),
                        ("held out", [r for r in calibration.requests if r["name"] in held])):
        x, y = _pairs(recs)
        ax.scatter(x, y, s=14, label=f"{label} requests")
    x, y = _pairs(calibration.requests)
    grid = np.linspace(0, float(x.max()) * 1.2 if len(x) else 1.0, 200)
    fitted, published = np.polyval(fit.coefficients, np.clip(grid, *fit.input_range)), np.polyval(PUBLISHED_FLUX_COEFFICIENTS, grid)
    ax.plot(grid, np.polyval(fit.coefficients, grid), ":", color="grey", label="fit, raw polynomial")
    ax.plot(grid, fitted, "k-", label=f"fit, degree {fit.degree} (clamped to the calibrated range)")
    ax.plot(grid, published, "r--", label="published FLUX t2i")
    top = max([float(y.max()) if len(y) else 0.0, float(fitted.max()), float(published[grid >= x.min()].max()) if len(x) else 0.0])
    ax.set_ylim(0, max(top * 1.15, 1e-3))
    ax.set(xlabel="rel. L1 change of block 0 modulated input", ylabel="rel. L1 change of model output",
           title="TeaCache calibration")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_pareto(rows: list[dict]):
    """Speed-up vs image PSNR against full compute, one line per method (identical images drawn at the top)."""
    import matplotlib.pyplot as plt

    finite = [r["psnr"] for r in rows if math.isfinite(r.get("psnr", math.inf))]
    cap = (max(finite) if finite else 40.0) + 5
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["speedup"], min(r["psnr"], cap), r["setting"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
        for sx, sy, s in pts:
            ax.annotate(s.split("=")[-1], (sx, sy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(cap, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="speed-up of denoising vs full compute", ylabel=f"PSNR vs full compute, dB (identical = {cap:.0f})",
           title="Speed vs fidelity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_samples(rows: list[dict], index: int = 0, target=None, include: float | None = None, method: str = "teacache"):
    """Full compute, ``method`` at its smallest, largest and ``include`` (else middle) setting, the ground truth."""
    from ..plots import image_row

    cands = sorted((r for r in rows if r["method"] == method), key=lambda r: r["value"])
    middle = [r for r in cands[1:-1] if r["value"] == include] or cands[len(cands) // 2: len(cands) // 2 + 1]
    picks = list({id(r): r for r in cands[:1] + middle + cands[-1:]}.values())
    shown = [r for r in rows if r["method"] == "full"][:1] + picks
    panels = [(r["images"][index], f"{r['method']}\n{r['setting']}\n{r['computed']:.0f} passes") for r in shown]
    panels += [(target, "ground truth")] if target is not None else []
    return image_row([p[0] for p in panels], [p[1] for p in panels])
