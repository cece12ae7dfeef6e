"""Plots the notebooks show (matplotlib, each returns its Figure so tests and runs can save it)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def _plt():
    import matplotlib.pyplot as plt

    return plt


def image_row(images: list[Image.Image], titles: list[str], scale: float = 2.2):
    """Images side by side with titles."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(images), figsize=(scale * len(images), scale * 1.6))
    for ax, img, title in zip(np.atleast_1d(axes), images, titles, strict=True):
        ax.imshow(img, cmap="gray" if img.mode == "L" else None)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig


def component_bars(reports: dict[str, list[dict]], metrics=("params", "bytes", "load_s", "memory_bytes")):
    """One bar chart per metric: each pipeline's components side by side (e.g. standard vs slim)."""
    plt = _plt()
    names = []
    for rows in reports.values():
        names += [r["component"] for r in rows if r["component"] not in names]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    width = 0.8 / len(reports)
    for ax, metric in zip(axes, metrics, strict=True):
        for i, (label, rows) in enumerate(reports.items()):
            by = {r["component"]: r.get(metric, 0) or 0 for r in rows}
            ax.bar(np.arange(len(names)) + i * width, [by.get(n, 0) for n in names], width, label=label)
        ax.set_xticks(np.arange(len(names)) + width * (len(reports) - 1) / 2, names, rotation=60, ha="right",
                      fontsize=8)
        ax.set_title(metric)
    axes[0].legend()
    fig.tight_layout()
    return fig


def totals_table(reports: dict[str, list[dict]]) -> list[dict]:
    """Per pipeline: total params, bytes, load time and memory."""
    rows = []
    for label, rep in reports.items():
        rows.append({"pipeline": label, "components": len(rep),
                     "params (M)": sum(r["params"] for r in rep) / 1e6,
                     "bytes (MB)": sum(r["bytes"] for r in rep) / 1e6,
                     "load (s)": sum(r["load_s"] for r in rep),
                     "memory (MB)": sum(r["memory_bytes"] for r in rep) / 1e6})
    return rows


def component_table(reports: dict[str, list[dict]]) -> list[dict]:
    """Per component and pipeline, in readable units."""
    rows = []
    for label, rep in reports.items():
        for r in rep:
            rows.append({"pipeline": label, "component": r["component"], "params (M)": r["params"] / 1e6,
                         "bytes (MB)": r["bytes"] / 1e6, "load (s)": r["load_s"],
                         "memory (MB)": r["memory_bytes"] / 1e6, "memory kind": r["memory_kind"]})
    return rows


def memory_mode_bars(rows: list[dict], limits_gib: list[float] = ()):
    """Peak memory and seconds per image of each memory mode (``memory.mode_rows``), limits as dashed lines."""
    plt = _plt()
    rows = [r for r in rows if r["works"]]
    names = [r["mode"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.2), sharey=True)
    a.barh(names, [r["peak GiB"] for r in rows], color="#4c72b0")
    for lim in limits_gib:
        a.axvline(lim, color="#c44e52", ls="--", lw=1)
        a.text(lim, len(rows) - 0.4, f" {lim:g} GiB", color="#c44e52", fontsize=8)
    a.set_xlabel("peak GPU memory (GiB, reserved)")
    b.barh(names, [r["s per image"] for r in rows], color="#55a868")
    b.set_xlabel("seconds per image")
    a.invert_yaxis()
    fig.tight_layout()
    return fig


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = "{:.3g}") -> str:
    """A plain markdown table from a list of dicts (for notebooks and result files)."""
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(v):
        return floatfmt.format(v) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def phase_bars(rows: list[dict], phases: list[str], label: str = "case", unit: str = "s", title: str = ""):
    """One horizontal stacked bar per row (e.g. a cold-start case), one colour per phase, totals at the bar ends."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(rows) + 2.0))
    left = np.zeros(len(rows))
    names = [str(r[label]) for r in rows]
    colours = plt.get_cmap("tab20").colors  # 13 phases: the default cycle of 10 would give two phases one colour
    for i, phase in enumerate(phases):
        vals = np.array([float(r.get(phase, 0.0) or 0.0) for r in rows])
        ax.barh(names, vals, left=left, label=phase, color=colours[i % len(colours)])
        left += vals
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.1f} {unit}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit}")
    ax.set_xlim(0, left.max() * 1.15 if len(left) else 1)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(4, len(phases)), fontsize=8, frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
