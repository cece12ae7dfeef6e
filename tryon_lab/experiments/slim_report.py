"""Notebook 01's tables and figure: the embedding cache, standard against slim loading, the same try-on twice.

The recorded metrics keep ``plots.totals_table`` / ``plots.component_table`` (their keys are what a recorded
run compares); the rows here are for reading: binary byte units, and timings marked when they come from a CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import embeddings, metrics
from ..loading import COMPONENTS
from ..notebook import human_bytes, legend_outside, timed
from ..pipeline import TryOnResult


def _seconds(cpu: bool) -> str:
    return timed("load s", cpu)


def embeddings_row(path: Path) -> dict:
    """The cached text embeddings file: shapes, dtype, date and which text encoders made it."""
    meta = embeddings.read_metadata(path)
    return {"file": Path(path).name, **{k: meta[k] for k in ("dtype", "prompt_embeds_shape",
                                                             "pooled_prompt_embeds_shape", "date")},
            "encoder fingerprint": meta["encoder_fingerprint"][:16]}


def load_rows(reports: dict[str, list[dict]], cpu: bool) -> list[dict]:
    """Per pipeline: components, parameters, weight bytes, load seconds and memory growth."""
    return [{"pipeline": label, "components": len(rep), "params (M)": sum(r["params"] for r in rep) / 1e6,
             "weights": human_bytes(sum(r["bytes"] for r in rep)), _seconds(cpu): sum(r["load_s"] for r in rep),
             "memory": human_bytes(sum(r["memory_bytes"] for r in rep))} for label, rep in reports.items()]


def component_rows(reports: dict[str, list[dict]], cpu: bool) -> list[dict]:
    """Per component and pipeline, in readable units."""
    return [{"pipeline": label, "component": r["component"], "params (M)": r["params"] / 1e6,
             "weights": human_bytes(r["bytes"]), _seconds(cpu): r["load_s"],
             "memory": human_bytes(r["memory_bytes"]), "memory kind": r["memory_kind"]}
            for label, rep in reports.items() for r in rep]


def plot_components(reports: dict[str, list[dict]], cpu: bool):
    """Each component's parameters, weights, load time and memory, one horizontal bar per pipeline."""
    import matplotlib.pyplot as plt

    names: list[str] = []
    for rows in reports.values():
        names += [r["component"] for r in rows if r["component"] not in names]
    panels = [("params", 1e6, "parameters (millions)"), ("bytes", 2**20, "weights (MiB)"),
              ("load_s", 1.0, timed("load time (s)", cpu)),
              ("memory_bytes", 2**20, "memory growth (MiB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 0.32 * len(names) + 1.6), sharey=True)
    height = 0.8 / len(reports)
    y = np.arange(len(names))
    for ax, (key, unit, label) in zip(axes, panels, strict=True):
        for i, (pipe, rows) in enumerate(reports.items()):
            by = {r["component"]: (r.get(key) or 0) / unit for r in rows}
            ax.barh(y + i * height, [by.get(n, 0) for n in names], height, label=pipe)
        ax.set_xlabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(y + height * (len(reports) - 1) / 2, names)
    axes[0].invert_yaxis()
    legend_outside(fig, axes[0])
    return fig


def pickle_vs_safetensors(model_dir: str | Path, component: str = "transformer", tmp_dir: str | Path | None = None) -> dict:
    """Load time of the same weights from safetensors (memory-mapped) and from a pickle written for the test."""
    import tempfile
    import time

    from safetensors.torch import load_file

    folder = Path(model_dir) / COMPONENTS[component][0] / component
    shards = sorted(folder.glob("*.safetensors"))
    start = time.perf_counter()
    state = {}
    for s in shards:
        state.update(load_file(str(s)))
    st_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=tmp_dir) as d:
        pkl = Path(d) / "weights.pt"
        torch.save(state, pkl)
        start = time.perf_counter()
        torch.load(pkl, weights_only=True)
        pk_s = time.perf_counter() - start
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    return {"component": component, "bytes": nbytes, "safetensors_s": st_s, "pickle_s": pk_s}


def pickle_row(pk: dict, cpu: bool) -> dict:
    """``pickle_vs_safetensors`` in readable units."""
    return {"component": pk["component"], "weights": human_bytes(pk["bytes"]),
            timed("safetensors s", cpu): pk["safetensors_s"], timed("pickle s", cpu): pk["pickle_s"]}


def equivalence(slim: TryOnResult, standard: TryOnResult) -> dict:
    """The slim try-on against the stock one: latent and pixel max abs difference, image PSNR."""
    return {
        "latent max abs diff": metrics.max_abs(slim.latents, standard.latents),
        "image max abs diff (0-255)": metrics.max_abs(slim.images[0], standard.images[0]),
        "image PSNR (dB)": metrics.psnr(slim.images[0], standard.images[0]),
    }


def timing_rows(results: dict[str, TryOnResult]) -> list[dict]:
    """Seconds per stage of each pipeline's try-on."""
    return [{"pipeline": name, **r.timings} for name, r in results.items()]


def timing_note(slim: TryOnResult, cpu: bool) -> str:
    """Under the timing table: what the seconds are worth here, and any input conversions the request needed."""
    note = timed("Seconds per stage", cpu) + "."
    return note + (" Input conversions: " + "; ".join(slim.notes[0]) if slim.notes[0] else "")


def comparison_panels(sample, standard: TryOnResult, slim: TryOnResult) -> tuple[list, list[str]]:
    """Inputs, both results and (when the sample has one) the ground truth, with titles."""
    shown = [sample.garment, sample.person, sample.mask, standard.images[0], slim.images[0]]
    titles = ["garment", "person", "mask", "standard", "slim"]
    if sample.target is not None:
        shown.append(sample.target)
        titles.append("ground truth")
    return shown, titles


def masked_psnr_text(sample, slim: TryOnResult) -> str:
    """PSNR against the ground truth inside the mask (what the try-on repaints); '' without ground truth."""
    if sample.target is None:
        return ""
    return (f"Masked-region PSNR against ground truth: {metrics.psnr(slim.images[0], sample.target, mask=sample.mask):.2f}"
            " dB")
