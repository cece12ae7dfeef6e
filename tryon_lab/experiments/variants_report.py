"""Notebook 03's variant list, tables and figures around ``variants`` (equivalence), ``lora_swap`` and ``coldstart``."""

from __future__ import annotations

import tempfile

from ..notebook import CPU_TIMING, human_bytes, legend_outside, timed
from ..runs import save_image
from . import coldstart
from .variants import VariantRun

CHEAP_CPU_BACKEND = "aot_eager"  # inductor on a CPU spends tens of seconds in gcc per variant


def variant_list(variants: list[str], all_variants: bool = False) -> list[str]:
    """``variants`` as given, or (``all_variants``) every FP8 mode x compile mode, each with and without LoRA."""
    if not all_variants:
        return list(variants)
    return [v + lo for q in ("", "fp8_weight_only", "fp8_dynamic_row") for c in ("", "regional", "full")
            if (v := "+".join(x for x in (q, c) if x)) for lo in ("", "+lora")]


def backends(device: str, backend: str = "auto", swap_backend: str = "auto") -> tuple[str, str]:
    """``"auto"`` compile backends made concrete: inductor on a GPU, aot_eager on the CPU."""
    cheap = "inductor" if device.startswith("cuda") else CHEAP_CPU_BACKEND
    return (cheap if backend == "auto" else backend), (cheap if swap_backend == "auto" else swap_backend)


def reference_text(dtype_name: str, device: str, backend: str) -> str:
    return (f"Reference: eager {dtype_name}" + ("" if device.startswith("cuda") else " (CPU: fp32, as bf16 is slow here)")
            + f"; compile backend {backend} unless a variant names one (`@backend`).")


def variant_rows(results: dict[str, VariantRun], cpu: bool) -> list[dict]:
    """One row per variant: status, errors against its reference, weight and peak bytes, compile and call seconds."""
    rows = []
    for r in results.values():
        x = r.row
        rows.append({"variant": x["variant"], "status": x["status"], "latent_rel_l2": x.get("latent_rel_l2", ""),
                     "image_psnr": x.get("image_psnr", ""), "image_ssim": x.get("image_ssim", ""),
                     "gt_psnr": x.get("gt_psnr", ""), "weights": human_bytes(x.get("weight_bytes")),
                     "peak memory": human_bytes(x.get("peak_mem_bytes")) + (f" ({x['mem_kind']})" if x.get("mem_kind") else ""),
                     timed("compile s", cpu): x.get("compile_s", ""), timed("steady s", cpu): x.get("steady_s", ""),
                     "graphs (first call)": x.get("graphs_first", ""), "recompiles (steady)": x.get("recompiles_steady", "")})
    return rows


def verdicts(results: dict[str, VariantRun]) -> str:
    """Markdown list: each variant's verdict, or why it did not run."""
    lines = [r.row.get("verdict") or f"{r.row['variant']}: {r.row['status']} {r.row['reason']}".rstrip()
             for r in results.values()]
    return "\n".join(f"- {line}" for line in lines)


def plot_step_errors(results: dict[str, VariantRun]):
    """Relative L2 of the latents against the reference after every denoising step, one line per variant
    (an error of exactly 0 is drawn at 1e-12 and says so in the legend)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, r in results.items():
        if r.step_rel_l2:
            label = f"{name} (identical)" if not any(r.step_rel_l2) else name
            ax.semilogy(range(1, len(r.step_rel_l2) + 1), [max(e, 1e-12) for e in r.step_rel_l2], "o-", label=label)
    ax.set(xlabel="denoising step", ylabel="latent rel-L2 vs reference (log)", title="per-step error")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return legend_outside(fig)


def fp8_blocks(results: dict[str, VariantRun]) -> dict[str, list[dict]]:
    """Per FP8 variant: every block's output rel-L2 on one identical transformer call."""
    return {n: r.blocks for n, r in results.items() if r.blocks}


def block_rows(blocks: dict[str, list[dict]]) -> list[dict]:
    """One row per block, one column per FP8 variant."""
    if not blocks:
        return []
    names = list(blocks)
    return [{"block": b["block"], **{n: blocks[n][i]["rel_l2"] for n in names}} for i, b in enumerate(blocks[names[0]])]


def image_panels(results: dict[str, VariantRun], target) -> tuple[list, list[str]]:
    """The ground truth, then the first image of every variant that ran."""
    shown = {n: r for n, r in results.items() if r.images}
    return [target] + [r.images[0] for r in shown.values()], ["ground truth", *shown]


