"""GPU memory benchmark: the VRAM budget table, each memory mode's peak and time, capped runs, the hot path.

Full-size FLUX Fill + Redux shapes (``benchmarks/flux_fill_config.json``) with random bf16 weights, one
try-on of a 768x1024 person (a 1536x1024 diptych: 6144 image + 1241 text/Redux tokens), ``--steps`` steps.
Every part runs in its own process (a clean CUDA context, clean peak counters, its own allocator setting):

    budget      component bytes, one request's activations, VAE decode plain/tiled, a logo batch of 1..5,
                the bf16 / bf16+vae-tiling / fp8 / fp8+vae-tiling modes, the hot path (allocations per step
                before/after, bit-identity, the time the asynchronous output copy saves per request)
    MODE        one offload mode (e.g. bf16+model-offload): peak and time per image
    expandable  the default mode under PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    cap:GB      the planner's choice for a GB limit (torch.cuda.set_per_process_memory_fraction), one try-on

Peaks are the caching allocator's peak *reserved* bytes (what a per-process cap limits), with peak
allocated beside them. Results merge into ``--budget`` (benchmarks/memory_budget.json, the planner's table)
and ``benchmarks/results.json`` (key memory_gpu), with device, commit and date.

    python scripts/bench_memory_gpu.py --parts budget,bf16+model-offload,expandable
    python scripts/bench_memory_gpu.py --parts bf16+group-offload,bf16+sequential-offload,cap:24,cap:16
    python scripts/bench_memory_gpu.py --tiny --parts budget        # CPU smoke run of the code paths
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GB = 1e9


# ------------------------------------------------------------------------------------------- building
def build(a, device: str):
    """A slim pipeline with random weights: Fill transformer + VAE + scheduler, SigLIP + Redux embedder."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxPriorReduxPipeline,
        FluxTransformer2DModel,
    )
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from scripts.bench_gpu import default_dtype
    from tryon_lab.loading import SlimPipeline

    cfg = json.loads(Path(a.config).read_text())
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    enc = strip(cfg["redux"]["image_encoder"])
    tokens = enc.pop("image_tokens")
    sizes = {}
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        parts = {}
        for name, make in (
                ("transformer", lambda: FluxTransformer2DModel(**strip(cfg["transformer"]))),
                ("vae", lambda: AutoencoderKL(**strip(cfg["vae"]))),
                ("redux image encoder", lambda: SiglipVisionModel(SiglipVisionConfig(**enc))),
                ("redux embedder", lambda: ReduxImageEncoder(**strip(cfg["redux"]["image_embedder"])))):
            before = allocated()
            parts[name] = make().eval().requires_grad_(False)
            sizes[name] = allocated() - before
        g = torch.Generator(device).manual_seed(0)
        before = allocated()
        pe = torch.randn(1, cfg["text_embeddings"]["t5_prompt_embeds"][1], cfg["transformer"]["joint_attention_dim"],
                         generator=g)
        pooled = torch.randn(1, cfg["transformer"]["pooled_projection_dim"], generator=g)
        sizes["cached text embeddings"] = allocated() - before
    fill = FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**strip(cfg["scheduler"])), vae=parts["vae"],
                            transformer=parts["transformer"], text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None)
    side = enc["image_size"]
    redux = FluxPriorReduxPipeline(
        image_encoder=parts["redux image encoder"], image_embedder=parts["redux embedder"],
        feature_extractor=SiglipImageProcessor(size={"height": side, "width": side}))
    assert (side // enc["patch_size"]) ** 2 == tokens
    for p in (fill, redux):
        p.set_progress_bar_config(disable=True)
    pipe = SlimPipeline(fill, redux, pe, pooled, Path("full-size-random"), device, dtype,
                        _fingerprint="random weights, seed 0")
    return pipe, sizes


def allocated() -> int:
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def reset_peak() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peaks() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"peak_bytes": 0, "peak_allocated_bytes": 0}
    torch.cuda.synchronize()
    return {"peak_bytes": torch.cuda.max_memory_reserved(), "peak_allocated_bytes": torch.cuda.max_memory_allocated()}


