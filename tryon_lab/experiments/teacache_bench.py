"""Per-step cost of TeaCache on the full-size FLUX Fill transformer (random weights, no downloads).

Three numbers per variant, CUDA events around each transformer call:

- plain step: no hook;
- TeaCache compute step: hook applied, threshold 0, so every step computes (overhead = this - plain:
  x_embedder, time embedding and block 0's norm1 run once more, and one host sync reads the change);
- TeaCache skipped step: embeddings, norm1, norm_out and proj_out only.

With regional compilation (default on CUDA; applied through ``configure.apply_options``) the same three are
measured again under ``torch.compiler.set_stance("fail_on_recompile")`` after warm-up, which proves the hook
causes no recompiles from step to step. ``tiny=True``: the same code on the CPU at toy size (measures nothing).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..configure import PipelineOptions, apply_options
from ..provenance import REPO_ROOT, stamp, write_results
from ..teacache import TeaCacheConfig, apply_teacache, remove_teacache, teacache_stats
from ..timers import peak_memory_bytes
from . import fullsize

OUT = REPO_ROOT / "benchmarks" / "teacache_gpu.json"


def transformer_inputs(s: fullsize.Shape, seed: int = 0) -> dict:
    """One diptych's transformer inputs: packed latents (8x VAE, 2x2 packing), the seeded text + Redux
    embeddings, and the position ids the pipeline makes."""
    cfg = s.transformer
    h, w = s.height // 16, s.width // 16
    g = torch.Generator("cpu").manual_seed(seed)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    pe, pooled = fullsize.text_embeddings(s, seed)
    return {"hidden_states": torch.randn(1, h * w, cfg["in_channels"], generator=g).to(s.device, s.torch_dtype),
            "encoder_hidden_states": pe, "pooled_projections": pooled,
            "img_ids": img_ids.reshape(-1, 3).to(s.device, s.torch_dtype),
            "txt_ids": torch.zeros(s.text_tokens, 3, device=s.device, dtype=s.torch_dtype),
            "guidance": torch.full([1], 30.0, device=s.device) if cfg.get("guidance_embeds") else None,
            "return_dict": False}


@torch.inference_mode()
def time_steps(model, inputs: dict, n: int, warmup: int, device: str) -> list[float]:
    """Milliseconds per call over one decreasing-timestep trajectory (the first ``warmup`` calls are not kept)."""
    cuda = device.startswith("cuda")
    out = []
    for i, t in enumerate(torch.linspace(1.0, 0.02, warmup + n)):
        ts = t.reshape(1).to(device, inputs["hidden_states"].dtype)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(timestep=ts, **inputs)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            model(timestep=ts, **inputs)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            out.append(ms)
    return out


def _stats(model) -> dict:
    return {k: v for k, v in teacache_stats(model).items() if k != "last_trajectory"}


def measure_variant(model, inputs: dict, device: str, iters: int, warmup: int, steps: int) -> dict:
    """Plain, TeaCache compute and TeaCache skip steps on the same model and inputs."""
    res = {"plain_ms": time_steps(model, inputs, iters, warmup, device)}
    apply_teacache(model, TeaCacheConfig(0.0, always_compute_last=0))
    try:
        res["teacache_compute_ms"] = time_steps(model, inputs, iters, warmup, device)
        res["teacache_compute_stats"] = _stats(model)
    finally:
        remove_teacache(model)
    apply_teacache(model, TeaCacheConfig(1e9, always_compute_first=1, always_compute_last=0))
    try:  # the first call of the trajectory computes, every later one reuses the residual
        res["teacache_skip_ms"] = time_steps(model, inputs, iters, max(1, warmup), device)
        res["teacache_skip_stats"] = _stats(model)
    finally:
        remove_teacache(model)
    med = {k: statistics.median(v) for k, v in res.items() if k.endswith("_ms")}
    plain, comp, skip = med["plain_ms"], med["teacache_compute_ms"], med["teacache_skip_ms"]
    res.update(median=med, overhead_ms=comp - plain, overhead_pct=100 * (comp - plain) / plain)
    res["projected_speedup"] = {  # n plain steps against (n - k) compute steps + k skipped steps
        f"skip_{int(100 * f)}pct": steps * plain / ((steps - round(f * steps)) * comp + round(f * steps) * skip)
        for f in (0.25, 0.4, 0.5, 0.6)}
    return res


def run(out: str | Path = OUT, name: str = "teacache_step_cost", tiny: bool = False, height: int = 768,
        width: int = 1024, text_tokens: int | None = None, warmup: int = 3, iters: int = 10, steps: int = 28,
        compile: str = "auto", config: str | Path = fullsize.CONFIG_FILE) -> dict:
    """Measure eager (and, with ``compile`` on, regionally compiled) step costs; write entry ``name`` to ``out``.

    ``height`` x ``width``: the diptych; ``text_tokens``: T5 + Redux tokens (default 512 + 729); ``compile``:
    ``auto`` (on CUDA), ``on`` or ``off``.
    """
    s = fullsize.shape(tiny, height=height, width=width, text_tokens=text_tokens, config=config,
                       device=None if tiny or torch.cuda.is_available() else "cpu")
    if tiny:
        warmup, iters = 1, 2
    compiled = compile == "on" or (compile == "auto" and s.device == "cuda")
    t0 = time.perf_counter()
    pipe = fullsize.slim_pipeline(s)
    model, inputs = pipe.transformer, transformer_inputs(s)
    results = {"stamp": stamp(s.device), "config": s.transformer, "dtype": s.dtype, "build_s": time.perf_counter() - t0,
               "shape": {"height": s.height, "width": s.width, "image_tokens": s.image_tokens,
                         "text_tokens": s.text_tokens},
               "params": sum(p.numel() for p in model.parameters()), "warmup": warmup, "iters": iters}
    results["eager"] = measure_variant(model, inputs, s.device, iters, warmup, steps)
    if compiled:
        t0 = time.perf_counter()
        apply_options(pipe, PipelineOptions(device=s.device, dtype=s.dtype, compile="regional",
                                            compile_backend="eager" if s.device == "cpu" else "inductor"))
        time_steps(model, inputs, 1, 2, s.device)  # compile
        results["compile_s"] = time.perf_counter() - t0
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                results["regional_compile"] = measure_variant(model, inputs, s.device, iters, warmup, steps)
            results["recompiled"] = False
        except Exception as e:  # a recompile (or another compile failure): say so, keep the eager numbers
            results["recompiled"] = f"{type(e).__name__}: {str(e)[:500]}"
    if s.device == "cuda":
        results["peak_memory_gb"] = peak_memory_bytes(s.device) / 2**30
    write_results(out, name, results)
    for variant in ("eager", "regional_compile"):
        if variant in results:
            r, m = results[variant], results[variant]["median"]
            print(f"{variant}: plain {m['plain_ms']:.1f} ms, TeaCache compute {m['teacache_compute_ms']:.1f} ms "
                  f"(+{r['overhead_pct']:.1f}%), skipped {m['teacache_skip_ms']:.1f} ms; projected {r['projected_speedup']}")
    print(f"wrote {out} [{name}]")
    return results
