"""Full-size FLUX Fill on one GPU: stock bf16 eager against each optimised variant, in one process.

Random weights built from ``benchmarks/flux_fill_config.json`` directly in bf16 on the GPU; a 1024x768 diptych
(3072 image tokens) with 512 T5 + 729 Redux text tokens; 28 steps through diffusers' ``FluxFillPipeline``.
Per variant: ms/step (CUDA events, median), s/image, first call and compile time, TFLOP/s against a measured
8192^3 bf16 matmul, peak memory, graphs compiled and recompiles in steady state, final-latent rel-L2 against
eager; then LoRA hotswap and cold starts in fresh processes (weights on local disk, with and without the
compile-artefact cache). Everything must fit one 10-minute call: each variant has a cost estimate and is
skipped (with the reason and the command to run it) when it would not fit ``--budget``; a running variant
is stopped at the budget; results are written after every variant, so a timeout keeps what was measured.

    python scripts/bench_gpu.py --out OUT                                  # on the GPU, about 9 minutes
    python scripts/bench_gpu.py --out OUT --variants more                  # a second call: the smaller knobs
    python scripts/bench_gpu.py --out OUT --variants eager,regional,cold   # or what the first call skipped
    python scripts/bench_gpu.py --tiny --out /tmp/bench                    # same code on the CPU, tiny model, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# published configs of the text encoders FLUX uses (google/t5-v1_1-xxl, openai/clip-vit-large-patch14), only to
# make the stock pipeline's resident memory real; prompts are not encoded (both variants use the same embeddings)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")


@dataclass
class Recipe:
    """One variant: what is applied to a freshly built transformer, and its cost estimate on an H100 (seconds)."""

    est_s: float
    quant: str = "none"
    fuse_qkv: bool = False
    attn: str | None = None
    compile: str = "none"
    torch_mode: str | None = None  # torch.compile mode: reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs
    quick: bool = False  # one short image: per-step numbers only
    fp8_norms: bool = False  # also the AdaLN modulation Linears in FP8 (memory), not only the block matmuls
    tuned: bool = False  # torchao's inductor settings (coordinate-descent autotuning: minutes more compile)
    stock: bool = False  # text encoders resident too (the stock pipeline's memory)


RECIPES = {
    "eager": Recipe(35, stock=True),
    "fused_qkv": Recipe(12, fuse_qkv=True, quick=True),
    "attn_native_cudnn": Recipe(10, attn="_native_cudnn", quick=True),
    "attn_native_flash": Recipe(10, attn="_native_flash", quick=True),
    "attn_flash": Recipe(10, attn="flash", quick=True),  # needs the flash-attn package
    "fp8_row_eager": Recipe(25, quant="fp8_dynamic_row", quick=True),
    "fp8_row_eager_norms": Recipe(25, quant="fp8_dynamic_row", quick=True, fp8_norms=True),
    "regional": Recipe(45, compile="regional"),
    "full": Recipe(140, compile="full"),
    "regional_cudagraphs": Recipe(100, compile="regional", torch_mode="reduce-overhead"),
    "full_cudagraphs": Recipe(170, compile="full", torch_mode="reduce-overhead"),
    "full_autotune": Recipe(500, compile="full", torch_mode="max-autotune-no-cudagraphs"),
    "fp8_row_regional": Recipe(90, quant="fp8_dynamic_row", compile="regional"),
    "fp8_row_fused_regional": Recipe(90, quant="fp8_dynamic_row", fuse_qkv=True, compile="regional"),
    "fp8_row_fused_regional_tuned": Recipe(330, quant="fp8_dynamic_row", fuse_qkv=True, compile="regional", tuned=True),
    "fp8_tensor_fused_regional": Recipe(90, quant="fp8_dynamic_tensor", fuse_qkv=True, compile="regional"),
}
SPECIAL_EST = {"lora": 80, "cold": 120}
# most telling first: whatever would not fit the budget is skipped with the command that measures it
DEFAULT = "eager,fp8_row_eager,regional,fp8_row_fused_regional,cold,full,lora"
MORE = "eager,fused_qkv,attn_native_cudnn,attn_native_flash,fp8_row_eager_norms,fp8_row_regional,full_cudagraphs"


class OutOfBudget(Exception):
    pass


@dataclass
class Setup:
    device: str
    dtype: str
    transformer: dict
    vae: dict
    scheduler: dict
    height: int
    width: int
    txt_tokens: int
    steps: int
    quick_steps: int
    backend: str
    work: str
    t5: dict
    clip: dict
    lora_ranks: tuple[int, int]

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def image_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)

    def flops_per_step(self) -> float:
        """2 x multiply-adds of one transformer call: 12 d^2 per token per block (QKV, out, MLP) + attention."""
        c = self.transformer
        d = c["num_attention_heads"] * c["attention_head_dim"]
        n_img, n_txt = self.image_tokens, self.txt_tokens
        seq = n_img + n_txt
        blocks = c["num_layers"] + c["num_single_layers"]
        macs = blocks * (12 * d * d * seq + 2 * seq * seq * d)
        macs += n_img * d * (c["in_channels"] + c["out_channels"]) + n_txt * c["joint_attention_dim"] * d
        return 2.0 * macs


def make_setup(a) -> Setup:
    if a.tiny:
        from tryon_lab.checkpoint import SCHEDULER_CONFIG, SmallModelConfig, transformer_config, vae_config

        cfg = SmallModelConfig(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=32,
                               axes_dims_rope=(8, 12, 12), joint_attention_dim=64, pooled_projection_dim=32,
                               vae_block_out_channels=(32, 32, 32, 32))
        return Setup("cpu", "float32", transformer_config(cfg), vae_config(cfg), dict(SCHEDULER_CONFIG), 64, 128, 12,
                     a.steps or 3, 3, a.backend or "aot_eager", a.work,
                     dict(T5_XXL, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4),
                     dict(CLIP_L, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          projection_dim=32), (2, 4))
    cfg = json.loads(Path(a.config).read_text())
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    txt = cfg["text_embeddings"]["t5_prompt_embeds"][1] + cfg["redux"]["image_encoder"]["image_tokens"]
    return Setup("cuda", "bfloat16", strip(cfg["transformer"]), strip(cfg["vae"]), strip(cfg["scheduler"]), 768, 1024,
                 txt, a.steps or 28, 8, a.backend or "inductor", a.work, T5_XXL, CLIP_L, (16, 32))


# ------------------------------------------------------------------------------------------ building
@contextmanager
def default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_fill(s: Setup, seed: int = 0):
    """Transformer + VAE with seeded random weights, created directly in the target dtype on the device."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxTransformer2DModel,
    )

    torch.manual_seed(seed)
    with torch.device(s.device), default_dtype(s.torch_dtype):
        transformer = FluxTransformer2DModel(**s.transformer).eval().requires_grad_(False)
        vae = AutoencoderKL(**s.vae).eval().requires_grad_(False)
    fill = FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**s.scheduler), vae=vae, transformer=transformer,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    fill.set_progress_bar_config(disable=True)
    return fill