def swap_text(swap: dict, cpu: bool) -> str:
    """The hotswap in one sentence: seconds (marked on the CPU), recompiles, and both ways giving the same latents."""
    text = (f"Hotswap: {swap['swap_s']:.3f} s, then a call of {swap['call_after_swap_s']:.2f} s with "
            f"**{swap['recompiles_after_swap']} recompiles**; B changed the latents by rel-L2 "
            f"{swap['swap_changed_rel_l2']:.3g} against A.")
    if "reload_recompile_s" in swap:
        text += (f" Unload + load + recompile instead: {swap['reload_recompile_s']:.2f} s, "
                 f"{swap['graphs_reload']} graphs; latents vs the hotswap: rel-L2 {swap['swap_vs_reload_rel_l2']:.2e}.")
    return text + (f" (Seconds: {CPU_TIMING}.)" if cpu else "")


def cold_start(model_dir, variant: str | None, dtype: str, device: str, steps: int, seed: int, backend: str) -> list[dict]:
    """Notebook 03's cold-start cases (``coldstart.variant_cases``) in fresh processes, in a temporary folder;
    one row per case with every phase; [] when ``variant`` is None."""
    if not variant:
        return []
    from .variants import parse_variant

    v = parse_variant(variant, backend)
    options = {"fp8": v.quant, "compile": v.compile, "compile_backend": v.backend}
    with tempfile.TemporaryDirectory() as work:
        cases = coldstart.run(model_dir, coldstart.variant_cases(options), work, steps, seed=seed,
                              options={"device": device, "dtype": dtype})
    return coldstart.phase_rows(cases)


COLD_PARTS = [*coldstart.PHASES, "other"]


def plot_cold_start(cold: list[dict], variant: str, cpu: bool):
    """Seconds from a fresh process to its first image, stacked by phase, one bar per case."""
    from ..plots import phase_bars

    rows = [r for r in cold if "interpreter" in r]
    return phase_bars(rows, COLD_PARTS, title=f"{variant}: " + timed("seconds to the first image", cpu))


def image_name(variant: str, index: int) -> str:
    """The recorded file name of a variant's image (``regional@inductor`` -> ``regional_at_inductor_0``)."""
    return f"{variant.replace('@', '_at_').replace('+', '_')}_{index}"


def save_images(output_dir, results: dict[str, VariantRun]) -> None:
    """Every variant's images under ``image_name``."""
    for name, r in results.items():
        for i, img in enumerate(r.images):
            save_image(output_dir, image_name(name, i), img)


def _gpu_entry(results_file=None, key: str = "bench_gpu") -> dict:
    import json
    from pathlib import Path

    from ..provenance import REPO_ROOT

    path = Path(results_file or REPO_ROOT / "benchmarks" / "bench_gpu.json")
    return json.loads(path.read_text())[key]


def _where(entry: dict, stamp: dict) -> str:
    return (f"{stamp['device']}, {stamp['date']}, torch {stamp['torch']}, diffusers {stamp['diffusers']}; "
            f"{entry['model']}; {entry['shape']}")


GPU_COLD_KEY = "bench_gpu_cold_serving"  # run 16 in benchmarks/bench_gpu.json: each lever alone, then together
GPU_COLD_STATIC_KEY = "bench_gpu_cold_static_serving"  # run 17: the serving process with static FP8 scales
GPU_COLD_FA3_KEY = "bench_gpu_cold_fa3"  # run 19: the same with FlashAttention-3, beside cuDNN
GPU_STEPS_FA3_KEY = "bench_gpu_fa3_steps"  # run 18: the best variants with cuDNN and with FlashAttention-3
GPU_COLD_NO_TRANSFORMERS_KEY = "bench_gpu_cold_no_transformers"  # run 20: + hot path; + Redux in its own process
GPU_PEER_KEY = "bench_gpu_peer_transformer"  # run 22: the flux-fast peer recipe beside eager and our best
GPU_TUNED_KEY = "bench_gpu_tuned_steps"  # run 23: our best with the peer's inductor flags
GPU_EARLY_READS_KEY = "probe_early_reads"  # run 24: the FP8 read started at torch's import, probed alone
GPU_COLD_EARLY_READS_KEY = "bench_gpu_cold_early_reads"  # run 25: the same lever as a cold-start case
GPU_COLD_FORKED_REDUX_KEY = "bench_gpu_cold_forked_redux"  # run 31: the best step served; Redux forked after torch
GPU_SIGMOID_GELU_KEY = "bench_gpu_sigmoid_gelu_steps"  # run 28: GELU as a sigmoid (+ multi_kernel) beside the best
GPU_SIGMOID_GELU_TUNED_KEY = "bench_gpu_sigmoid_gelu_tuned_steps"  # run 29: the same + coordinate descent
BLOCK_KERNELS_FILE = "probe_block_kernels.json"  # runs 26, 27 and 30: inductor's fused kernels in the best step's blocks


