# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · FP8, compilation, compile-artefact cache, LoRA hotswap: proven equivalent
#
# Four ways to make the same try-on faster, each applied to the transformer diffusers' `FluxFillPipeline`
# already uses, and each checked against the plain eager model before any speed number is believed:
#
# - **FP8 weights** (torchao `quantize_`): the `nn.Linear` layers inside the 57 blocks store FP8 weights;
#   embedders, norms / modulation and the output head stay in the model dtype. *Weight-only* FP8 keeps the
#   matmuls in the model dtype (runs anywhere); *dynamic* FP8 also quantizes activations and uses FP8 tensor
#   cores, which only CUDA GPUs of compute capability >= 8.9 have.
# - **Compilation**: *regional* (diffusers `compile_repeated_blocks`: one double-stream and one single-stream
#   block are compiled and reused by their siblings) or *full* `torch.compile` of the transformer.
# - **Compile-artefact cache** (`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`): a fresh
#   process loads the compiled graphs instead of compiling again.
# - **LoRA hotswap** (peft via diffusers): a new adapter's weights are copied into the compiled model's
#   adapter tensors, so switching styles recompiles nothing.
#
# The reference is **eager in the model dtype**: bf16 on a GPU. On a CPU the `auto` dtype is fp32 (bf16
# matmuls are slow on most CPUs); the FP8 error is then measured against fp32, which is the stricter test.
# Every variant gets a verdict against a stated tolerance. Variants this device cannot run are listed with
# the reason, not hidden.

# %% tags=["parameters"]
model = "default"  # "default" (trained toy model if committed, else random), "random", or a folder with real snapshots
device = "auto"  # "auto", "cpu", "cuda"
dtype = "auto"  # reference dtype: "auto" (bf16 on GPU, fp32 on CPU), "bfloat16", "float32"
# quantization (fp8_weight_only, fp8_dynamic_row, fp8_dynamic_tensor) + compile (regional, full) + lora, "@backend"
variants = ["fp8_weight_only", "fp8_dynamic_row", "regional@inductor", "full", "fp8_weight_only+regional",
            "fp8_weight_only+lora", "regional+lora"]
all_variants = False  # True: every FP8 mode x compile mode, each with and without LoRA (slow on a CPU)
backend = "auto"  # variants without @backend: inductor on GPU, aot_eager on CPU (inductor: tens of s of gcc per variant)
steps = 4
num_samples = 1
lora_ranks = [4, 8]  # two random adapters: hotswap goes from the first to the second
swap_backend = "auto"  # compile backend of the LoRA swap test ("auto" as for backend)
cold_start_variant = "regional@inductor"  # timed from fresh processes; None to skip
cold_start_steps = 2
seed = 0
output_dir = "runs/scratch/03"

# %%
import tempfile

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from tryon_lab import checkpoint, embeddings, loading, lora, pipeline, plots, runs, speed, synthetic
from tryon_lab.bench import markdown_table, stamp

device, torch_dtype = loading.resolve_device_dtype(device, dtype)
model_dir = checkpoint.resolve_model_dir(model)
cheap = "inductor" if device.startswith("cuda") else "aot_eager"
backend = cheap if backend == "auto" else backend
swap_backend = cheap if swap_backend == "auto" else swap_backend
if all_variants:
    variants = [v + lo for q in ("", "fp8_weight_only", "fp8_dynamic_row") for c in ("", "regional", "full")
                if (v := "+".join(x for x in (q, c) if x)) for lo in ("", "+lora")]
display(Markdown(f"**Model:** {checkpoint.describe_model(model_dir)}  \n**Device:** {stamp(device)['device']}; "
                 f"reference: eager {embeddings.dtype_name(torch_dtype)}"
                 + ("" if device.startswith("cuda") else " (CPU: fp32, as bf16 is slow here)")
                 + f"; compile backend {backend} unless a variant names one"))

# %% [markdown]
# ## 1. Requests and adapters
# Procedural try-on pairs with exact ground truth, and two random LoRAs (non-zero B, so they change the
# output) written in the diffusers Flux LoRA format.

# %%
samples = [synthetic.make_sample(seed, i) for i in range(num_samples)]
requests = [pipeline.TryOnRequest(s.person, s.garment, s.mask, seed=seed + i) for i, s in enumerate(samples)]
settings = pipeline.TryOnSettings(steps=steps, progress=False)
lora_paths = lora.make_default_loras(model_dir, tuple(lora_ranks), seed)
print("\n".join(f"LoRA rank {lora.lora_rank(p)}: {p}" for p in lora_paths))

# %% [markdown]
# ## 2. Every variant against the eager reference
# Each variant loads a fresh pipeline, loads the LoRA (if any), quantizes, compiles, then runs twice: the
# first call (compile time = its extra time over the second) and a steady call under
# `set_stance("fail_on_recompile")`, whose per-step latents are compared with the reference's.

# %%
results = speed.run_variants(model_dir, variants, requests, settings, torch_dtype, device,
                             targets=[s.target for s in samples], lora_path=lora_paths[0], backend=backend)
