"""GPU memory: diffusers' offload and VAE modes, and a planner that fits a card.

    MemoryMode      FP8 or not, which offload (none / group / model / sequential), VAE tiling and slicing
    apply_mode      puts a slim pipeline in that mode with diffusers' own mechanisms
    plan_for_limit  given a memory limit and a measured budget table, the fastest mode that fits, and why

Out-of-memory recovery (VAE-tiling retry, batch halving) is in ``oom.py``, which the pipeline imports.

The budget table is measured (``scripts/bench_memory_gpu.py`` on the GPU writes ``benchmarks/memory_budget.json``);
the planner only combines measured numbers and never offers a mode that was not measured to work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

OFFLOADS = ("none", "group", "model", "sequential")
GiB = 1024**3
BUDGET_FILE = Path(__file__).resolve().parent.parent / "benchmarks" / "memory_budget.json"


class MemoryBudgetError(RuntimeError):
    """No measured mode fits the given memory limit (the message names the smallest one), or the table has none."""


MEASURE_CMD = ("python scripts/bench_memory_gpu.py --parts budget,bf16+model-offload,bf16+group-offload,"
               "bf16+sequential-offload")


@dataclass(frozen=True)
class MemoryMode:
    fp8: bool = False  # torchao dynamic FP8 (per-row) on the transformer's block Linears
    offload: str = "none"
    vae_tiling: bool = False
    vae_slicing: bool = False

    def __post_init__(self):
        if self.offload not in OFFLOADS:
            raise ValueError(f"unknown offload {self.offload!r}; choose one of {', '.join(OFFLOADS)}.")

    @property
    def name(self) -> str:
        parts = ["fp8" if self.fp8 else "bf16"]
        if self.offload != "none":
            parts.append(f"{self.offload}-offload")
        parts += [p for p, on in (("vae-tiling", self.vae_tiling), ("vae-slicing", self.vae_slicing)) if on]
        return "+".join(parts)

    @classmethod
    def parse(cls, name: str) -> MemoryMode:
        """The inverse of ``name``: ``'fp8+model-offload+vae-tiling'`` -> MemoryMode(True, 'model', True)."""
        parts = name.split("+")
        if parts[0] not in ("bf16", "fp8"):
            raise ValueError(f"memory mode {name!r} must start with bf16 or fp8, e.g. 'fp8+vae-tiling'.")
        offload = next((p.removesuffix("-offload") for p in parts if p.endswith("-offload")), "none")
        unknown = set(parts[1:]) - {f"{o}-offload" for o in OFFLOADS} - {"vae-tiling", "vae-slicing"}
        if unknown:
            raise ValueError(f"unknown part(s) {sorted(unknown)} in memory mode {name!r}.")
        return cls(parts[0] == "fp8", offload, "vae-tiling" in parts, "vae-slicing" in parts)


def apply_mode(pipe, mode: MemoryMode, device: str | torch.device = "cuda") -> None:
    """Put a slim pipeline (loaded on the CPU when ``mode`` offloads) into ``mode``, all through diffusers.

    The Redux encoder and the cached embeddings stay on ``device`` (under 1 GB at full size): the planner's
    table counts them in every mode.
    """
    from . import quant

    fill, device = pipe.fill, torch.device(device)
    if mode.fp8:  # layer by layer on the device (torchao's FP8 kernels), before any offload moves weights away
        quant.quantize_transformer(fill.transformer, "fp8_dynamic_row", device=device)
    if mode.offload == "none":
        fill.to(device)
    elif mode.offload == "model":
        fill.enable_model_cpu_offload(device=device)
    elif mode.offload == "sequential":
        fill.enable_sequential_cpu_offload(device=device)
    elif mode.offload == "group":  # the transformer streams its layers in; the VAE stays resident
        fill.transformer.to("cpu")
        fill.transformer.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                              offload_type="leaf_level", use_stream=True)
        fill.vae.to(device)
    for on, enable, disable in ((mode.vae_tiling, fill.vae.enable_tiling, fill.vae.disable_tiling),
                                (mode.vae_slicing, fill.vae.enable_slicing, fill.vae.disable_slicing)):
        enable() if on else disable()
    pipe.redux.to(device)
    pipe.prompt_embeds = pipe.prompt_embeds.to(device)
    pipe.pooled_prompt_embeds = pipe.pooled_prompt_embeds.to(device)
    pipe.device = str(device)


# ------------------------------------------------------------------------------------------------ planner
@dataclass
class Plan:
    mode: MemoryMode
    logo_batch: int
    peak_bytes: int  # measured peak of this mode for one request
    seconds_per_image: float
    reasons: list[str] = field(default_factory=list)

    def explain(self) -> str:
        return "\n".join(self.reasons)


def load_budget(path: str | Path = BUDGET_FILE) -> dict:
    """The measured budget table; a clear error when it has not been measured yet."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no memory budget at {path}: measure one on the GPU with "
                                "`python scripts/bench_memory_gpu.py` (it writes this file).")
    return json.loads(path.read_text())


