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
# stock one. Every number below comes from this run, on the model named under the setup cell.

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
from tryon_lab import notebook

lab = notebook.setup(model, device, dtype, output_dir, sample_ids=(sample,))  # header; quiets library noise

from tryon_lab import embeddings, loading, pipeline, plots, runs, samples
from tryon_lab.experiments import slim_report

# %% [markdown]
# ## 1. The text-embedding cache
# Built once per model, dtype and device type (this is the only time the text encoders load; a GPU's
# encoders round differently from the CPU's, so each keeps its own file); afterwards the file is checked
# against the transformer that consumes it.

# %%
emb_file = embeddings.ensure_embeddings(lab.model_dir, lab.dtype, lab.device)
notebook.table([slim_report.embeddings_row(emb_file)])

# %% [markdown]
# ## 2. Standard against slim loading, per component
# The standard pipeline is the stock diffusers way (every component, text encoders included); the slim one
# is what `configure.build_pipeline` makes with default options. Memory is CUDA peak allocation on a GPU and
# process RSS growth on the CPU (safetensors are memory-mapped, so on the CPU RSS grows less than the bytes
# loaded). Load seconds on a CPU shared with other work are indicative only.

# %%
standard = loading.load_standard(lab.model_dir, lab.dtype, lab.device)
slim = lab.build(embeddings_file=str(emb_file))
reports = {"standard": standard.load_report, "slim": slim.load_report}
notebook.table(slim_report.load_rows(reports, lab.cpu))
notebook.table(slim_report.component_rows(reports, lab.cpu))
fig = slim_report.plot_components(reports, lab.cpu)

# %% [markdown]
# ## 3. safetensors (memory-mapped) against pickle, same weights

# %%
pk = slim_report.pickle_vs_safetensors(lab.model_dir, "transformer")
notebook.table([slim_report.pickle_row(pk, lab.cpu)])

# %% [markdown]
# ## 4. The same try-on through both pipelines
# Same request, same seed. The slim pipeline's cached embeddings must reproduce live encoding:
# the difference is expected to be exactly 0 (same device and dtype).

# %%
s = samples.load_sample(sample, height=height)
request = pipeline.TryOnRequest(s.person, s.garment, s.mask, seed=seed, name=s.id)
settings = pipeline.TryOnSettings(steps=steps, guidance_scale=guidance_scale, progress=False)
out_standard = pipeline.tryon_standard(standard, request, settings)
out_slim = pipeline.tryon(slim, request, settings)
equivalence = slim_report.equivalence(out_slim, out_standard)
notebook.table([equivalence], floatfmt="{:.4g}")
notebook.table(slim_report.timing_rows({"standard": out_standard, "slim": out_slim}),
               note=slim_report.timing_note(out_slim, lab.cpu))

# %%
fig = notebook.images(*slim_report.comparison_panels(s, out_standard, out_slim))
notebook.markdown(slim_report.masked_psnr_text(s, out_slim))

# %% [markdown]
# ## 5. Record the run

# %%
runs.save_image(output_dir, "tryon_slim", out_slim.images[0])
runs.save_image(output_dir, "tryon_standard", out_standard.images[0])
runs.record_inputs(output_dir, {"model": str(lab.model_dir), "embeddings": str(emb_file),
                                "sample": [str(p) for p in s.paths.values()]})
runs.save_metrics(output_dir, {"model": lab.description, "fingerprint": slim.fingerprint,
                               "equivalence": equivalence, "standard_load": plots.totals_table(reports)[0],
                               "slim_load": plots.totals_table(reports)[1], "pickle_vs_safetensors": pk,
                               "timings_slim": out_slim.timings, "timings_standard": out_standard.timings,
                               "components": plots.component_table(reports)})
runs.record_tolerances(output_dir, {"metrics_ignore": ["*load*", "*timings*", "*_s", "*memory*", "components*",
                                                       "pickle_vs_safetensors.*"]})
assert equivalence["latent max abs diff"] == 0.0, "slim pipeline does not reproduce the stock one"
