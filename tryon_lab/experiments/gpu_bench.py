"""Step speed on one GPU: stock bf16 eager against optimised variants of the full-size FLUX Fill model, one process.

Each variant is a ``PipelineOptions`` applied by ``configure.apply_options`` to a freshly built random-weight
model (``fullsize``); 28 steps through diffusers' ``FluxFillPipeline`` + VAE decode. Per variant: ms/step
(CUDA events, median), s/image, first call and compile time, TFLOP/s against a measured bf16 matmul, peak
memory, graphs and steady-state recompiles, final-latent rel-L2 against eager. Results are written after
every variant, so a run stopped at its budget keeps what it measured.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..attention import FA3
from ..compiling import count_recompiles, reset_compiled
from ..configure import PipelineOptions, apply_options
from ..metrics import rel_l2
from ..pipeline import decode
from ..quant import weight_bytes
from ..timers import DeadlinePassed, deadline, measure, peak_memory_bytes
from . import fullsize, step_profile


@dataclass
class Recipe:
    """One variant: its options, a cost estimate in seconds on an H200, and how it is timed."""

    options: PipelineOptions
    est_s: float
    quick: bool = False  # one short image: per-step numbers only
    stock: bool = False  # text encoders resident too (the stock pipeline's memory)
    inductor: dict = field(default_factory=dict)  # torch._inductor.config overrides for this variant
    extra: str | None = None  # a lever that is not an option (``peers_gpu``): "static_fp8" or "flux_fast_vae"
    cache: str | None = None  # per image with a step cache replaying the run's schedule: "teacache1" or "cache_dit"


FP8_FUSED = dict(fp8="fp8_dynamic_row", fuse_qkv=True)
# the best step's options (static FP8 comes as the recipe's extra): fused QKV, regional compile, step graph, FA3
BEST = PipelineOptions(compile="regional", fuse_qkv=True, step_graph=True, attention=FA3)
BEST_SIGMOID_GELU = replace(BEST, sigmoid_gelu=True)
FLUX_FAST_INDUCTOR = {"conv_1x1_as_mm": True, "epilogue_fusion": False, "coordinate_descent_tuning": True,
                      "coordinate_descent_check_all_directions": True}
RECIPES = {
    "eager": Recipe(PipelineOptions(), 35, stock=True),
    "regional": Recipe(PipelineOptions(compile="regional"), 45),
    "full": Recipe(PipelineOptions(compile="full"), 140),
    "fp8_row_eager": Recipe(PipelineOptions(fp8="fp8_dynamic_row"), 25, quick=True),
    "fp8_row_fused_regional": Recipe(PipelineOptions(compile="regional", **FP8_FUSED), 60),
    "fp8_row_fused_regional_cudagraphs": Recipe(PipelineOptions(compile="regional", compile_mode="reduce-overhead",
                                                                **FP8_FUSED), 120),
    "fp8_row_fused_full": Recipe(PipelineOptions(compile="full", **FP8_FUSED), 150),
    "fp8_row_fused_full_cudagraphs": Recipe(PipelineOptions(compile="full", compile_mode="reduce-overhead",
                                                            **FP8_FUSED), 180),
    # the whole transformer call as one CUDA graph around regional compile (step_graph.py): no launches per block
    "fp8_row_fused_regional_step_graph": Recipe(PipelineOptions(compile="regional", step_graph=True, **FP8_FUSED), 70),
    "fp8_static_fused_regional_step_graph": Recipe(PipelineOptions(compile="regional", fuse_qkv=True, step_graph=True),
                                                   80, extra="static_fp8"),
    "fp8_row_fused_regional_tuned": Recipe(PipelineOptions(compile="regional", **FP8_FUSED), 200,
                                           inductor=FLUX_FAST_INDUCTOR),
    # static per-tensor activation scales, calibrated once (no amax pass per call)
    "fp8_static_fused_regional": Recipe(PipelineOptions(compile="regional", fuse_qkv=True), 70, extra="static_fp8"),
    # the same with FlashAttention-3's bf16 kernels in place of cuDNN's (attention.py: the fa3-fwd wheel)
    "fp8_static_fused_regional_fa3": Recipe(PipelineOptions(compile="regional", fuse_qkv=True, attention=FA3), 70,
                                            extra="static_fp8"),
    "fp8_static_fused_regional_step_graph_fa3": Recipe(BEST, 80, extra="static_fp8"),
    # the best with the peer's inductor flags (coordinate-descent tuning of every fused Triton kernel)
    "fp8_static_fused_regional_step_graph_fa3_tuned": Recipe(BEST, 200, extra="static_fp8",
                                                             inductor=FLUX_FAST_INDUCTOR),
    # GELU's tanh form computed as x * sigmoid(2z): inductor's GELU + FP8-quantize kernels are bound by libdevice's
    # tanh, not by memory (block_kernels.py); with multi_kernel, inductor also tries persistent norm reductions
    "fp8_static_fused_regional_step_graph_fa3_sigmoid_gelu": Recipe(BEST_SIGMOID_GELU, 80, extra="static_fp8"),
    "fp8_static_fused_regional_step_graph_fa3_sigmoid_gelu_multi_kernel": Recipe(
        BEST_SIGMOID_GELU, 90, extra="static_fp8", inductor={"triton.multi_kernel": 1}),
    "fp8_static_fused_regional_step_graph_fa3_sigmoid_gelu_tuned": Recipe(
        BEST_SIGMOID_GELU, 200, extra="static_fp8", inductor=FLUX_FAST_INDUCTOR),
    # the published flux-fast recipe from stock libraries: whole-model max-autotune with its inductor flags and
    # CUDA graphs, fused QKV, FP8 per-row on the transformer and the VAE (FA3 is not available here)
    "flux_fast_peer": Recipe(PipelineOptions(compile="full", compile_mode="max-autotune", compile_exact_casts=False,
                                             **FP8_FUSED), 330, inductor=FLUX_FAST_INDUCTOR, extra="flux_fast_vae"),
    # the same with the GEMMs left to cuBLAS: the recipe's autotuning spent ~113 s per FP8 GEMM shape on the H200 (106
    # candidates) and picked cuBLAS ``_scaled_mm`` for every shape it finished; fused kernels keep coordinate descent.
    # Still compiling (the VAE) after ~540 s on the H200 with a cold inductor cache: give it a call of its own, and
    # a second call on the same machine reuses the first one's inductor and autotune caches
    "flux_fast_peer_aten_gemm": Recipe(PipelineOptions(compile="full", compile_mode="max-autotune",
                                                       compile_exact_casts=False, **FP8_FUSED), 500,
                                       inductor={**FLUX_FAST_INDUCTOR, "max_autotune_gemm_backends": "ATEN"},
                                       extra="flux_fast_vae"),
    # its transformer half alone (the VAE left stock): the per-step row, in a call that a VAE autotune cannot outrun
    "flux_fast_peer_transformer": Recipe(PipelineOptions(compile="full", compile_mode="max-autotune",
                                                         compile_exact_casts=False, **FP8_FUSED), 420,
                                         inductor={**FLUX_FAST_INDUCTOR, "max_autotune_gemm_backends": "ATEN"}),
    # per image with the step cache, replaying the schedule recorded on the trained model
    "fp8_row_fused_regional_teacache1": Recipe(PipelineOptions(compile="regional", **FP8_FUSED), 50, cache="teacache1"),
    "fp8_static_fused_regional_teacache1": Recipe(PipelineOptions(compile="regional", fuse_qkv=True), 50,
                                                  extra="static_fp8", cache="teacache1"),
    "fp8_row_fused_regional_cache_dit": Recipe(PipelineOptions(compile="regional", **FP8_FUSED), 50, cache="cache_dit"),
}
MODEL = "FLUX.1 Fill shapes from the published configs, random weights: timings are real, outputs are not"
DEFAULT = "eager,fp8_row_fused_regional,fp8_row_fused_full_cudagraphs,fp8_row_fused_regional_tuned"


def for_shape(options: PipelineOptions, s: fullsize.Shape) -> PipelineOptions:
    """A recipe's options on this shape's device and dtype (the CPU smoke run compiles with aot_eager: no C++)."""
    cpu = s.device != "cuda"
    fp8 = "fp8_weight_only" if cpu and options.fp8.startswith("fp8_dynamic") else options.fp8  # no FP8 matmuls
    return replace(options, device=s.device, dtype=s.dtype, fp8=fp8, compile_backend="aot_eager" if cpu else "inductor",
                   step_graph=options.step_graph and not cpu,  # no CUDA graphs on the CPU
                   attention="native" if cpu else options.attention)  # nor FA3


def free() -> None:
    reset_compiled()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_image(fill, s: fullsize.Shape, x: dict, steps: int) -> dict:
    """One image: Fill denoising (a CUDA event at every step) + VAE decode; seconds, per-step seconds, latents, and
    ``phases``: until the first step ends (preparation, the VAE encode of the masked image, step 1), after the last
    step until ``fill`` returns, and the decode."""
    cuda = s.device == "cuda"
    marks: list = []

    def mark(_p=None, _i=None, _t=None, kw=None):
        if cuda:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        else:
            marks.append(time.perf_counter())
        return kw

    with measure(s.device) as m:
        mark()
        lat = fill(**x, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0),
                   callback_on_step_end=mark).images
        mark()
        decode(fill, lat, s.height, s.width)
        mark()
    seconds = (lambda a, b: a.elapsed_time(b) / 1e3) if cuda else (lambda a, b: b - a)
    gaps = [seconds(a, b) for a, b in zip(marks, marks[1:], strict=False)]
    phases = {"until_first_step_end_s": gaps[0], "after_last_step_s": gaps[-2], "decode_s": gaps[-1]}
    return {"seconds": m["seconds"], "per_step": gaps[1:-2], "phases": phases, "latents": lat.float().cpu()}


def matmul_ceiling(s: fullsize.Shape) -> dict:
    """Measured dense matmul rate in the model dtype: the roof that TFLOP/s per step is read against."""
    n = 8192 if s.device == "cuda" else 512
    a = torch.randn(n, n, device=s.device, dtype=s.torch_dtype)
    b = torch.randn(n, n, device=s.device, dtype=s.torch_dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(3):
        with measure(s.device) as m:
            for _ in range(10):
                a @ b
        times.append(m["seconds"] / 10)
    sec = statistics.median(times)
    return {"n": n, "seconds": sec, "tflops": 2 * n**3 / sec / 1e12}


def configure(pipe, r: Recipe, opts: PipelineOptions, s: fullsize.Shape, x: dict, schedule: list[bool] | None) -> dict:
    """``apply_options`` plus the recipe's lever or step cache that is not an option; returns what they report."""
    from . import peers_gpu

    report: dict = {}
    if r.extra == "static_fp8":  # observers need the uncompiled, ungraphed model; compile and graph after converting
        apply_options(pipe, replace(opts, compile="none", step_graph=False))
        report = peers_gpu.static_fp8(pipe, lambda: run_image(pipe.fill, s, x, 2))
        from ..compiling import compile_transformer

        compile_transformer(pipe.transformer, opts.compile, opts.compile_backend)
        if opts.step_graph:
            from ..step_graph import apply_step_graph

            apply_step_graph(pipe.transformer)
    else:
        apply_options(pipe, opts)
    if r.extra == "flux_fast_vae":
        report = peers_gpu.flux_fast_vae(pipe, gpu=s.device == "cuda")
    if r.cache and schedule is None:
        raise ValueError("a step-cache row needs a schedule (bench_gpu.py --schedule RESULTS_JSON)")
    if r.cache == "teacache1":
        from ..teacache import TeaCacheConfig, apply_teacache

        apply_teacache(pipe.transformer, TeaCacheConfig(schedule=tuple(schedule), num_inference_steps=len(schedule),
                                                        order=1))
        return {**report, "computed": int(sum(schedule))}
    if r.cache == "cache_dit":
        return {**report, **peers_gpu.cache_dit(pipe, schedule, len(schedule))}
    return report


