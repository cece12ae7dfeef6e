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
# # 05 · Smaller GPUs and a clean hot path
#
# Not every card has 80 GB. This notebook reads the **measured** VRAM budget (written on an H100 by
# `scripts/bench_memory_gpu.py`, full-size FLUX Fill + Redux shapes with random weights), shows what each of
# diffusers' memory modes costs in memory and time, and asks the planner which mode a given card should use.
# Then it runs the **hot-path** denoise loop (buffers made once, the Euler step in place, no allocation per
# step outside the transformer) on this machine's model and checks it against the stock loop bit for bit.
#
# The modes are diffusers' own: model CPU offload (`enable_model_cpu_offload`), sequential offload
# (`enable_sequential_cpu_offload`), group offloading with CUDA streams (`enable_group_offload`, leaf level),
# VAE tiling and slicing, plus torchao FP8 weights. Out of memory during a run is recovered, not fatal: a try-on
# retries once with VAE tiling, a logo batch is halved until it fits; both are listed in the result's
# `recoveries` and shown in the widget of notebook 04.

# %% tags=["parameters"]
model = "default"  # "default" (trained toy model if committed, else random), "random", or a folder with real snapshots
device = "auto"  # "auto", "cpu", "cuda"
dtype = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bfloat16", "float32"
budget_file = "benchmarks/memory_budget.json"  # the planner's table, measured on the GPU
raw_file = "benchmarks/memory_gpu_raw.json"  # everything that run measured (capped runs, hot path)
limits_gb = [80, 24, 16, 8]  # cards to plan for (GB, as vendors count: 1e9 bytes)
logos = 4  # logos per garment the logo pass should batch
steps = 4
seed = 0
output_dir = "runs/scratch/05"

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from tryon_lab import checkpoint, loading, memory, pipeline, plots, runs, samples
from tryon_lab.bench import markdown_table, stamp

budget = memory.load_budget(budget_file)
raw = json.loads(Path(raw_file).read_text()) if Path(raw_file).exists() else {}
where = budget.get("stamp") or {}
display(Markdown(f"**Budget measured on:** {where.get('device')} (commit {str(where.get('commit'))[:7]}, "
                 f"{where.get('date')}), {raw.get('model', 'model not recorded')}; {budget.get('request')}"))

# %% [markdown]
# ## 1. The budget, component by component
# Bytes each part takes on the card, read from the allocator while building and running it (not computed
# from parameter counts): weights in bf16 and FP8, the Redux encoder, the cached text embeddings, one
# request's activations, the VAE decode with and without tiling, and each extra logo in a logo batch.

# %%
display(Markdown(markdown_table(memory.component_rows(budget))))

# %% [markdown]
# ## 2. Each mode: peak memory and time per image
# One try-on per mode, each in a fresh process. Peaks are the allocator's *reserved* bytes: what a card,
# or a per-process cap, actually has to hold. The dashed lines are the limits planned for below.

# %%
rows = memory.mode_rows(budget)
display(Markdown(markdown_table(rows)))
fig = plots.memory_mode_bars(rows, [g * 1e9 / memory.GiB for g in limits_gb])
plt.show()

# %% [markdown]
# ## 3. The planner: the fastest mode that fits a card
# For each limit: the fastest measured mode whose peak fits with 5 % kept free, and the largest logo batch
# that fits beside it, with every faster mode it turned down and why.

# %%
plans = {}
for gb in limits_gb:
    try:
        plan = memory.plan_for_limit(int(gb * 1e9), budget, logos=logos)
        plans[f"{gb} GB"] = {"mode": plan.mode.name, "logo batch": plan.logo_batch,
                             "peak GiB": round(plan.peak_bytes / memory.GiB, 2), "s per image": plan.seconds_per_image}
        display(Markdown(f"**{gb} GB:** `{plan.mode.name}`, logo batch {plan.logo_batch}\n\n"
                         + "\n".join(f"- {r}" for r in plan.reasons)))
    except memory.MemoryBudgetError as e:
        plans[f"{gb} GB"] = {"mode": None, "error": str(e).splitlines()[0]}
        display(Markdown(f"**{gb} GB:** {str(e).splitlines()[0]}"))

# %% [markdown]
# The planner's choices were checked on the H100 by capping the process
# (`torch.cuda.set_per_process_memory_fraction`) and running one full-size try-on under each cap:

# %%
caps = [{"cap": k, "mode": c.get("mode"), "completed": c.get("completed"),
         "peak GiB": round(c.get("peak_bytes", 0) / memory.GiB, 2), "s per image": c.get("s_per_image"),
         "error": c.get("error", "")} for k, c in raw.get("caps", {}).items()]
display(Markdown(markdown_table(caps) if caps else "No capped runs recorded."))

# %% [markdown]
# ## 4. The hot path on this machine
# The stock `FluxFillPipeline` loop allocates a few tensors every step around the transformer call (the
# concatenated input, the cast timestep, the scheduler's float32 copy and update). The hot path makes them
# once and updates the latents in place with the same arithmetic, so the result must be **bit-identical**.
# On a GPU the allocator's counter shows the allocations per step outside the transformer.

# %%
device, torch_dtype = loading.resolve_device_dtype(device, dtype)
model_dir = checkpoint.resolve_model_dir(model)
slim = loading.load_slim(model_dir, torch_dtype, device)
s = samples.load_sample("s000")
display(Markdown(f"**Model:** {slim.description}  \n**Device:** {stamp(device)['device']}"))
request = pipeline.TryOnRequest(s.person, s.garment, s.mask, seed=seed)
hot_rows, identical = pipeline.compare_denoise_loops(slim, request, pipeline.TryOnSettings(steps=steps))
display(Markdown(markdown_table(hot_rows) + f"\n\nFinal latents bit-identical: **{identical}**"))
assert identical, "the hot path must reproduce the stock loop exactly"
gpu_hot = raw.get("hot_path", {})
if gpu_hot:
    display(Markdown(
        f"On the H100 (full size, {budget.get('request')}): {gpu_hot['stock_loop_allocations_per_step']:g} allocations "
        f"per step outside the transformer in the stock loop, {gpu_hot['hot_loop_allocations_per_step']:g} in the hot "
        f"path (the transformer's own: {gpu_hot['hot_model_allocations_per_step']:g}); bit-identical: "
        f"{gpu_hot['bit_identical']}. Copying the decoded pixels to pinned memory on a side stream, overlapped "
        f"with the next request, saved {gpu_hot['saved_ms_per_request']:.0f} ms per request."))

# %%
runs.record_inputs(output_dir, {"model": str(model_dir), "budget": budget_file})
runs.save_metrics(output_dir, {"model": slim.description, "stamp": stamp(device), "plans": plans,
                               "hot_path_bit_identical": identical, "loop_timings": hot_rows})
runs.record_tolerances(output_dir, {"metrics_ignore": ["loop_timings*", "stamp.*"]})  # timings vary run to run