def gpu_cold_start(results_file=None, key: str = GPU_COLD_KEY) -> tuple[list[dict], list[str], str]:
    """The measured H200 cold start, phase by phase (``benchmarks/bench_gpu.json``, written by
    ``scripts/bench_gpu.py``; ``key``: which run): rows, the phase names in order, and a line saying where they
    were measured."""
    from .coldstart_gpu import GPU_CASES, base_case

    entry = _gpu_entry(results_file, key)
    rows = [r for r in coldstart.phase_rows(entry["cold"]["cases"]) if "interpreter" in r]
    order = list(GPU_CASES)  # the results file keeps cases sorted by name: show them in the order they ran,
    rows.sort(key=lambda r: (order.index(base) if (base := base_case(r["case"])) in order else len(order),
                             r["case"]))  # each case's later rounds right after it
    return rows, [*coldstart.PHASES, "other"], _where(entry, entry.get("cold_stamp", entry["stamp"]))


STEP_TOLERANCE = 0.02  # final-latent rel-L2 against bf16 eager for a variant to count as equivalent


def gpu_steps(results_file=None, key: str = "bench_gpu", entry: dict | None = None) -> tuple[list[dict], str]:
    """The measured H200 step-speed and per-image rows of one run (``key``: its entry in the results file) with a
    verdict each: equivalent to bf16 eager within ``STEP_TOLERANCE`` or not; step-cache rows are judged on the
    trained model (notebook 02), not here. ``entry``: that run's entry, already read."""
    from .gpu_bench import table  # the benchmark's own rows (speed-ups against its eager), one verdict added

    entry = entry or _gpu_entry(results_file, key)
    v = entry["steps"]["variants"]
    rows = []
    named = {"variants": {n: {"variant": n, **r} for n, r in v.items()}}  # a row's name is its key
    for (name, r), row in zip(v.items(), table(named), strict=True):
        if r.get("status") != "ok":
            verdict = f"{r.get('status')}: {r.get('reason', '')[:90]}"
        elif r.get("cache"):
            verdict = "per image; its quality is measured on the trained model (notebook 02)"
        elif name == "eager":
            verdict = "reference"
        else:
            err = r["latent_rel_l2_vs_eager"]
            verdict = (f"equivalent (rel-L2 {err:.4f} <= {STEP_TOLERANCE})" if err <= STEP_TOLERANCE
                       else f"NOT equivalent (rel-L2 {err:.4f} > {STEP_TOLERANCE})")
        rows.append({"variant": name, **{k: row[k] for k in ("ms/step", "vs eager", "s/image", "image vs eager",
                                                             "peak GiB")}, "verdict": verdict})
    rows.sort(key=lambda r: (r["variant"] != "eager", r["ms/step"] == "", r["ms/step"] or 0.0))
    return rows, _where(entry, entry["stamp"])


PER_IMAGE_RUNS = ("bench_gpu_per_image", "bench_gpu_per_image_static")  # each beside its own stock eager


PROBE_GAIN = 0.97  # a probed kernel is a lever when it takes at most this share of the one it would replace
PROBE_TOLERANCE = 0.05  # ... and its output stays within this rel-L2 (attention: of fp32; GEMM: of the two GEMMs)


def _probe_verdict(ms: float, against_ms: float, err: float) -> str:
    faster, close = ms <= PROBE_GAIN * against_ms, err <= PROBE_TOLERANCE
    return ("a lever" if faster and close else "faster but off" if faster else
            f"{ms / against_ms:.2f}x the time{', and off' if not close else ''}: not a lever")


