"""Notebook 02's selections, tables and figures around ``teacache_fit`` (calibrate, fit, sweep).

On the CPU, measured seconds are shared-machine noise (a cache can even read as slower than full compute), so
the sweep is read through pass counts there: ``ideal_speedup`` = steps / computed passes. Across step counts the
methods are compared at equal passes (``lead_table``: PSNR interpolated along each method's sweep).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..notebook import CPU_TIMING, legend_outside
from ..runs import save_image
from ..teacache import TeaCacheConfig
from . import cache_dit_peer, teacache_fit


def held_out(requests: list, targets: list, calibration_size: int, holdout_size: int) -> tuple[list, list]:
    """The requests (and their ground truths) the fit never saw: the last ``holdout_size``; without any held
    out, the last calibration request (so the sweep still has one to run on)."""
    first = calibration_size if holdout_size else calibration_size - 1
    return requests[first:], targets[first:]


def sweep_columns(cpu: bool) -> list[str]:
    """The sweep table's columns: measured seconds and speed-up only on a GPU (pass counts everywhere)."""
    timed = ("denoise_s", "speedup")
    return [c for c in teacache_fit.TABLE_COLUMNS if not (cpu and c in timed)]


def sweep_rows(rows: list[dict]) -> list[dict]:
    """``teacache_fit.scalar_rows`` with PSNR of identical images written as 'identical' (not inf)."""
    out = teacache_fit.scalar_rows(rows)
    for r in out:
        if not math.isfinite(r.get("psnr", 0.0)):
            r["psnr"] = "identical"
    return out


def plot_calibration(calibration, fit):
    """``teacache_fit.plot_calibration`` with its legend beside the plot."""
    fig = teacache_fit.plot_calibration(calibration, fit)
    return legend_outside(fig)