def run_recipe(name: str, r: Recipe, s: fullsize.Shape, x: dict, steps: int, quick_steps: int,
               reference: torch.Tensor | None, schedule: list[bool] | None = None,
               phase: dict | None = None) -> tuple[dict, torch.Tensor | None]:
    """Build, apply the variant's options, time a first and a steady image; returns the row and the latents.
    ``phase["now"]`` names the part under way (where a variant stopped by its deadline was)."""
    phase = {} if phase is None else phase
    phase["now"] = "build"
    free()
    t0 = time.perf_counter()
    pipe = fullsize.slim_pipeline(s)
    encoders = fullsize.build_text_encoders(s) if r.stock else []
    opts = for_shape(r.options, s)
    row: dict = {"variant": name, "options": {k: v for k, v in asdict(opts).items() if v not in (None, (), False)},
                 "status": "ok", "text_encoder_bytes": sum(weight_bytes(e) for e in encoders)}
    import torch._inductor.config as inductor_config

    saved = {k: getattr(inductor_config, k) for k in r.inductor}
    try:
        for k, v in r.inductor.items():
            setattr(inductor_config, k, v)
        phase["now"] = "configure"
        row.update(configure(pipe, r, opts, s, x, schedule))
        phase["now"] = "first image (compiles)"
        row["build_s"] = time.perf_counter() - t0
        compiled = opts.compile != "none"
        n = quick_steps if r.quick else steps
        with count_recompiles() as g1:
            first = run_image(pipe.fill, s, x, n)
        row.update(first_image_s=first["seconds"], graphs_first=g1["graphs"], steps=n)
        timed = first
        if not r.quick:
            phase["now"] = "steady image"
            with count_recompiles(strict=compiled and opts.compile_mode is None) as g2:
                timed = run_image(pipe.fill, s, x, n)
            row.update(image_s=timed["seconds"], recompiles_steady=g2["graphs"],
                       compile_s=max(0.0, first["seconds"] - timed["seconds"]) if compiled else 0.0)
            if reference is not None and not r.cache:  # a cache's error means something on trained weights only
                row["latent_rel_l2_vs_eager"] = rel_l2(timed["latents"], reference)
    finally:
        for k, v in saved.items():
            setattr(inductor_config, k, v)
    per_step = (timed["per_step"][2:] if r.quick else []) or timed["per_step"]  # quick: drop warm-up steps
    if r.cache:  # skipped steps make a per-step median meaningless: the row is per image
        row["cache"] = r.cache
    else:
        row["ms_per_step"] = 1e3 * statistics.median(per_step)
        row["tflops"] = s.flops_per_step() / (row["ms_per_step"] / 1e3) / 1e12
    row["peak_bytes"] = peak_memory_bytes(s.device)
    latents = timed["latents"] if not r.quick else None
    del pipe, encoders
    return row, latents


