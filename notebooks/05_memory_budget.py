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
# # 05 · Smaller GPUs, a clean hot path, and past one GPU
#
# Not every card has 80 GB. This notebook reads the **measured** VRAM budget (written on an H100 by
# `scripts/bench_memory_gpu.py`, full-size FLUX Fill + Redux shapes with random weights), shows what each of
# diffusers' memory modes costs in memory and time, and asks the planner which mode a given card should use.
# Then it runs the **hot-path** denoise loop (buffers made once, the Euler step in place, no allocation per
# step outside the transformer) on this machine's model and checks it against the stock loop bit for bit.
# Last, it shows what a second GPU buys for one image, measured on two H200s, and where each step's time goes.
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
results_file = "benchmarks/results.json"  # the two-GPU runs (scripts/bench_multi_gpu.py), for section 5
limits_gb = [80, 24, 16, 8]  # cards to plan for (GB, as vendors count: 1e9 bytes)
logos = 4  # logos per garment the logo pass should batch
sample = "s000"  # the hot-path request: an id from data/manifest.json
steps = 4
seed = 0
output_dir = "runs/scratch/05"

# %%
from tryon_lab import notebook

lab = notebook.setup(model, device, dtype, output_dir, sample_ids=(sample,))  # header; quiets library noise

from tryon_lab import memory, pipeline, runs, samples
from tryon_lab.experiments import loops, memory_report, multi_gpu_bench

budget = memory.load_budget(budget_file)
raw = memory_report.load_raw(raw_file)
notebook.markdown(memory_report.budget_header(budget, raw))

# %% [markdown]
# ## 1. The budget, component by component
# Bytes each part takes on the card, read from the allocator while building and running it (not computed
# from parameter counts): weights in bf16 and FP8, the Redux encoder, the cached text embeddings, one
# request's activations, the VAE decode with and without tiling, and each extra logo in a logo batch.

# %%
notebook.table(memory_report.component_rows(budget))

# %% [markdown]
# ## 2. Each mode: peak memory and time per image
# One try-on per mode, each in a fresh process on the GPU named above. Peaks are the allocator's *reserved*
# bytes: what a card, or a per-process cap, actually has to hold. The dashed lines are the cards planned for
# below (sold in GB, 1e9 bytes; the axis counts GiB, 2^30 bytes).

# %%
notebook.table(memory_report.mode_rows(budget))
fig = memory_report.plot_modes(budget, limits_gb)

# %% [markdown]
# ## 3. The planner: the fastest mode that fits a card
# For each limit: the fastest measured mode whose peak fits with 5 % kept free, and the largest logo batch
# that fits beside it, with every faster mode it turned down and why.

# %%
plans, plan_text = memory_report.plans(limits_gb, budget, logos)
notebook.markdown(plan_text)

# %% [markdown]
# The planner's choices were checked on the H100 by capping the process
# (`torch.cuda.set_per_process_memory_fraction`) and running one full-size try-on under each cap:

# %%
notebook.table(memory_report.cap_rows(raw), note="" if raw.get("caps") else "No capped runs recorded.")

# %% [markdown]
# ## 4. The hot path on this machine
# The stock `FluxFillPipeline` loop allocates a few tensors every step around the transformer call (the
# concatenated input, the cast timestep, the scheduler's float32 copy and update). The hot path makes them
# once and updates the latents in place with the same arithmetic, so the result must be **bit-identical**.
# On a GPU the allocator's counter shows the allocations per step outside the transformer.

# %%
slim = lab.pipeline()
s = samples.load_sample(sample)
request = pipeline.TryOnRequest(s.person, s.garment, s.mask, seed=seed)
hot_rows, identical = loops.compare_denoise_loops(slim, request, pipeline.TryOnSettings(steps=steps))
notebook.table(memory_report.loop_rows(hot_rows, lab.cpu), note=f"Final latents bit-identical: **{identical}**")
assert identical, "the hot path must reproduce the stock loop exactly"
notebook.markdown(memory_report.gpu_hot_path_text(raw, budget))

# %% [markdown]
# ## 5. Beyond one GPU: one image split over two
# Measured on two H200s (full-size shapes, random weights) by `scripts/bench_multi_gpu.py`: diffusers' context
# parallelism (Ulysses) splits each image's tokens over the GPUs, against the best one-GPU path on one GPU.
# Speed-up is per image; rel-L2 compares the final latents with the one-GPU run's. The bars show where a
# profiled step's device time goes on each rank; *host* is how long the host takes to issue that step. When the
# host takes longer than the GPU's work, the GPU waits for it (regional compile at 1024x768), and CUDA graphs
# take the host out of the step: inductor's (whole-model compile only) or the step graph, one CUDA graph per
# transformer call around regional compile (`PipelineOptions(step_graph=True)`). `ContextParallel(split_vae=True)`
# splits the VAE's encode and decode over the GPUs as well, with the unsplit output. `ContextParallel(ulysses_chunks=n)`
# sends Q, K and V in one all-to-all instead of three, in n chunks of heads that attend while the next chunk's
# exchange is in flight (rows `+qkv1` and `+qkv2`: two chunks are the best split so far).

# %%
mg_rows, mg_profile, mg_report = multi_gpu_bench.summary(results_file)
notebook.table(mg_rows, multi_gpu_bench.COLUMNS, note="\n".join(multi_gpu_bench.verdicts(mg_rows)))
if mg_profile:
    fig = multi_gpu_bench.plot_profile(mg_profile)

# %%
runs.record_inputs(output_dir, {"model": str(lab.model_dir), "budget": budget_file})
runs.save_metrics(output_dir, {"model": slim.description, "stamp": lab.stamp, "plans": plans,
                               "hot_path_bit_identical": identical, "loop_timings": hot_rows})
runs.record_tolerances(output_dir, {"metrics_ignore": ["loop_timings*", "stamp.*"]})  # timings vary run to run
notebook.recorded(output_dir)
