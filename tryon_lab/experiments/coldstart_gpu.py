"""Cold start on a GPU: a fresh process to its first full-size try-on image, phase by phase, case by case.

The parent saves the random full-size transformer + VAE as safetensors on local disk, then starts one fresh
process per case. Every child reports the same phases, and "other" is what the wall time holds beyond them:

    interpreter start | import torch | CUDA context + cuBLAS/cuDNN handles | import diffusers + tryon_lab
    | weights to the GPU | FP8 + configure | compile artefacts | first image: denoise (compile inside) | decode

Cases: stock (CPU load then ``.to``, eager), slim FP8 + fused QKV + regional compile with an empty cache,
with the mega-cache artefacts the empty-cache run saved (fresh inductor folder), with the empty-cache run's
local inductor folder, and the levers together (artefacts + CUDA context made on a thread while imports run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PHASES = ("interpreter", "import_torch", "cuda_init", "import_libs", "weights_to_gpu", "configure", "artifacts",
          "denoise", "decode")
CASES = {  # name: (slim, compile, artefacts, cuda on a thread, reuse the empty-cache run's inductor folder)
    "stock eager": (False, "none", False, False, False),
    "slim fp8 regional, empty cache": (True, "regional", False, False, False),
    "slim fp8 regional, warm artefacts": (True, "regional", True, False, False),
    "slim fp8 regional, warm local cache": (True, "regional", False, False, True),
    "slim fp8 regional, artefacts + CUDA init on a thread": (True, "regional", True, True, False),
}
_CHILD = ("import time; T = {'start': time.time()}; import sys; sys.argv = sys.argv[:2]; "
          "from tryon_lab.experiments.coldstart_gpu import child; child(T)")


def _cuda_init() -> None:
    import torch

    if not torch.cuda.is_available():  # a CPU smoke run: nothing to initialise
        return
    torch.cuda.init()
    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()  # cuBLAS handle
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().item()  # cuDNN / flash attention handle


def child(t: dict) -> None:
    """One fresh process: the phases above, each timed; prints one ``COLD {json}`` line."""
    a = json.loads(sys.argv[1])
    marks = {"interpreter": t["start"] - a["spawned"]}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        marks[name] = marks.get(name, 0.0) + now - clock
        clock = now

    import threading

    import torch
    lap("import_torch")
    thread = None
    if a["cuda_thread"]:
        thread = threading.Thread(target=_cuda_init)
        thread.start()
    else:
        _cuda_init()
        lap("cuda_init")
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxTransformer2DModel,
    )

    from tryon_lab import compiling
    from tryon_lab.configure import PipelineOptions, apply_options
    from tryon_lab.experiments import fullsize
    from tryon_lab.loading import SlimPipeline
    from tryon_lab.pipeline import decode
    from tryon_lab.timers import sync
    lap("import_libs")
    if thread is not None:
        thread.join()
        lap("cuda_init")  # only what the imports did not hide
    s = fullsize.Shape(**a["shape"])
    weights = Path(a["weights"])
    kw = dict(torch_dtype=s.torch_dtype, use_safetensors=True, local_files_only=True)
    if a["slim"] and s.device == "cuda":
        kw["device_map"] = s.device  # straight onto the GPU
    transformer = FluxTransformer2DModel.from_pretrained(weights / "transformer", **kw).to(s.device).eval()
    vae = AutoencoderKL.from_pretrained(weights / "vae", **kw).to(s.device).eval()
    sync(s.device)
    lap("weights_to_gpu")
    if a["artifacts_in"]:
        marks["artifacts_entries"] = compiling.load_compile_artifacts(a["artifacts_in"])
        lap("artifacts")
    fill = FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**s.scheduler), vae=vae, transformer=transformer,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    fill.set_progress_bar_config(disable=True)
    pe, pooled = fullsize.text_embeddings(s)
    pipe = SlimPipeline(fill, None, pe, pooled, weights, s.device, s.torch_dtype, model_description="random weights")
    fp8 = "fp8_dynamic_row" if s.device == "cuda" else "fp8_weight_only"  # the CPU smoke run has no FP8 matmuls
    opts = PipelineOptions(device=s.device, dtype=s.dtype, compile=a["compile"],
                           compile_backend="inductor" if s.device == "cuda" else "aot_eager",
                           **({"fp8": fp8, "fuse_qkv": True} if a["slim"] else {}))
    apply_options(pipe, opts)
    sync(s.device)
    lap("configure")
    x = fullsize.diptych_inputs(s)
    with torch.no_grad():
        lat = fill(**x, num_inference_steps=a["steps"], generator=torch.Generator("cpu").manual_seed(0)).images
        sync(s.device)
        lap("denoise")
        decode(fill, lat, s.height, s.width)
        sync(s.device)
        lap("decode")
        marks["to_first_image"] = time.time() - a["spawned"]
        start = time.perf_counter()
        decode(fill, fill(**x, num_inference_steps=a["steps"], generator=torch.Generator("cpu").manual_seed(0)).images,
               s.height, s.width)
        sync(s.device)
        marks["steady_image"] = time.perf_counter() - start
    from torch._dynamo.utils import counters

    marks["cache_counters"] = {f"{g}.{k}": v for g in ("inductor", "aot_autograd") for k, v in counters[g].items()
                               if "cache" in k or "hit" in k or "miss" in k}
    if a["artifacts_out"]:
        marks["saved"] = compiling.save_compile_artifacts(a["artifacts_out"])
    print("COLD " + json.dumps(marks, default=str), flush=True)


def save_weights(s, work: Path) -> float:
    """The random full-size transformer + VAE as safetensors on local disk (what a container image holds)."""
    from . import fullsize

    fill = fullsize.build_fill(s)
    start = time.perf_counter()
    for name in ("transformer", "vae"):
        getattr(fill, name).save_pretrained(work / "weights" / name, safe_serialization=True, max_shard_size="20GB")
    return time.perf_counter() - start


def run_case(name: str, s, work: Path, steps: int, timeout: float) -> dict:
    from dataclasses import asdict

    slim, compile_mode, warm_artifacts, cuda_thread, reuse_local = CASES[name]
    art = work / "artifacts.bin"
    if warm_artifacts and not art.exists():
        return {"status": "skipped", "reason": "no artefact file: the empty-cache case did not run first"}
    cache = work / ("inductor-empty" if reuse_local or name.endswith("empty cache") else f"inductor-{len(name)}")
    if not reuse_local:
        shutil.rmtree(cache, ignore_errors=True)  # every other child starts with an empty compile cache
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    args = {"shape": asdict(s), "weights": str(work / "weights"), "slim": slim, "compile": compile_mode,
            "steps": steps, "cuda_thread": cuda_thread, "artifacts_in": str(art) if warm_artifacts else None,
            "artifacts_out": str(art) if name.endswith("empty cache") else None}
    args["spawned"] = time.time()
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True, env=env,
                       timeout=timeout)
    wall = time.perf_counter() - start
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("COLD ")]
    if p.returncode or not lines:
        return {"status": "failed", "reason": p.stderr[-1500:]}
    c = json.loads(lines[-1][5:])
    first = c["to_first_image"]
    c.update(status="ok", wall_s=wall, first_image_wall_s=first,
             other=max(0.0, first - sum(c.get(k, 0.0) for k in PHASES)))
    return c


def run(s, work: Path, steps: int = 28, cases: list[str] | None = None, budget_s: float = 540) -> dict:
    """Every case in a fresh process (the empty-cache case first: it saves the artefacts the warm ones load)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "artifacts.bin").unlink(missing_ok=True)
    start = time.perf_counter()
    res: dict = {"save_weights_s": save_weights(s, work), "cases": {}}
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for name in cases or list(CASES):
        left = budget_s - (time.perf_counter() - start)
        if left < 60:
            res["cases"][name] = {"status": "skipped", "reason": "no time left in the budget"}
            continue
        res["cases"][name] = run_case(name, s, work, steps, left)
        c = res["cases"][name]
        print(f"  cold {name}: " + (f"first image after {c['first_image_wall_s']:.1f} s" if c["status"] == "ok"
                                     else c["status"]), flush=True)
    return res


