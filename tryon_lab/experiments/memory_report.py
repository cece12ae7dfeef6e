"""Notebook 05's tables and figure from the measured GPU budget (``memory``) and the GPU run's raw record."""

from __future__ import annotations

import json
from pathlib import Path

from .. import memory
from ..notebook import human_bytes, legend_outside, timed

GB = 1e9  # cards are sold in GB (1e9 bytes); the allocator counts GiB (2**30)


def load_raw(path: str | Path) -> dict:
    """Everything the GPU memory benchmark measured (capped runs, hot path); {} when it was not committed."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def budget_header(budget: dict, raw: dict) -> str:
    """Markdown: where and when the budget was measured, on which model and request."""
    where = budget.get("stamp") or {}
    return (f"**Budget measured on:** {where.get('device')} (commit {str(where.get('commit'))[:7]}, {where.get('date')}), "
            f"{raw.get('model', 'model not recorded')}; {budget.get('request')}")


def component_rows(budget: dict) -> list[dict]:
    """The component budget with binary units."""
    return [{"component": k, "bytes": human_bytes(v["bytes"])} for k, v in budget.get("components", {}).items()]


def mode_rows(budget: dict) -> list[dict]:
    """``memory.mode_rows`` for reading: peak as '28.3 GiB', milliseconds per step as whole numbers."""
    return [{**r, "peak GiB": f"{r['peak GiB']:.1f} GiB",
             "ms per step": "" if r["ms per step"] is None else f"{r['ms per step']:.0f}"} for r in memory.mode_rows(budget)]


def plot_modes(budget: dict, limits_gb: list[float]):
    """Peak reserved memory and seconds per image of every mode that worked; each card limit a dashed line."""
    import matplotlib.pyplot as plt

    rows = [r for r in memory.mode_rows(budget) if r["works"]]
    names = [r["mode"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.4), sharey=True)
    a.barh(names, [r["peak GiB"] for r in rows], color="#4c72b0")
    for gb, color in zip(limits_gb, ("#c44e52", "#dd8452", "#8172b3", "#937860", "#da8bc3"), strict=False):
        a.axvline(gb * GB / memory.GiB, color=color, ls="--", lw=1, label=f"{gb:g} GB card ({gb * GB / memory.GiB:.1f} GiB)")
    a.set_xlabel("peak GPU memory, reserved (GiB)")
    b.barh(names, [r["s per image"] for r in rows], color="#55a868")
    b.set_xlabel("seconds per image (H100, measured)")
    a.invert_yaxis()
    return legend_outside(fig, a)


def plans(limits_gb: list[float], budget: dict, logos: int) -> tuple[dict, str]:
    """The planner for each card: ({"80 GB": plan record}, markdown with its choice and every mode it turned down).

    The records are what the notebook's metrics hold (mode, logo batch, peak GiB, s per image; or the error)."""
    records, text = {}, []
    for gb in limits_gb:
        try:
            plan = memory.plan_for_limit(int(gb * GB), budget, logos=logos)
        except memory.MemoryBudgetError as e:
            records[f"{gb} GB"] = {"mode": None, "error": str(e).splitlines()[0]}
            text.append(f"**{gb} GB:** {str(e).splitlines()[0]}")
            continue
        records[f"{gb} GB"] = {"mode": plan.mode.name, "logo batch": plan.logo_batch,
                               "peak GiB": round(plan.peak_bytes / memory.GiB, 2), "s per image": plan.seconds_per_image}
        text.append(f"**{gb} GB:** `{plan.mode.name}`, logo batch {plan.logo_batch}\n\n"
                    + "\n".join(f"- {r}" for r in plan.reasons))
    return records, "\n\n".join(text)


def cap_rows(raw: dict) -> list[dict]:
    """The capped runs on the GPU (``set_per_process_memory_fraction``): the planner's mode under each cap."""
    return [{"cap": k, "mode": c.get("mode"), "completed": c.get("completed"),
             "peak": human_bytes(c.get("peak_bytes", 0)), "s per image": c.get("s_per_image"),
             "error": c.get("error", "")} for k, c in raw.get("caps", {}).items()]


def loop_rows(rows: list[dict], cpu: bool) -> list[dict]:
    """``loops.compare_denoise_loops`` rows with the seconds marked when they come from a CPU."""
    return [{(timed(k, cpu) if k.endswith(" s") else k): v for k, v in r.items()} for r in rows]


def gpu_hot_path_text(raw: dict, budget: dict) -> str:
    """The hot path as measured on the GPU at full size; '' when the raw record has none."""
    h = raw.get("hot_path", {})
    if not h:
        return ""
    return (f"On the H100 (full size, {budget.get('request')}): {h['stock_loop_allocations_per_step']:g} allocations "
            f"per step outside the transformer in the stock loop, {h['hot_loop_allocations_per_step']:g} in the hot "
            f"path (the transformer's own: {h['hot_model_allocations_per_step']:g}); bit-identical: "
            f"{h['bit_identical']}. Copying the decoded pixels to pinned memory on a side stream, overlapped "
            f"with the next request, saved {h['saved_ms_per_request']:.0f} ms per request.")