def plot_pareto(rows: list[dict], cpu: bool):
    """Speed-up against image PSNR vs full compute, one line per method; each point labelled with its setting.

    On the CPU the x axis is the ideal speed-up (steps / passes computed), on a GPU the measured one."""
    import matplotlib.pyplot as plt

    key = "ideal_speedup" if cpu else "speedup"
    finite = [r["psnr"] for r in rows if math.isfinite(r.get("psnr", math.inf))]
    cap = (max(finite) if finite else 40.0) + 5
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r[key], min(r["psnr"], cap), r["setting"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
        labels: dict[tuple[float, float], list[str]] = {}  # settings that land on the same point share one label
        for sx, sy, s in pts:
            labels.setdefault((sx, sy), []).append(s.split("=")[-1])
        for (sx, sy), names in labels.items():
            ax.annotate(", ".join(names), (sx, sy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(cap, color="grey", lw=0.5, ls=":")
    xlabel = ("ideal speed-up of denoising, steps / passes computed (x)" if cpu
              else "measured speed-up of denoising vs full compute (x)")
    ax.set(xlabel=xlabel, ylabel=f"PSNR vs full compute (dB; identical = {cap:.0f})", title="Speed vs fidelity")
    return legend_outside(fig)


def speed_note(cpu: bool) -> str:
    """What the sweep's speed numbers mean on this device."""
    if cpu:
        return (f"On this CPU the measured seconds are {CPU_TIMING} only, so the table and the plot use pass counts: "
                "`ideal_speedup` = steps / `computed`. The measured times stay in the recorded metrics.")
    return ("`speedup` is measured (fastest image); the gap to `ideal_speedup` is each method's per-step overhead.")


def save_images(output_dir, rows: list[dict]) -> None:
    """The first image of full compute and of every TeaCache threshold, as ``<method>_<value>``."""
    for r in rows:
        if r["method"] in ("full", "teacache"):
            save_image(output_dir, f"{r['method']}_{r['value']}", r["images"][0])


# --------------------------------------------------------------------------- across step counts, at equal passes


def peers(thresholds=None, include: bool = True) -> tuple[list, str]:
    """The sweep's ``peers`` (cache-dit's DBCache + TaylorSeer at these thresholds, in a child process) and a line
    saying what runs, or why it does not."""
    if not include:
        return [], "cache-dit is switched off (`include_cache_dit = False`)."
    if why := cache_dit_peer.missing():
        return [], why
    c = cache_dit_peer.PeerConfig(**({"thresholds": tuple(thresholds)} if thresholds is not None else {}))
    return [cache_dit_peer.runner(c)], (f"`{cache_dit_peer.METHOD}`: cache-dit's DBCache (Fn={c.fn}, Bn={c.bn}, "
                                        f"first {c.warmup} step computed) + TaylorSeer order {c.order}, run in a "
                                        "process of its own.")


def sweep_at_steps(pipe, requests: list, targets: list, steps: list[int], settings, calibration_size: int,
                   holdout_size: int, thresholds, degree: int | None = None,
                   **sweep_kwargs) -> tuple[dict[int, list[dict]], dict[int, teacache_fit.Fit]]:
    """Calibrate, fit and sweep again at each step count (coefficients are fitted per step count): rows and fits
    by step count."""
    rows, fits = {}, {}
    held, held_targets = held_out(requests, targets, calibration_size, holdout_size)
    for n in steps:
        s = replace(settings, steps=int(n))
        fits[int(n)] = fit = teacache_fit.fit_coefficients(teacache_fit.calibrate(pipe, requests, s), degree=degree,
                                                           holdout=holdout_size)
        rows[int(n)] = teacache_fit.sweep(pipe, held, thresholds, s, fit.coefficients, targets=held_targets,
                                          input_range=fit.input_range, **sweep_kwargs)
    return rows, fits


def recommended_caches(rows_by_steps: dict[int, list[dict]], fits: dict[int, teacache_fit.Fit], min_psnr: float,
                       order: int = 1) -> dict[int, TeaCacheConfig]:
    """Per step count, TeaCache of this order at its recommended threshold (left out where none keeps ``min_psnr``)."""
    method = "teacache" + (f"_order{order}" if order else "")
    out = {}
    for n, rows in rows_by_steps.items():
        t = teacache_fit.recommend_threshold(rows, min_psnr=min_psnr, method=method)
        if t is not None:
            out[n] = TeaCacheConfig(t, fits[n].coefficients, num_inference_steps=n, input_range=fits[n].input_range,
                                    order=order)
    return out


def psnr_at(rows: list[dict], method: str, passes: float) -> float | None:
    """``method``'s PSNR vs full compute at ``passes`` per image, linear between its two nearest sweep points
    (None outside the passes its sweep reached; identical images are left out: they have no finite PSNR)."""
    pts: dict[float, float] = {}
    for r in rows:
        if r["method"] == method and math.isfinite(r.get("psnr", math.inf)):
            pts[r["computed"]] = max(pts.get(r["computed"], -math.inf), r["psnr"])
    xs = sorted(pts)
    if not xs or not xs[0] - 1e-9 <= passes <= xs[-1] + 1e-9:
        return None
    return float(np.interp(passes, xs, [pts[x] for x in xs]))


def lead_table(rows_by_steps: dict[int, list[dict]], factors=(2, 3, 4), methods: list[str] | None = None) -> list[dict]:
    """At 2x, 3x, 4x fewer passes than steps (and each step count): every method's PSNR and who leads, by how much."""
    out = []
    for steps, rows in rows_by_steps.items():
        names = methods or [m for m in dict.fromkeys(r["method"] for r in rows) if m != "full"]
        for k in factors:
            row = {"steps": steps, "passes": f"{steps / k:.3g} ({k}x fewer)"}
            row.update({m: "" if (v := psnr_at(rows, m, steps / k)) is None else v for m in names})
            ranked = sorted(((v, m) for m, v in row.items() if m in names and v != ""), reverse=True)
            row["leads"] = ranked[0][1] if ranked else ""
            row["by dB"] = ranked[0][0] - ranked[1][0] if len(ranked) > 1 else ""
            out.append(row)
    return out


def plot_passes(rows_by_steps: dict[int, list[dict]]):
    """PSNR vs full compute against transformer passes per image, one panel per step count, a line per method;
    dotted lines at 2x, 3x and 4x fewer passes."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows_by_steps), figsize=(4.2 * len(rows_by_steps), 3.8), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for rows in rows_by_steps.values() for r in rows if r["method"] != "full"))
    for ax, (steps, rows) in zip(axes[0], rows_by_steps.items(), strict=True):
        for i, method in enumerate(methods):  # one colour per method in every panel
            pts = sorted((r["computed"], r["psnr"]) for r in rows if r["method"] == method and math.isfinite(r["psnr"]))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, color=f"C{i}", label=method)
        for k in (2, 3, 4):
            ax.axvline(steps / k, color="grey", lw=0.5, ls=":")
        ax.set(xlabel="transformer passes per image", title=f"{steps} steps")
    axes[0][0].set_ylabel("PSNR vs full compute (dB)")
    return legend_outside(fig, axes[0][0])