def gpu_probes(results_file=None) -> list[dict]:
    """The step levers probed alone on the H200, one row each: the kernel against the one the best variant runs
    (ms a call) with a verdict (FP8 attention through FlexAttention, FlashAttention-3 in bf16 and FP8; one fused
    input GEMM per single block)."""
    att, gemm = _gpu_entry(results_file, "attention_fp8_probe"), _gpu_entry(results_file, "single_block_gemm_probe")
    k, cudnn, rows = att["kernels"], att["kernels"]["cudnn_bf16"]["ms"], []
    labels = {"flex_fp8_": "FP8 attention, FlexAttention", "fa3_": "attention, FlashAttention-3"}
    for name in (n for n, r in k.items() if n.startswith(tuple(labels)) and r.get("status") == "ok"):
        prefix = next(p for p in labels if name.startswith(p))
        rows.append({"lever": f"{labels[prefix]} ({name.removeprefix(prefix).replace('_', ' ')})",
                     "ms": k[name]["ms"], "against": f"cuDNN bf16 {cudnn:.3g} ms", "rel-L2": k[name]["rel_l2_vs_fp32"],
                     "verdict": _probe_verdict(k[name]["ms"], cudnn, k[name]["rel_l2_vs_fp32"]),
                     "date": att["stamp"]["date"]})
    for form, r in gemm["forms"].items():
        rows.append({"lever": f"one input GEMM for a single-stream block ({form})", "ms": r["fused_ms"],
                     "against": f"two GEMMs {r['separate_ms']:.3g} ms", "rel-L2": r["fused_rel_l2_vs_separate"],
                     "verdict": _probe_verdict(r["fused_ms"], r["separate_ms"], r["fused_rel_l2_vs_separate"]),
                     "date": gemm["stamp"]["date"]})
    return rows


def gpu_per_image(results_file=None) -> tuple[list[dict], list[str]]:
    """The step-cache rows against each run's own eager image time: our cache and cache-dit's in one run, static
    FP8 with our cache in another; returns rows (with the run's time) and where each run was measured."""
    rows, where = [], []
    for key in PER_IMAGE_RUNS:
        entry = _gpu_entry(results_file, key)
        steps, measured = gpu_steps(entry=entry)
        rows += [{"run": entry["stamp"]["date"], **r} for r in steps if r["variant"] == "eager" or "cache" in r["variant"]]
        where.append(measured)
    return rows, where


def gpu_early_reads(results_file=None) -> tuple[list[dict], str]:
    """Run 24's probe, one row per fresh process: seconds from its start to torch imported, the imports after
    torch, and the wait for the FP8-sized read after them (the read started after the imports, or at torch's
    import); and where it ran."""
    entry = _gpu_entry(results_file, GPU_EARLY_READS_KEY)
    rows = [{"process": f"read {'at torch' if mode == 'early' else 'after imports'} ({i + 1})", "torch": r["torch"],
             "CUDA context and imports": r["imports"] - r["torch"], "wait for the read": r["waited_s"],
             "read itself": r["read_s"]}
            for mode in ("after", "early") for i, r in enumerate(entry["runs"][mode]) if r["status"] == "ok"]
    st = entry["stamp"]
    return rows, f"{st['device']}, {st['date']}, torch {st['torch']}; a {entry['bytes'] / 1e9:.1f} GB file; {entry['note']}"


def gpu_block_kernels(results_file=None) -> tuple[list[dict], str]:
    """Runs 26, 27 and 30 of the probe, one row per knob set: the Triton time of one call of each block class, split into the
    GELU kernels, the norm kernels (layer norm, RMS norm, with what inductor fused into them) and the rest, and the
    output's rel-L2 against the same quantized blocks eager; and where it ran."""
    import json
    from pathlib import Path

    from ..provenance import REPO_ROOT

    path = Path(results_file or REPO_ROOT / "benchmarks" / BLOCK_KERNELS_FILE)
    rows, stamps = [], []
    for run, entry in sorted(json.loads(path.read_text()).items(), key=lambda kv: kv[1]["stamp"]["date"]):
        stamps.append(entry["stamp"]["date"])
        for knob, r in entry["rows"].items():
            if r["status"] != "ok":
                continue
            ms = {"GELU kernels": 0.0, "norm kernels": 0.0, "other Triton": 0.0}
            for name, k in r["kernels"].items():
                if name.startswith("triton_"):
                    part = ("GELU kernels" if "gelu" in name or "sigmoid" in name
                            else "norm kernels" if "norm" in name else "other Triton")
                    ms[part] += k["ms_per_call"]
            rows.append({"knob set": f"{knob} ({run.removeprefix('probe_block_kernels_')} run)", **ms,
                         "Triton ms / call": sum(ms.values()), "rel-L2 vs eager": r["rel_l2_vs_eager"]})
    st = entry["stamp"]
    return rows, (f"{st['device']}, {', '.join(stamps)}, torch {st['torch']}; one block of each kind at full width, "
                  "static FP8, fused QKV, FA3; random weights")