def plan_for_limit(limit_bytes: int, budget: dict, logos: int = 4, headroom: float = 0.05,
                   fp8_available: bool = True) -> Plan:
    """The fastest measured mode whose peak fits ``limit_bytes`` with ``headroom``, and the largest logo batch.

    ``budget["modes"]``: {name: {"peak_bytes", "s_per_image", "ok"}} for one request; ``budget["logo"]``:
    {"resident_bytes": per mode, "per_logo_bytes"}: a logo batch of b needs the mode's resident bytes plus
    b times the per-logo activation bytes. ``reasons`` lists every faster mode that was rejected and why.
    """
    measured = {n: m for n, m in (budget.get("modes") or {}).items()
                if isinstance(m, dict) and m.get("ok", True) and m.get("peak_bytes") is not None}
    if not measured:
        failed = sorted(n for n, m in (budget.get("modes") or {}).items() if isinstance(m, dict) and not m.get("ok", True))
        raise MemoryBudgetError(
            "the memory budget table has no measured modes" + (f" (only failed ones: {', '.join(failed)})" if failed else "")
            + f", so there is nothing to plan from. Measure them on the GPU with `{MEASURE_CMD}` (it merges into "
            f"{BUDGET_FILE.relative_to(BUDGET_FILE.parent.parent)}), or pass a table that has them.")
    usable = int(limit_bytes * (1 - headroom))
    reasons = [f"limit {limit_bytes / GiB:.1f} GiB, {headroom:.0%} kept free: {usable / GiB:.1f} GiB usable"]
    modes = sorted(((n, m) for n, m in budget["modes"].items()), key=lambda nm: nm[1].get("s_per_image", 1e9))
    for name, m in modes:
        mode = MemoryMode.parse(name)
        if not m.get("ok", True):
            reasons.append(f"{name}: skipped, it failed when measured ({m.get('error', 'error')})")
            continue
        if mode.fp8 and not fp8_available:
            reasons.append(f"{name}: skipped, FP8 matmuls need compute capability >= 8.9")
            continue
        if m.get("peak_bytes") is None:
            reasons.append(f"{name}: skipped, no measured peak")
            continue
        if m["peak_bytes"] > usable:
            reasons.append(f"{name}: needs {m['peak_bytes'] / GiB:.1f} GiB > {usable / GiB:.1f} GiB")
            continue
        batch, why = logo_batch_for(usable, budget, name, logos)
        reasons.append(f"chosen {name}: {m['peak_bytes'] / GiB:.1f} GiB peak, {m['s_per_image']:.2f} s per image "
                       f"(the fastest that fits); logo batch {batch} of {logos} ({why})")
        return Plan(mode, batch, m["peak_bytes"], m["s_per_image"], reasons)
    smallest = min(measured.values(), key=lambda m: m["peak_bytes"])
    raise MemoryBudgetError(f"no measured mode fits {limit_bytes / GiB:.1f} GiB; the smallest needs "
                            f"{smallest['peak_bytes'] / GiB:.1f} GiB.\n" + "\n".join(reasons))


def logo_batch_for(usable: int, budget: dict, mode_name: str, logos: int) -> tuple[int, str]:
    """Largest logo batch (at least 1) whose resident bytes + per-logo bytes fit ``usable``, and how it was found.

    Resident bytes: measured for the mode when the table has them, else the mode's measured peak allocation
    minus one request's measured activations (offload modes hold little besides the layers in flight).
    """
    logo = budget.get("logo", {})
    per_logo = logo.get("per_logo_bytes")
    resident = logo.get("resident_bytes", {}).get(mode_name)
    source = "measured resident"
    if resident is None:
        peak = budget["modes"][mode_name].get("peak_allocated_bytes")
        act = budget.get("components", {}).get("activations, one request", {}).get("bytes")
        resident = None if peak is None or act is None else peak - act
        source = "resident = peak minus one request's activations"
    if not logos:
        return 0, "no logos"
    if resident is None or not per_logo:
        return 1, "no logo measurements for this mode: one at a time"
    fits = int((usable - resident) // per_logo)
    return max(1, min(logos, fits)), f"{source} {resident / GiB:.1f} GiB + {per_logo / GiB:.2f} GiB per logo"


def mode_rows(budget: dict) -> list[dict]:
    """The measured modes as table rows, fastest first (GiB, seconds per image, ms per step)."""
    rows = []
    for name, m in sorted(budget["modes"].items(), key=lambda nm: nm[1].get("s_per_image") or 1e9):
        rows.append({"mode": name, "works": m.get("ok", True), "peak GiB": round(m.get("peak_bytes", 0) / GiB, 2),
                     "s per image": m.get("s_per_image"), "ms per step": m.get("ms_per_step")})
    return rows


def component_rows(budget: dict) -> list[dict]:
    """The measured component budget as table rows (GiB)."""
    return [{"component": k, "GiB": round(v["bytes"] / GiB, 3)} for k, v in budget.get("components", {}).items()]