@torch.no_grad()  # inference only; restores the caller's grad mode on return
def run(names: list[str], s: fullsize.Shape, steps: int = 28, quick_steps: int = 8, budget_s: float = 540,
        on_row=None, schedule: list[bool] | None = None) -> dict:
    """Every named variant in this process, most telling first; a variant that would not fit ``budget_s`` is
    skipped with the reason. ``on_row(results)`` is called after each variant (write results as you go)."""
    start = time.perf_counter()
    res: dict = {"shape": f"{s.describe()}, {steps} steps", "model": MODEL, "matmul": matmul_ceiling(s),
                 "variants": {}}
    x = fullsize.diptych_inputs(s)
    reference = None
    for name in names:
        if name not in RECIPES:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(RECIPES)}")
        est = RECIPES[name].est_s if s.device == "cuda" else 0.0
        left = budget_s - (time.perf_counter() - start)
        if est > left or left <= 15:  # 15 s kept to write the results
            res["variants"][name] = {"variant": name, "status": "skipped",
                                     "reason": f"needs ~{est:.0f} s, {left:.0f} s left of the budget"}
            continue
        print(f"{name} ({time.perf_counter() - start:.0f} s elapsed, ~{est:.0f} s)...", flush=True)
        phase: dict = {}
        try:  # stopped when the budget is spent, so an overlong compile is a measured row, not a lost call
            with deadline(left - 15):
                row, latents = run_recipe(name, RECIPES[name], s, x, steps, quick_steps, reference, schedule, phase)
            if name == "eager":
                reference = latents
        except DeadlinePassed as e:
            row = {"variant": name, "status": "timed out", "reason": f"{e} of the budget, in: {phase.get('now')}"}
            free()
        except Exception as e:  # one broken variant must not lose the others' numbers
            traceback.print_exc()
            row = {"variant": name, "status": "failed", "reason": f"{type(e).__name__}: {e}"[:400]}
            free()
        res["variants"][name] = row
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                               if k not in ("options",))[:500], flush=True)
        if on_row:
            on_row(res)
    return res