def phase_rows(res: dict) -> list[dict]:
    """One row per case: every phase in seconds, "other", and the wall time to the first image."""
    rows = []
    for name, c in res["cases"].items():
        if c.get("status") != "ok":
            rows.append({"case": name, "status": c.get("status"), "note": c.get("reason", "")[:80]})
            continue
        rows.append({"case": name, **{p: c.get(p, 0.0) for p in PHASES}, "other": c["other"],
                     "to first image": c["first_image_wall_s"], "steady image": c["steady_image"]})
    return rows


def targets(res: dict) -> list[str]:
    c = res["cases"]
    stock = c.get("stock eager", {})
    ok = {k: v for k, v in c.items() if v.get("status") == "ok" and k != "stock eager"}
    if stock.get("status") != "ok" or not ok:
        return []
    best_name, best = min(((k, v) for k, v in ok.items() if "empty cache" not in k),
                          key=lambda kv: kv[1]["first_image_wall_s"], default=(None, None))
    out = []
    if best is not None:
        ratio = best["first_image_wall_s"] / stock["first_image_wall_s"]
        met = best["first_image_wall_s"] <= 15 and ratio <= 0.5
        out.append(f"warm: {best_name} {best['first_image_wall_s']:.1f} s vs stock {stock['first_image_wall_s']:.1f} s "
                   f"= {ratio:.2f}x (target <= 15 s and <= 0.5x: {'met' if met else 'NOT met'})")
    empty = c.get("slim fp8 regional, empty cache", {})
    if empty.get("status") == "ok":
        out.append(f"empty cache: {empty['first_image_wall_s']:.1f} s (target <= 30 s: "
                   f"{'met' if empty['first_image_wall_s'] <= 30 else 'NOT met'})")
    return out