cols = ["variant", "status", "latent_rel_l2", "image_psnr", "image_ssim", "gt_psnr", "weight_bytes", "peak_mem_bytes",
        "compile_s", "first_s", "steady_s", "graphs_first", "recompiles_steady"]
display(Markdown(markdown_table([r.row for r in results.values()], cols)))
for r in results.values():
    print(r.row.get("verdict") or f"{r.row['variant']}: {r.row['status']} {r.row['reason']}".rstrip())

# %% [markdown]
# ## 3. Where the error comes from
# Left: relative L2 of the latents after every denoising step (errors that grow over steps would show here).
# Right/table: for FP8, the output of every block on one identical transformer call (the reference's first
# step), so a block that quantizes badly stands out.

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
for name, r in results.items():
    if r.step_rel_l2:
        ax.semilogy(range(1, len(r.step_rel_l2) + 1), [max(e, 1e-12) for e in r.step_rel_l2], "o-", label=name)
ax.set(xlabel="step", ylabel="latent rel-L2 vs reference", title="per-step error")
ax.legend(fontsize=7)
plt.show()
fp8 = {n: r.blocks for n, r in results.items() if r.blocks}
if fp8:
    names = list(fp8)
    display(Markdown(markdown_table([{"block": b["block"], **{n: fp8[n][i]["rel_l2"] for n in names}}
                                     for i, b in enumerate(fp8[names[0]])])))

# %%
shown = {n: r for n, r in results.items() if r.images}
fig = plots.image_row([samples[0].target] + [r.images[0] for r in shown.values()], ["ground truth", *shown])
plt.show()

# %% [markdown]
# ## 4. LoRA hotswap vs unload + load + recompile
# Adapter A is loaded (padded to the largest rank) before compiling; B is hotswapped in. The call after
# the swap runs with `fail_on_recompile`; the way without hotswap (unload, load B, recompile) must reach
# the same latents.

# %%
slim = loading.load_slim(model_dir, torch_dtype, device)
swap = lora.swap_benchmark(slim.fill, lora_paths, lambda: pipeline.tryon(slim, requests, settings).latents,
                           "regional", swap_backend)
display(Markdown(markdown_table([swap])))
print(f"swap {swap['swap_s']:.3f} s + call {swap['call_after_swap_s']:.2f} s with {swap['recompiles_after_swap']} "
      f"recompiles, vs unload + load + recompile + call {swap['reload_recompile_s']:.2f} s "
      f"({swap['graphs_reload']} graphs); hotswap vs reload latents rel-L2 {swap['swap_vs_reload_rel_l2']:.1e}")

# %% [markdown]
# ## 5. Cold start: a fresh process from start to its first image
# Each bar is a new Python process with its own, empty inductor cache folder: eager; the compiled variant
# with a cold cache (it saves its artefacts); the same with those artefacts loaded into another empty folder;
# and the same with the cold run's local cache folder kept. On a GPU the artefacts carry the Triton kernels;
# on a CPU the C++ kernels are rebuilt by the compiler, so there only the kept local folder skips that work.

# %%
cold = []
if cold_start_variant:
    with tempfile.TemporaryDirectory() as work:
        cold = speed.cold_start_breakdown(model_dir, cold_start_variant, work, dtype=embeddings.dtype_name(torch_dtype),
                                          device=device, steps=cold_start_steps, seed=seed, backend=backend)
    parts = ["startup_s", "import_s", "load_s", "compile_s", "image_s"]
    display(Markdown(markdown_table(cold, ["case", "wall_s", *parts])))
    fig, ax = plt.subplots(figsize=(6, 3))
    left = [0.0] * len(cold)
    for p in parts:
        ax.barh([c["case"] for c in cold], [c[p] for c in cold], left=left, label=p.removesuffix("_s"))
        left = [a + c[p] for a, c in zip(left, cold, strict=True)]
    ax.set(xlabel="seconds to first image (second image time shown as 'image')", title=cold_start_variant)
    ax.legend(fontsize=7)
    plt.show()

# %%
for name, r in results.items():
    for i, img in enumerate(r.images):
        runs.save_image(output_dir, f"{name.replace('@', '_at_').replace('+', '_')}_{i}", img)
runs.record_inputs(output_dir, {"model": str(model_dir), "loras": [str(p) for p in lora_paths]})
runs.save_metrics(output_dir, {"model": checkpoint.describe_model(model_dir), "stamp": stamp(device),
                               "variants": {n: r.row for n, r in results.items()},
                               "step_rel_l2": {n: r.step_rel_l2 for n, r in results.items()},
                               "fp8_blocks": fp8, "lora_swap": swap, "cold_start": cold})
runs.record_tolerances(output_dir, {"image_psnr_min": speed.TOLERANCES["fp8"].image_psnr_min, "metrics_rtol": 0.05,
                                    "metrics_ignore": ["*_s", "*mem_bytes", "*.verdict", "stamp.*", "cold_start*"]})