def table(res: dict) -> list[dict]:
    """Rows for the markdown table (ms/step, speed-up against eager, memory, error)."""
    v = res["variants"]
    eager = v.get("eager", {}).get("ms_per_step")
    ceiling = res.get("matmul", {}).get("tflops")
    eager_image = v.get("eager", {}).get("image_s")
    return [{"variant": r["variant"], "status": r["status"], "ms/step": r.get("ms_per_step", ""),
             "vs eager": eager / r["ms_per_step"] if eager and r.get("ms_per_step") else "",
             "s/image": r.get("image_s", ""),
             "image vs eager": eager_image / r["image_s"] if eager_image and r.get("image_s") else "",
             "first call s": r.get("first_image_s", ""),
             "compile s": r.get("compile_s", ""), "% of bf16 matmul": 100 * r["tflops"] / ceiling
             if ceiling and "tflops" in r else "", "peak GiB": r["peak_bytes"] / 2**30 if "peak_bytes" in r else "",
             "recompiles": r.get("recompiles_steady", ""), "rel-L2 vs eager": r.get("latent_rel_l2_vs_eager", ""),
             "note": r.get("reason", "")[:80]} for r in v.values()]


def targets(res: dict, ms_target: float = 75.0) -> list[str]:
    v = res["variants"]
    ok = [r for r in v.values() if r.get("status") == "ok" and "ms_per_step" in r and r["variant"] != "eager"]
    if "ms_per_step" not in v.get("eager", {}) or not ok:
        return []
    e = v["eager"]["ms_per_step"]
    best = min(ok, key=lambda r: r["ms_per_step"])
    met = best["ms_per_step"] <= ms_target and e / best["ms_per_step"] >= 2.15
    out = []
    cached = [r for r in v.values() if r.get("status") == "ok" and r.get("cache") and "image_s" in r]
    if cached and "image_s" in v["eager"]:
        ei = v["eager"]["image_s"]
        out += [f"per image: {r['variant']} ({r.get('computed', '?')} of {r.get('steps', '?')} steps computed) "
                f"{r['image_s']:.3f} s vs eager {ei:.2f} s = {ei / r['image_s']:.2f}x (target >= 4x: "
                f"{'met' if ei / r['image_s'] >= 4 else 'NOT met'})" for r in cached]
    return out + [f"per step: best {best['variant']} {best['ms_per_step']:.1f} ms vs eager {e:.1f} ms = "
            f"{e / best['ms_per_step']:.2f}x (target <= {ms_target:.0f} ms and >= 2.15x: {'met' if met else 'NOT met'}); "
            f"rel-L2 vs eager {best.get('latent_rel_l2_vs_eager', float('nan')):.4f} (target <= 0.02)"]


