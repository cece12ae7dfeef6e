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
# # 01 · The slim FLUX Fill try-on pipeline
#
# A try-on request (person, garment, garment mask) runs FLUX.1 Fill on an in-context diptych
# *garment | person*, conditioned on the garment through FLUX Redux. The stock diffusers way loads
# every component, T5-XXL and CLIP included, and encodes the same fixed prompt at every call.
# The slim pipeline encodes that prompt **once**, caches the embeddings as safetensors, and loads
# only transformer + VAE + scheduler + Redux image encoder, safetensors only, with SDPA attention.
#
# This notebook measures both loaders per component and proves the slim pipeline reproduces the
# stock one. Every number below comes from this run, on the model named in the next cell.

# %% tags=["parameters"]
model = "default"  # "default" (trained toy model if committed, else random), "random", or a folder with real snapshots
device = "auto"  # "auto", "cpu", "cuda"
dtype = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bfloat16", "float32"
sample = "s000"  # an id from data/manifest.json
height = 192  # person image height in pixels (the sample is rescaled, aspect kept)
steps = 12
guidance_scale = 30.0
seed = 0
output_dir = "runs/scratch/01_slim_pipeline"

# %%
from IPython.display import Markdown, display

from tryon_lab import checkpoint, embeddings, loading, metrics, pipeline, plots, runs, samples
from tryon_lab.bench import markdown_table, stamp

device, torch_dtype = loading.resolve_device_dtype(device, dtype)
model_dir = checkpoint.resolve_model_dir(model)
display(Markdown(f"**Model:** {checkpoint.describe_model(model_dir)}  \n**Device:** {stamp(device)['device']}, "
                 f"dtype {embeddings.dtype_name(torch_dtype)}"))

# %% [markdown]
# ## 1. The text-embedding cache
# Built once per model and dtype (this is the only time the text encoders load); afterwards the
# file is checked against the transformer that consumes it.

# %%
emb_file = embeddings.ensure_embeddings(model_dir, torch_dtype, device)
meta = embeddings.read_metadata(emb_file)
display(Markdown(markdown_table([{"file": emb_file.name, **{k: meta[k] for k in
                                  ("dtype", "prompt_embeds_shape", "pooled_prompt_embeds_shape", "date")},
                                  "encoder fingerprint": meta["encoder_fingerprint"][:16]}])))

# %% [markdown]
# ## 2. Standard against slim loading, per component
# Memory is CUDA peak allocation on a GPU and process RSS growth on the CPU (safetensors are
# memory-mapped, so on the CPU RSS grows less than the bytes loaded).

# %%
standard = loading.load_standard(model_dir, torch_dtype, device)
slim = loading.load_slim(model_dir, torch_dtype, device, embeddings_file=emb_file)
reports = {"standard": standard.load_report, "slim": slim.load_report}
display(Markdown(markdown_table(plots.totals_table(reports))))
display(Markdown(markdown_table(plots.component_table(reports))))
fig = plots.component_bars(reports)

# %% [markdown]
# ## 3. safetensors (memory-mapped) against pickle, same weights

# %%
pk = loading.pickle_vs_safetensors(model_dir, "transformer")
display(Markdown(markdown_table([pk])))

# %% [markdown]
# ## 4. The same try-on through both pipelines
# Same request, same seed. The slim pipeline's cached embeddings must reproduce live encoding:
# the difference is expected to be exactly 0 (same device and dtype).

# %%
s = samples.load_sample(sample, height=height)
request = pipeline.TryOnRequest(s.person, s.garment, s.mask, seed=seed, name=s.id)
settings = pipeline.TryOnSettings(steps=steps, guidance_scale=guidance_scale)
out_standard = pipeline.tryon_standard(standard, request, settings)
out_slim = pipeline.tryon(slim, request, settings)
equivalence = {
    "latent max abs diff": metrics.max_abs(out_slim.latents, out_standard.latents),
    "image max abs diff (0-255)": metrics.max_abs(out_slim.images[0], out_standard.images[0]),
    "image PSNR (dB)": metrics.psnr(out_slim.images[0], out_standard.images[0]),
}
display(Markdown(markdown_table([equivalence])))
display(Markdown(markdown_table([{"pipeline": "standard", **out_standard.timings},
                                 {"pipeline": "slim", **out_slim.timings}])))
if out_slim.notes[0]:
    display(Markdown("Input conversions: " + "; ".join(out_slim.notes[0])))

# %%
shown = [s.garment, s.person, s.mask, out_standard.images[0], out_slim.images[0]]
titles = ["garment", "person", "mask", "standard", "slim"]
if s.target is not None:
    shown.append(s.target)
    titles.append("ground truth")
fig = plots.image_row(shown, titles)
if s.target is not None:
    display(Markdown(f"Masked-region PSNR against ground truth: "
                     f"{metrics.psnr(out_slim.images[0], s.target, mask=s.mask):.2f} dB"))

# %% [markdown]
# ## 5. Record the run

# %%
runs.save_image(output_dir, "tryon_slim", out_slim.images[0])
runs.save_image(output_dir, "tryon_standard", out_standard.images[0])
runs.record_inputs(output_dir, {"model": str(model_dir), "embeddings": str(emb_file), "sample": [str(p) for p in s.paths.values()]})
runs.save_metrics(output_dir, {"model": checkpoint.describe_model(model_dir), "fingerprint": slim.fingerprint,
                               "equivalence": equivalence, "standard_load": plots.totals_table(reports)[0],
                               "slim_load": plots.totals_table(reports)[1], "pickle_vs_safetensors": pk,
                               "timings_slim": out_slim.timings, "timings_standard": out_standard.timings,
                               "components": plots.component_table(reports)})
runs.record_tolerances(output_dir, {"metrics_ignore": ["*load*", "*timings*", "*_s", "*memory*", "components*",
                                                       "pickle_vs_safetensors.*"]})
assert equivalence["latent max abs diff"] == 0.0, "slim pipeline does not reproduce the stock one"