def request(a, seed: int = 0):
    import numpy as np
    from PIL import Image

    from tryon_lab.pipeline import TryOnRequest

    rng = np.random.default_rng(seed)
    w, h = a.width, a.height
    person = Image.fromarray(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
    garment = Image.fromarray(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
    mask = np.zeros((h, w), np.uint8)
    mask[h // 5: 4 * h // 5, w // 6: 5 * w // 6] = 255
    return TryOnRequest(person, garment, Image.fromarray(mask, "L"), seed=seed)


def timed_image(pipe, a, settings=None, seed: int = 0) -> dict:
    """One try-on after a 1-step warm-up: seconds, stage times, peaks, recoveries."""
    from tryon_lab import pipeline

    settings = settings or pipeline.TryOnSettings(steps=a.steps, progress=False)
    pipeline.tryon(pipe, request(a, seed), pipeline.TryOnSettings(steps=1, progress=False))
    reset_peak()
    t0 = time.perf_counter()
    out = pipeline.tryon(pipe, request(a, seed), settings)
    sec = time.perf_counter() - t0
    return {"s_per_image": sec, "ms_per_step": 1e3 * out.timings["denoise"] / settings.steps, **peaks(),
            "timings": out.timings, "recoveries": out.recoveries, "ok": True, "result": out}


def strip_result(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "result"}


# ---------------------------------------------------------------------------------------------- parts
def part_budget(a, device: str) -> dict:
    import numpy as np

    from tryon_lab import logos, metrics, pipeline, speed

    pipe, sizes = build(a, device)
    res = {"components": {k: {"bytes": v} for k, v in sizes.items()}, "modes": {}}
    resident = allocated()

    # one request's activations (denoise + decode) and the decode alone, plain and tiled
    base = timed_image(pipe, a)
    res["modes"]["bf16"] = strip_result(base)
    res["components"]["activations, one request"] = {"bytes": base["peak_allocated_bytes"] - resident}
    out = base["result"]
    prepared = pipeline.prepare([request(a)])
    w, h = prepared[0].diptych.size
    lat = out.latents.to(device, pipe.dtype)
    decoded = {}
    for tiled in (False, True):
        pipe.fill.vae.enable_tiling() if tiled else pipe.fill.vae.disable_tiling()
        reset_peak()
        before = allocated()
        decoded[tiled] = pipeline.decode(pipe.fill, lat, h, w)[0]
        key = "vae decode, tiled" if tiled else "vae decode"
        res["components"][key] = {"bytes": peaks()["peak_allocated_bytes"] - before}
    res["vae_tiling_psnr_db"] = metrics.psnr(np.asarray(decoded[True]), np.asarray(decoded[False]))
    tiled = timed_image(pipe, a)
    res["modes"]["bf16+vae-tiling"] = strip_result(tiled)
    pipe.fill.vae.disable_tiling()

    # a logo batch of 1..n at the logo pass's diptych size
    per_batch = {}
    tryon_img = out.images[0]
    side = a.width // 8  # logo boxes on the garment area, a row of five
    boxes = [(int(a.width * (0.1 + 0.16 * (i % 5))), int(a.height * (0.3 + 0.12 * (i // 5))), 0, 0)
             for i in range(a.logos)]
    boxes = [(x, y, x + side, y + side) for x, y, _, _ in boxes]
    for n in range(1, a.logos + 1):
        matches = logos.known_matches(boxes[:n], boxes[:n])
        reset_peak()
        before = allocated()
        t0 = time.perf_counter()
        logos.logo_pass(pipe, tryon_img, request(a).garment, matches, pipeline.TryOnSettings(steps=a.logo_steps,
                        progress=False), batched=True, size=a.logo_size)
        per_batch[n] = {"bytes": peaks()["peak_allocated_bytes"] - before, "seconds": time.perf_counter() - t0}
    ns = sorted(per_batch)
    slope = float(np.polyfit(ns, [per_batch[n]["bytes"] for n in ns], 1)[0]) if len(ns) > 1 else per_batch[1]["bytes"]
    res["components"]["logo crops, per logo"] = {"bytes": slope, "size_px_per_half": a.logo_size}
    res["logo_batches"] = per_batch

    res["hot_path"] = hot_path(a, pipe, device)

    # FP8 in place (bf16 weights freed), then its two modes
    before = allocated()
    q = speed.quantize_transformer(pipe.fill.transformer, "fp8_dynamic_row", device=device) if device == "cuda" else {}
    reset_peak()
    res["components"]["transformer, fp8"] = {"bytes": sizes["transformer"] + allocated() - before,
                                             "weight_bytes": q.get("weight_bytes")}
    resident_fp8 = allocated()
    for name, tile in (("fp8", False), ("fp8+vae-tiling", True)):
        pipe.fill.vae.enable_tiling() if tile else pipe.fill.vae.disable_tiling()
        r = timed_image(pipe, a) if device == "cuda" else {"ok": False, "error": "FP8 needs CUDA"}
        if r.get("ok"):
            r["latent_rel_l2_vs_bf16"] = metrics.rel_l2(r["result"].latents, base["result"].latents)
        res["modes"][name] = strip_result(r)
    res["logo_resident_bytes"] = {"bf16": resident, "bf16+vae-tiling": resident, "fp8": resident_fp8,
                                  "fp8+vae-tiling": resident_fp8}
    return res


def hot_path(a, pipe, device: str) -> dict:
    """Allocations per step, stock loop vs hot loop; bit-identity; sync vs overlapped output copies."""
    import torch

    from tryon_lab import pipeline

    fill = pipe.fill
    rows, identical = pipeline.compare_denoise_loops(pipe, request(a), pipeline.TryOnSettings(steps=a.steps))
    out = {}
    for key, row in zip(("stock", "hot"), rows, strict=True):
        if "allocations per step outside the model" in row:  # CUDA only
            out[f"{key}_loop_allocations_per_step"] = row["allocations per step outside the model"]
            out[f"{key}_model_allocations_per_step"] = row["allocations per step in the model"]
        out[f"{key}_denoise_s"] = row["denoise s"]
    out["bit_identical"] = identical
    prepared = pipeline.prepare([request(a)])
    tokens, _ = pipeline.encode_garments(pipe, [pipeline.garment_of(p) for p in prepared])
    pe, pooled = pipeline.conditioning(pipe.prompt_embeds, pipe.pooled_prompt_embeds, tokens)

    # N requests back to back: PIL after a blocking decode, against the copy overlapped with the next request
    w, h = prepared[0].diptych.size
    n = a.async_requests
    s_hot = pipeline.TryOnSettings(steps=a.steps, progress=False, hot_path=True)

    def run(overlap: bool) -> tuple[float, list]:
        images, pending = [], None
        torch.cuda.synchronize() if device == "cuda" else None
        t0 = time.perf_counter()
        for i in range(n):
            latents = pipeline.denoise(fill, prepared, pe, pooled, s_hot, [i])
            if overlap:
                nxt = pipeline.decode_async(fill, latents, h, w)
                if pending is not None:
                    images += pending.images()
                pending = nxt
            else:
                images += pipeline.decode(fill, latents, h, w)
        if pending is not None:
            images += pending.images()
        return time.perf_counter() - t0, images

    run(True)
    t_sync, im_sync = run(False)
    t_async, im_async = run(True)
    import numpy as np

    out.update({"requests": n, "sync_copy_s": t_sync, "async_copy_s": t_async,
                "saved_ms_per_request": 1e3 * (t_sync - t_async) / n,
                "async_images_identical": all(np.array_equal(np.asarray(x), np.asarray(y))
                                              for x, y in zip(im_sync, im_async, strict=True))})
    return out


def part_mode(a, device: str, name: str) -> dict:
    from tryon_lab import memory

    mode = memory.MemoryMode.parse(name)
    pipe, _ = build(a, device)
    if mode.offload != "none":  # offload modes start from weights in CPU memory, as a small card would
        pipe.fill.to("cpu")
        reset_peak()
    memory.apply_mode(pipe, mode, device)
    return {"modes": {name: strip_result(timed_image(pipe, a))}}


def part_expandable(a, device: str) -> dict:
    pipe, _ = build(a, device)
    return {"expandable_segments": strip_result(timed_image(pipe, a))}


def part_cap(a, device: str, gb: float) -> dict:
    """The planner's choice for ``gb`` from the table so far, then one full try-on under that cap."""
    import torch

    from tryon_lab import memory

    budget = json.loads(Path(a.budget).read_text())
    plan = memory.plan_for_limit(int(gb * GB), budget, logos=a.logos)
    pipe, _ = build(a, device)
    pipe.fill.to("cpu")  # built on the GPU for speed; the capped run starts from CPU memory
    pipe.redux.to("cpu")
    pipe.prompt_embeds, pipe.pooled_prompt_embeds = pipe.prompt_embeds.cpu(), pipe.pooled_prompt_embeds.cpu()
    reset_peak()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(gb * GB / total)
    memory.apply_mode(pipe, plan.mode, device)
    r = timed_image(pipe, a)
    return {"caps": {f"{gb:g} GB": {"mode": plan.mode.name, "logo_batch": plan.logo_batch, "reasons": plan.reasons,
                                    **strip_result(r), "completed": True}}}


def child(a) -> int:
    import torch

    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    part = a.child
    try:
        if part == "budget":
            res = part_budget(a, device)
        elif part == "expandable":
            res = part_expandable(a, device)
        elif part.startswith("cap:"):
            res = part_cap(a, device, float(part[4:]))
        else:
            res = part_mode(a, device, part)
    except Exception as e:  # recorded, not lost: the parent keeps every other part
        res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        if not part.startswith(("budget", "cap:", "expandable")):
            res = {"modes": {part: {"ok": False, "error": res["error"]}}, **res}
        if part.startswith("cap:"):
            res = {"caps": {f"{float(part[4:]):g} GB": {"completed": False, "error": res["error"]}}, **res}
    Path(a.child_out).write_text(json.dumps(res, indent=2, default=str))
    return 0


# ----------------------------------------------------------------------------------------------- parent
def merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v


def budget_table(res: dict) -> dict:
    """The planner's table from everything measured: modes (peak, time), logo resident and per-logo bytes."""
    modes = {n: {k: m.get(k) for k in ("peak_bytes", "peak_allocated_bytes", "s_per_image", "ms_per_step", "ok",
                                        "error") if m.get(k) is not None}
             for n, m in res.get("modes", {}).items()}
    per_logo = res.get("components", {}).get("logo crops, per logo", {}).get("bytes")
    return {"components": res.get("components", {}), "modes": modes,
            "logo": {"per_logo_bytes": per_logo, "resident_bytes": res.get("logo_resident_bytes", {})},
            "request": res.get("request"), "stamp": res.get("stamp")}


def report(res: dict) -> str:
    from tryon_lab.bench import markdown_table

    gib = lambda b: None if b is None else round(b / 2**30, 2)  # noqa: E731
    lines = [f"# GPU memory: budget, modes, caps, hot path\n\n{res.get('model')}; {res.get('request')}\n"]
    comp = [{"component": k, "GiB": gib(v.get("bytes"))} for k, v in res.get("components", {}).items()]
    lines += ["## Budget (measured)\n", markdown_table(comp)]
    modes = [{"mode": n, "ok": m.get("ok"), "peak reserved GiB": gib(m.get("peak_bytes")),
              "peak allocated GiB": gib(m.get("peak_allocated_bytes")), "s/image": m.get("s_per_image"),
              "ms/step": m.get("ms_per_step"), "error": (m.get("error") or "")[:80]}
             for n, m in sorted(res.get("modes", {}).items(), key=lambda nm: nm[1].get("s_per_image") or 1e9)]
    lines += ["## Modes (one try-on each)\n", markdown_table(modes)]
    caps = [{"cap": k, "mode": c.get("mode"), "completed": c.get("completed"), "peak reserved GiB": gib(c.get("peak_bytes")),
             "s/image": c.get("s_per_image"), "error": c.get("error", "")} for k, c in res.get("caps", {}).items()]
    if caps:
        lines += ["## Capped runs (set_per_process_memory_fraction)\n", markdown_table(caps)]
    if "hot_path" in res:
        lines += ["## Hot path\n", markdown_table([{"measure": k, "value": v} for k, v in res["hot_path"].items()])]
    if "expandable_segments" in res:
        e, d = res["expandable_segments"], res.get("modes", {}).get("bf16", {})
        lines += ["## expandable_segments\n", markdown_table([
            {"allocator": "default", "peak reserved GiB": gib(d.get("peak_bytes")), "s/image": d.get("s_per_image")},
            {"allocator": "expandable_segments:True", "peak reserved GiB": gib(e.get("peak_bytes")),
             "s/image": e.get("s_per_image")}])]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="budget,expandable,bf16+model-offload,bf16+group-offload,"
                                       "bf16+sequential-offload,fp8+model-offload,cap:24,cap:16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--logos", type=int, default=5)
    ap.add_argument("--logo-size", type=int, default=256)
    ap.add_argument("--logo-steps", type=int, default=4)
    ap.add_argument("--async-requests", type=int, default=4)
    ap.add_argument("--config", default=str(REPO / "benchmarks" / "flux_fill_config.json"))
    ap.add_argument("--budget", default=str(REPO / "benchmarks" / "memory_budget.json"))
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results.json"))
    ap.add_argument("--raw", default=str(REPO / "benchmarks" / "memory_gpu_raw.json"), help="all parts, merged")
    ap.add_argument("--part-timeout", type=float, default=240.0, help="seconds before a part is recorded as failed")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny config")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)

    from tryon_lab.bench import stamp, write_results

    raw_path = Path(a.raw)
    res = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    res.update(model="full-size FLUX.1 Fill + Redux shapes, random bf16 weights" if not a.tiny else "tiny CPU smoke config",
               request=f"person {a.width}x{a.height} (diptych {2 * a.width}x{a.height}), {a.steps} steps, "
                       f"logo crops {a.logo_size} px per half")
    failed = 0
    for part in a.parts.split(","):
        out = raw_path.with_name(f".part-{os.getpid()}.json")
        env = dict(os.environ)
        if part == "expandable":
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        argv_child = [sys.executable, __file__, "--child", part, "--child-out", str(out)]
        for k, v in vars(a).items():  # the parent's options, as given
            if k not in ("parts", "child", "child_out", "tiny"):
                argv_child += [f"--{k.replace('_', '-')}", str(v)]
        argv_child += ["--tiny"] if a.tiny else []
        t0 = time.perf_counter()
        try:
            subprocess.run(argv_child, env=env, check=False, timeout=a.part_timeout)
            new = json.loads(out.read_text()) if out.exists() else {"error": f"{part}: child wrote nothing"}
        except subprocess.TimeoutExpired:
            new = {"error": f"{part}: timed out after {a.part_timeout:.0f} s"}
            if ":" not in part and part not in ("budget", "expandable"):
                new["modes"] = {part: {"ok": False, "error": new["error"]}}
        out.unlink(missing_ok=True)
        if "error" in new:
            failed += 1
            print(new.pop("traceback", ""), file=sys.stderr)
            res.setdefault("errors", {})[part] = new.pop("error")
        merge(res, new)
        res.setdefault("part_seconds", {})[part] = time.perf_counter() - t0
        res["stamp"] = stamp("cpu" if a.tiny else "cuda")
        res.setdefault("part_stamps", {})[part] = res["stamp"]  # parts may come from several runs
        raw_path.write_text(json.dumps(res, indent=2, default=str))  # after every part: nothing lost on a timeout
        Path(a.budget).write_text(json.dumps(budget_table(res), indent=2, default=str))
        print(f"{part}: {time.perf_counter() - t0:.0f} s", flush=True)
    md = report(res)
    write_results(a.results, "memory_gpu" if not a.tiny else "memory_tiny", {k: v for k, v in res.items()}, md)
    print(md)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