def benchmark(out_dir: str | Path, variants: str = DEFAULT, cold: bool = True, tiny: bool = False,
              steps: int | None = None, budget_s: float = 540, work: str | Path = "/tmp/bench_gpu_work",
              schedule: list[bool] | None = None, cold_cases: list[str] | None = None, bytecode: bool = False,
              cold_rounds: int = 1) -> dict:
    """Step-speed variants and/or the cold-start cases, written to ``out_dir/bench_gpu.json`` and ``.md``
    (stamped with device, commit and date) after every variant, so a run stopped early keeps its numbers."""
    from ..plots import markdown_table
    from ..provenance import stamp, write_results
    from . import coldstart, coldstart_gpu

    s = fullsize.shape(tiny=tiny)
    if s.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --tiny on a CPU")
    steps = steps or (3 if tiny else 28)
    out = Path(out_dir)
    res: dict = {"stamp": stamp(s.device), "model": MODEL, "shape": f"{s.describe()}, {steps} steps"}

    def write(r: dict) -> None:
        md = [f"# bench_gpu ({r['stamp']['device']}, commit {r['stamp']['commit'][:12]}, {r['stamp']['date']})", "",
              f"{r['model']}; {r['shape']}", ""]
        if r.get("steps"):
            md += ["## Step speed", "", f"bf16 matmul ceiling {r['steps']['matmul']['tflops']:.0f} TFLOP/s", "",
                   markdown_table(table(r["steps"])), *[f"- {t}" for t in targets(r["steps"])], ""]
        if r.get("cold"):
            md += ["## Cold start (fresh process -> first image, seconds)", "",
                   markdown_table(coldstart.phase_rows(r["cold"]["cases"])),
                   *[f"- {t}" for t in coldstart_gpu.targets(r["cold"]["cases"])], ""]
        clean = json.loads(json.dumps(r, default=str))
        write_results(out / "bench_gpu.json", "bench_gpu", clean, "\n".join(md) + "\n")

    start = time.perf_counter()
    names = [n.strip() for n in variants.split(",") if n.strip()]
    if names:
        res["steps"] = run(names, s, steps, 3 if tiny else 8, budget_s if not cold else budget_s * 0.5,
                           on_row=lambda r: write({**res, "steps": r}), schedule=schedule)
        write(res)
    if cold:
        left = budget_s - (time.perf_counter() - start)
        res["cold"] = coldstart_gpu.gpu_run(s, Path(work), steps, budget_s=left,
                                        on_case=lambda c: write({**res, "cold": c}), names=cold_cases,
                                        bytecode=bytecode, rounds=cold_rounds)
        write(res)
    return res


def profile_step(name: str = "fp8_row_fused_regional", tiny: bool = False, steps: int = 3,
                 schedule: list[bool] | None = None) -> list[dict]:
    """Where one denoising step's GPU time goes, by kernel kind (GEMM, attention, Triton-fused rest, other),
    after warm-up; the denoising steps only (``step_profile.profile_window``). ``schedule``: the pattern a
    step-cache variant replays."""
    import torch._inductor.config as inductor_config

    r, s = RECIPES[name], fullsize.shape(tiny=tiny)
    pipe = fullsize.slim_pipeline(s)
    x = fullsize.diptych_inputs(s)
    with torch.no_grad(), inductor_config.patch(r.inductor):  # built as the variant's row builds it (its lever too)
        configure(pipe, r, for_shape(r.options, s), s, x, schedule)
        run_image(pipe.fill, s, x, 2)
        prof, _ = step_profile.profile_window(pipe.fill, x, steps, s.device == "cuda")
    return step_profile.time_by_kind(prof, s.device == "cuda", steps)