def build_text_encoders(s: Setup) -> list:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device(s.device), default_dtype(s.torch_dtype):
        return [T5EncoderModel(T5Config(**s.t5)).eval(), CLIPTextModel(CLIPTextConfig(**s.clip)).eval()]


def inputs(s: Setup) -> dict:
    """A diptych (garment | person), a mask over the person half, and seeded text + Redux embeddings."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (s.height // 8, s.width // 8, 3), dtype=np.uint8)).resize((s.width, s.height))
    mask = np.zeros((s.height, s.width), np.uint8)
    mask[:, s.width // 2:] = 255
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, s.txt_tokens, s.transformer["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, s.transformer["pooled_projection_dim"], generator=g)
    return dict(image=img, mask_image=Image.fromarray(mask, "L"), prompt_embeds=pe.to(s.device, s.torch_dtype),
                pooled_prompt_embeds=pooled.to(s.device, s.torch_dtype), height=s.height, width=s.width,
                guidance_scale=30.0, output_type="latent")


def run_image(fill, s: Setup, x: dict, steps: int) -> dict:
    """One image: Fill denoising (CUDA events at every step) + VAE decode; seconds, per-step seconds, latents."""
    import torch

    from tryon_lab.bench import measure
    from tryon_lab.pipeline import decode

    cuda = s.device == "cuda"
    marks: list = []

    def mark(_p, _i, _t, kw):
        if cuda:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        else:
            marks.append(time.perf_counter())
        return kw

    with measure(s.device) as m:
        lat = fill(**x, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0),
                   callback_on_step_end=mark).images
        decode(fill, lat, s.height, s.width)
    if cuda:
        per_step = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:], strict=False)]
    else:
        per_step = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return {"seconds": m["seconds"], "per_step": per_step, "latents": lat.float().cpu()}


def free() -> None:
    import torch

    from tryon_lab.speed import reset_compiled

    reset_compiled()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(s: Setup) -> int:
    import torch

    from tryon_lab.bench import peak_rss_bytes

    return torch.cuda.max_memory_allocated() if s.device == "cuda" else peak_rss_bytes()


def matmul_ceiling(s: Setup) -> dict:
    """Measured dense matmul rate in the model dtype: the roof that TFLOP/s per step is read against."""
    import torch

    n = 8192 if s.device == "cuda" else 512
    a = torch.randn(n, n, device=s.device, dtype=s.torch_dtype)
    b = torch.randn(n, n, device=s.device, dtype=s.torch_dtype)
    for _ in range(3):
        a @ b
    reps = 10
    times = [run_timed(s, lambda: [a @ b for _ in range(reps)]) / reps for _ in range(3)]
    sec = statistics.median(times)
    return {"n": n, "seconds": sec, "tflops": 2 * n**3 / sec / 1e12}


def run_timed(s: Setup, fn) -> float:
    from tryon_lab.bench import measure

    with measure(s.device) as m:
        fn()
    return m["seconds"]


# ------------------------------------------------------------------------------------------ variants
def run_recipe(name: str, r: Recipe, s: Setup, x: dict, res: dict) -> dict:
    from tryon_lab.metrics import rel_l2
    from tryon_lab.speed import (
        DEFAULT_KEEP,
        SpeedConfigError,
        compile_transformer,
        count_recompiles,
        quantize_transformer,
        weight_bytes,
    )

    free()
    t0 = time.perf_counter()
    fill = build_fill(s)
    tr = fill.transformer
    row: dict = {"variant": name, **{k: v for k, v in asdict(r).items() if k != "est_s"}, "status": "ok"}
    encoders = build_text_encoders(s) if r.stock else []
    row["text_encoder_bytes"] = sum(weight_bytes(e) for e in encoders)
    row["build_s"] = time.perf_counter() - t0
    try:
        tr.set_attention_backend(r.attn or "native")  # diffusers keeps the last choice as a global default
        if r.fuse_qkv:
            tr.fuse_qkv_projections()
        keep = tuple(k for k in DEFAULT_KEEP if k != "*norm*" or not r.fp8_norms)
        row.update(quantize_transformer(tr, r.quant, keep=keep, inductor_tuning=r.tuned))
    except (SpeedConfigError, ImportError, RuntimeError, ValueError) as e:
        return {**row, "status": "skipped", "reason": f"{type(e).__name__}: {e}"[:400]}
    compile_transformer(tr, r.compile, s.backend, **({"mode": r.torch_mode} if r.torch_mode else {}))
    compiled = r.compile != "none"
    steps = s.quick_steps if r.quick else s.steps
    with count_recompiles() as g1:
        first = run_image(fill, s, x, steps)
    row.update(first_image_s=first["seconds"], graphs_first=g1["graphs"], steps=steps)
    timed = first
    if not r.quick:
        with count_recompiles(strict=compiled) as g2:
            timed = run_image(fill, s, x, steps)
        row.update(image_s=timed["seconds"], recompiles_steady=g2["graphs"],
                   compile_s=max(0.0, first["seconds"] - timed["seconds"]) if compiled else 0.0)
        ref = res["variants"].get("eager", {}).get("_latents")
        if ref is not None:
            row["latent_rel_l2_vs_eager"] = rel_l2(timed["latents"], ref)
        if name == "eager":
            row["_latents"] = timed["latents"]
    per_step = (timed["per_step"][2:] if r.quick else []) or timed["per_step"]  # quick: drop warm-up steps
    row["ms_per_step"] = 1e3 * statistics.median(per_step)
    row["tflops"] = s.flops_per_step() / (row["ms_per_step"] / 1e3) / 1e12
    row["peak_bytes"] = peak_bytes(s)
    if name == "regional":
        from tryon_lab.speed import save_compile_artifacts

        row["artifacts"] = save_compile_artifacts(Path(s.work) / "regional_artifacts.bin")
    del fill, tr, encoders
    return row


def run_lora(s: Setup, x: dict) -> dict:
    from tryon_lab.lora import make_lora, swap_benchmark

    free()
    fill = build_fill(s)
    fill.transformer.set_attention_backend("native")
    paths = [make_lora(fill.transformer, rank, seed=i + 1, path=Path(s.work) / f"lora_r{rank}")
             for i, rank in enumerate(s.lora_ranks)]
    per_step: list = []

    def call():
        out = run_image(fill, s, x, s.steps)
        per_step.append(statistics.median(out["per_step"]))
        return out["latents"]

    row = {"variant": "lora", "status": "ok", "ranks": list(s.lora_ranks),
           **swap_benchmark(fill, paths, call, "regional", s.backend)}
    row["ms_per_step"] = 1e3 * per_step[1]
    row["ms_per_step_after_swap"] = 1e3 * per_step[2]
    return row


def cold_child(args: dict) -> None:
    """Fresh process: import, load saved weights, (artefacts, compile), first image, second image."""
    t0 = time.perf_counter()
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxTransformer2DModel,
    )

    from tryon_lab.speed import compile_transformer, load_compile_artifacts

    out = {"import_s": time.perf_counter() - t0}
    s = Setup(**{**args["setup"], "lora_ranks": tuple(args["setup"]["lora_ranks"])})
    t1 = time.perf_counter()
    weights = Path(args["weights"])
    kw = dict(torch_dtype=s.torch_dtype, use_safetensors=True, local_files_only=True)
    if args["slim"] and s.device == "cuda":
        kw["device_map"] = s.device  # straight onto the GPU
    transformer = FluxTransformer2DModel.from_pretrained(weights / "transformer", **kw).to(s.device).eval()
    vae = AutoencoderKL.from_pretrained(weights / "vae", **kw).to(s.device).eval()
    fill = FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**s.scheduler), vae=vae, transformer=transformer,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    fill.set_progress_bar_config(disable=True)
    transformer.set_attention_backend("native")
    out["load_s"] = time.perf_counter() - t1
    if args.get("artifacts"):
        out["artifacts"] = load_compile_artifacts(args["artifacts"])
    compile_transformer(transformer, args["compile"], s.backend)
    with torch.no_grad():
        x = inputs(s)
        first = run_image(fill, s, x, s.steps)
        second = run_image(fill, s, x, s.steps)
    out.update(first_image_s=first["seconds"], image_s=second["seconds"],
               compile_s=max(0.0, first["seconds"] - second["seconds"]),
               to_first_image_s=time.perf_counter() - t0)
    print("COLD " + json.dumps(out), flush=True)


def run_cold(s: Setup, deadline: float) -> dict:
    """Save weights as safetensors, then time fresh processes: stock (CPU load, eager), slim + regional with the
    artefacts saved by the ``regional`` variant, and slim + regional with a cold compile cache if time remains."""
    work = Path(s.work)
    free()
    fill = build_fill(s)
    t0 = time.perf_counter()
    for name in ("transformer", "vae"):
        getattr(fill, name).save_pretrained(work / "weights" / name, safe_serialization=True, max_shard_size="20GB")
    row = {"variant": "cold", "status": "ok", "save_weights_s": time.perf_counter() - t0, "cases": {}}
    del fill
    free()
    art = work / "regional_artifacts.bin"
    cases = [("stock eager", False, "none", None), ("slim regional, warm artefacts", True, "regional", art),
             ("slim regional, cold cache", True, "regional", None)]
    for case, slim, comp, artifacts in cases:
        if artifacts is not None and not artifacts.exists():
            row["cases"][case] = {"status": "skipped", "reason": "no artefact file: the regional variant did not run "
                                  "before, or its backend writes none (only inductor does)"}
            continue
        if time.perf_counter() + 60 > deadline:
            row["cases"][case] = {"status": "skipped", "reason": "no time left in --budget"}
            continue
        args = {"setup": asdict(s), "weights": str(work / "weights"), "slim": slim, "compile": comp,
                "artifacts": str(artifacts) if artifacts else None}
        cache = work / f"inductor-{len(row['cases'])}"
        shutil.rmtree(cache, ignore_errors=True)  # every child starts with an empty compile cache
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
        start = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                           env=env, timeout=max(10.0, deadline - time.perf_counter()))
        wall = time.perf_counter() - start
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("COLD ")]
        if p.returncode or not lines:
            row["cases"][case] = {"status": "failed", "reason": p.stderr[-1500:]}
            continue
        c = json.loads(lines[-1][5:])
        c.update(status="ok", wall_s=wall, startup_s=max(0.0, wall - c["to_first_image_s"] - c["image_s"]))
        row["cases"][case] = c
        print(f"  cold {case}: {wall:.1f} s wall, first image after {c['to_first_image_s']:.1f} s in-process", flush=True)
    return row


# ------------------------------------------------------------------------------------------ report
def targets(res: dict) -> list[str]:
    v = res["variants"]
    ok = lambda n: v.get(n, {}).get("status") == "ok"  # noqa: E731
    out = []
    if ok("eager"):
        e = v["eager"]["ms_per_step"]
        best = min((r for r in v.values() if r.get("status") == "ok" and "ms_per_step" in r and r["variant"] != "lora"),
                   key=lambda r: r["ms_per_step"])
        out.append(f"per step: best {best['variant']} {best['ms_per_step']:.0f} ms vs eager {e:.0f} ms = "
                   f"{e / best['ms_per_step']:.2f}x (target >= 2x: {'met' if e / best['ms_per_step'] >= 2 else 'NOT met'})")
    if ok("regional") and ok("full"):
        rg, fu = v["regional"], v["full"]
        ratio = rg["compile_s"] / max(fu["compile_s"], 1e-9)
        out.append(f"compile: regional {rg['compile_s']:.0f} s vs full {fu['compile_s']:.0f} s = {ratio:.2f} (target <= 0.2: "
                   f"{'met' if ratio <= 0.2 else 'NOT met'}); steady {rg['ms_per_step']:.0f} vs {fu['ms_per_step']:.0f} ms/step")
    fp8 = [r for r in v.values() if r.get("status") == "ok" and str(r.get("quant", "")).startswith("fp8")]
    if ok("eager") and fp8:
        low = min(fp8, key=lambda r: r["peak_bytes"])
        ratio = low["peak_bytes"] / v["eager"]["peak_bytes"]
        out.append(f"peak memory: slim FP8 ({low['variant']}) {low['peak_bytes'] / 2**30:.1f} GiB / stock "
                   f"{v['eager']['peak_bytes'] / 2**30:.1f} GiB = {ratio:.2f} (target <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'})")
    cases = v.get("cold", {}).get("cases", {})
    stock, warm = cases.get("stock eager", {}), cases.get("slim regional, warm artefacts", {})
    if stock.get("status") == "ok" and warm.get("status") == "ok":
        ratio = warm["wall_s"] / stock["wall_s"]
        out.append(f"cold start: warm-artefact slim {warm['wall_s']:.1f} s vs stock {stock['wall_s']:.1f} s = {ratio:.2f} "
                   f"(target <= 1/3 and < 30 s: {'met' if ratio <= 1 / 3 and warm['wall_s'] < 30 else 'NOT met'})")
    return out


def write(res: dict, out: Path) -> None:
    from tryon_lab.bench import markdown_table, write_results

    v = res["variants"]
    rows = [{k: x for k, x in r.items() if not k.startswith("_")} for r in v.values()]
    ceiling = res.get("matmul", {}).get("tflops")
    table = [{"variant": r["variant"], "status": r["status"], "ms/step": r.get("ms_per_step", ""),
              "s/image": r.get("image_s", ""), "first call s": r.get("first_image_s", r.get("first_s", "")),
              "compile s": r.get("compile_s", ""), "TFLOP/s": r.get("tflops", ""),
              "% of matmul": 100 * r["tflops"] / ceiling if ceiling and "tflops" in r else "",
              "peak GiB": r["peak_bytes"] / 2**30 if "peak_bytes" in r else "",
              "graphs": r.get("graphs_first", ""), "recompiles": r.get("recompiles_steady", r.get("recompiles_after_swap", "")),
              "rel-L2 vs eager": r.get("latent_rel_l2_vs_eager", ""), "note": r.get("reason", "")[:80]} for r in rows]
    md = [f"# bench_gpu ({res['stamp']['device']}, {res['stamp']['date']})", "",
          f"shape {res['shape']}; matmul ceiling {ceiling or 0:.0f} TFLOP/s", "", markdown_table(table)]
    if "lora" in v and v["lora"]["status"] == "ok":
        lo = v["lora"]
        md += ["", f"LoRA hotswap: swap {lo['swap_s']:.2f} s + call {lo['call_after_swap_s']:.1f} s, "
               f"{lo['recompiles_after_swap']} recompiles; unload + load + recompile + call {lo.get('reload_recompile_s', 0):.1f} s"]
    if "cold" in v and v["cold"].get("cases"):
        md += ["", markdown_table([{"case": k, **{c: x.get(c, "") for c in ("status", "wall_s", "startup_s", "import_s",
                                    "load_s", "compile_s", "image_s")}} for k, x in v["cold"]["cases"].items()])]
    md += ["", *[f"- {t}" for t in targets(res)]]
    res = {**res, "variants": {r["variant"]: r for r in rows}, "targets": targets(res)}
    write_results(out / "bench_gpu.json", "bench_gpu", res, "\n".join(md) + "\n")


@contextmanager
def time_limit(seconds: float):
    """Stop a variant that runs past the budget (SIGALRM), so the results written so far survive."""
    def handler(_sig, _frame):
        raise OutOfBudget(f"stopped at the budget after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench_gpu")
    ap.add_argument("--variants", default="default", help=f"'default' ({DEFAULT}), 'more' ({MORE}), or a comma "
                    f"list from: {', '.join([*RECIPES, *SPECIAL_EST])}")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole run (keep under the call limit)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--backend", default=None, help="torch.compile backend (inductor; tiny: aot_eager)")
    ap.add_argument("--config", default=str(REPO / "benchmarks" / "flux_fill_config.json"))
    ap.add_argument("--work", default="/tmp/bench_gpu_work", help="local disk for weights, LoRAs, artefacts")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU: the same code path in seconds")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        cold_child(json.loads(a.child))
        return 0
    start = time.perf_counter()
    deadline = start + a.budget
    import torch

    from tryon_lab.bench import stamp

    s = make_setup(a)
    if s.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny on a CPU")
    Path(s.work).mkdir(parents=True, exist_ok=True)
    (Path(s.work) / "regional_artifacts.bin").unlink(missing_ok=True)  # only this run's artefacts count
    out = Path(a.out)
    torch.set_grad_enabled(False)
    res = {"stamp": stamp(s.device), "args": vars(a), "variants": {},
           "shape": f"{s.height}x{s.width} ({s.image_tokens} image + {s.txt_tokens} text tokens), {s.steps} steps, "
                    f"{s.dtype}, {s.flops_per_step() / 1e12:.1f} TFLOP/step, backend {s.backend}"}
    res["matmul"] = matmul_ceiling(s)
    print(f"{res['shape']}; matmul {res['matmul']['tflops']:.0f} TFLOP/s", flush=True)
    x = inputs(s)
    names = {"default": DEFAULT, "more": MORE}.get(a.variants, a.variants)
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in RECIPES and name not in SPECIAL_EST:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join([*RECIPES, *SPECIAL_EST])}")
        est = 0.0 if a.tiny else (RECIPES[name].est_s if name in RECIPES else SPECIAL_EST[name])
        left = deadline - time.perf_counter()
        if est > left:
            res["variants"][name] = {"variant": name, "status": "skipped", "reason": (
                f"needs ~{est:.0f} s, {left:.0f} s left of --budget {a.budget:.0f}; run it in another call: "
                f"--variants eager,{name}")}
            print(f"skip {name}: {res['variants'][name]['reason']}", flush=True)
            continue
        print(f"{name} ({time.perf_counter() - start:.0f} s elapsed, ~{est:.0f} s)...", flush=True)
        try:
            with time_limit(left):
                row = (run_lora(s, x) if name == "lora" else run_cold(s, deadline) if name == "cold"
                       else run_recipe(name, RECIPES[name], s, x, res))
        except OutOfBudget as e:
            res["variants"][name] = {"variant": name, "status": "timed out", "reason": str(e)}
            write(res, out)
            print(f"{name}: {e}; stopping", flush=True)
            break
        except Exception as e:  # one broken variant must not lose the others' numbers
            row = {"variant": name, "status": "failed", "reason": f"{type(e).__name__}: {e}"[:400]}
            traceback.print_exc()
            free()
        res["variants"][name] = row
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                 if not k.startswith("_") and k not in ("cases",)}
        print(f"  {json.dumps(shown, default=str)[:600]}", flush=True)
        write(res, out)
    write(res, out)
    for t in targets(res):
        print(t, flush=True)
    print(f"done in {time.perf_counter() - start:.0f} s: {out / 'bench_gpu.json'}, {out / 'bench_gpu.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
