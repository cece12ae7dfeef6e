"""Notebook 02's selections, tables and figures around ``teacache_fit`` (calibrate, fit, sweep).

On the CPU, measured seconds are shared-machine noise (a cache can even read as slower than full compute), so
the sweep is read through pass counts there: ``ideal_speedup`` = steps / computed passes.
"""

from __future__ import annotations

import math

from ..notebook import CPU_TIMING, legend_outside
from ..runs import save_image
from . import teacache_fit


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
