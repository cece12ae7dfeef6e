"""Per-step cost of TeaCache on the full-size FLUX Fill transformer (random weights, no downloads).

Three numbers per variant, CUDA events around each transformer call:
- plain step: no hook;
- TeaCache compute step: hook applied, threshold 0, so every step computes (overhead = this - plain:
  x_embedder, time embedding and block 0's norm1 run once more, and one host sync reads the change);
- TeaCache skipped step: embeddings, norm1, norm_out and proj_out only.
With regional compilation (``compile_repeated_blocks``, default on CUDA) the same three are measured again
under ``torch.compiler.set_stance("fail_on_recompile")`` after warm-up, which proves the hook causes no
recompiles from step to step.

    python scripts/bench_teacache_gpu.py --out benchmarks/teacache_gpu.json   # on a GPU
    python scripts/bench_teacache_gpu.py --tiny --out /tmp/teacache_tiny.json  # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tryon_lab.bench import stamp, write_results  # noqa: E402
from tryon_lab.teacache import TeaCacheConfig, apply_teacache, remove_teacache, teacache_stats  # noqa: E402

TINY = dict(patch_size=1, in_channels=384, out_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=[4, 6, 6])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "benchmarks" / "flux_fill_config.json"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "teacache_gpu.json"))
    p.add_argument("--name", default="teacache_step_cost", help="entry name inside the results file")
    p.add_argument("--height", type=int, default=1024, help="diptych height in pixels")
    p.add_argument("--width", type=int, default=768, help="diptych width in pixels")
    p.add_argument("--text-tokens", type=int, default=512, help="T5 prompt tokens")
    p.add_argument("--image-tokens", type=int, default=729, help="Redux image tokens appended to the prompt")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--steps", type=int, default=28, help="trajectory length for the projected speed-ups")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="regional compile (auto: on CUDA)")
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU: checks the script, measures nothing")
    return p.parse_args(argv)


def build_transformer(cfg: dict, dtype: torch.dtype, device: str):
    """Random weights built directly in ``dtype`` on ``device`` (no fp32 copy: peak memory stays at the model size)."""
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def make_inputs(cfg: dict, height: int, width: int, text_tokens: int, dtype, device: str) -> dict:
    """One diptych's transformer inputs: packed latents (8x VAE, 2x2 packing) and the position ids the pipeline makes."""
    h, w = height // 16, width // 16
    g = torch.Generator("cpu").manual_seed(0)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    x = {"hidden_states": torch.randn(1, h * w, cfg["in_channels"], generator=g),
         "encoder_hidden_states": torch.randn(1, text_tokens, cfg["joint_attention_dim"], generator=g),
         "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], generator=g)}
    x = {k: v.to(device, dtype) for k, v in x.items()}
    x.update(img_ids=img_ids.reshape(-1, 3).to(device, dtype), txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
             guidance=torch.full([1], 30.0, device=device) if cfg.get("guidance_embeds") else None, return_dict=False)
    return x


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


def measure_variant(model, inputs: dict, args, device: str) -> dict:
    """Plain, TeaCache compute and TeaCache skip steps on the same model and inputs."""
    res = {"plain_ms": time_steps(model, inputs, args.iters, args.warmup, device)}
    apply_teacache(model, TeaCacheConfig(0.0, always_compute_last=0))
    try:
        res["teacache_compute_ms"] = time_steps(model, inputs, args.iters, args.warmup, device)
        res["teacache_compute_stats"] = {k: v for k, v in teacache_stats(model).items() if k != "last_trajectory"}
    finally:
        remove_teacache(model)
    apply_teacache(model, TeaCacheConfig(1e9, always_compute_first=1, always_compute_last=0))
    try:  # the first call of the trajectory computes, every later one reuses the residual
        res["teacache_skip_ms"] = time_steps(model, inputs, args.iters, max(1, args.warmup), device)
        res["teacache_skip_stats"] = {k: v for k, v in teacache_stats(model).items() if k != "last_trajectory"}
    finally:
        remove_teacache(model)
    med = {k: statistics.median(v) for k, v in res.items() if k.endswith("_ms")}
    plain, comp, skip = med["plain_ms"], med["teacache_compute_ms"], med["teacache_skip_ms"]
    res["median"] = med
    res["overhead_ms"] = comp - plain
    res["overhead_pct"] = 100 * (comp - plain) / plain
    res["projected_speedup"] = {  # n plain steps against (n - k) compute steps + k skipped steps
        f"skip_{int(100 * f)}pct": args.steps * plain / ((args.steps - round(f * args.steps)) * comp + round(f * args.steps) * skip)
        for f in (0.25, 0.4, 0.5, 0.6)}
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tiny:
        cfg, device, dtype = dict(TINY), "cpu", torch.float32
        args.height, args.width, args.text_tokens, args.image_tokens = 64, 64, 8, 8
        args.warmup, args.iters = 1, 2
    else:
        cfg = {k: v for k, v in json.loads(Path(args.config).read_text())["transformer"].items() if not k.startswith("_")}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    compile_ = args.compile == "on" or (args.compile == "auto" and device == "cuda")
    t0 = time.perf_counter()
    model = build_transformer(cfg, dtype, device)
    inputs = make_inputs(cfg, args.height, args.width, args.text_tokens + args.image_tokens, dtype, device)
    results = {"stamp": stamp(device), "config": cfg, "dtype": str(dtype), "build_s": time.perf_counter() - t0,
               "shape": {"height": args.height, "width": args.width, "image_tokens": (args.height // 16) * (args.width // 16),
                         "text_tokens": args.text_tokens + args.image_tokens},
               "params": sum(p.numel() for p in model.parameters()), "warmup": args.warmup, "iters": args.iters}
    results["eager"] = measure_variant(model, inputs, args, device)
    if compile_:
        t0 = time.perf_counter()
        model.compile_repeated_blocks(fullgraph=True, backend="eager" if device == "cpu" else "inductor")
        time_steps(model, inputs, 1, 2, device)  # compile
        results["compile_s"] = time.perf_counter() - t0
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                results["regional_compile"] = measure_variant(model, inputs, args, device)
            results["recompiled"] = False
        except Exception as e:  # a recompile (or another compile failure): say so, keep the eager numbers
            results["recompiled"] = f"{type(e).__name__}: {str(e)[:500]}"
    if device == "cuda":
        results["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    write_results(args.out, args.name, results)
    for variant in ("eager", "regional_compile"):
        if variant in results:
            r = results[variant]
            print(f"{variant}: plain {r['median']['plain_ms']:.1f} ms, TeaCache compute {r['median']['teacache_compute_ms']:.1f} ms "
                  f"(+{r['overhead_pct']:.1f}%), skipped {r['median']['teacache_skip_ms']:.1f} ms; projected {r['projected_speedup']}")
    print(f"wrote {args.out} [{args.name}]")
    return results


if __name__ == "__main__":
    main()
