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
# # 04 · Interactive try-on with a batched logo pass
#
# Pick a person and a garment (or upload them), choose the mask (the manifest's, or a box / ellipse
# adjusted with the sliders), set seed, steps, guidance, TeaCache and the logo LoRA, and press **Run**.
# After the try-on, every garment logo is located on the result by multi-scale template matching
# (a logo the matcher cannot find is reported and skipped, never guessed) and all found logos are redrawn
# in **one batched** FLUX Fill call: each is a small in-context diptych *logo crop | target crop*, pasted
# back with a feathered mask. The pipeline is loaded once per process; pressing Run again reloads nothing.
#
# Headless runs (papermill) call `app.run()`, the same function the button calls, and show its images as a plain
# figure as well, so the exported HTML shows them without a live kernel.

# %% tags=["parameters"]
model = "default"  # "default" (trained toy model if committed, else random), "random", or a folder with real snapshots
device = "auto"  # "auto", "cpu", "cuda"
dtype = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bfloat16", "float32"
person = "s000"  # a sample id from data/manifest.json
garment = "s001"  # a sample id from data/manifest.json
steps = 8
seed = 0
teacache = 0.0  # TeaCache rel-L1 threshold (0: off)
logos = "manifest"  # "manifest" (the garment's boxes), "none", or "x0,y0,x1,y1; ..." on the garment image
logo_lora = "auto"  # "auto" (the model's trained logo adapter, if it has one), "none", or a LoRA folder
tryon_lora = "auto"  # try-on adapter: "auto" (the model's trained one, else "stand-in": random, rank 8), "none", a folder
swap_backend = "auto"  # compile backend of the two-adapter section: inductor on GPU, aot_eager on CPU
output_dir = "runs/scratch/04_interactive_tryon"

# %%
from tryon_lab import notebook

lab = notebook.setup(model, device, dtype, output_dir, sample_ids=(person, garment))  # header; quiets library noise

from IPython.display import display

from tryon_lab import configure, lora, runs, samples, widgets
from tryon_lab import logos as logo_lib
from tryon_lab.experiments import logos_report

adapter, tryon_adapter = lora.resolve_pass_adapters(lab.model_dir, logo_lora, tryon_lora)
print(f"logo adapter: {lora.adapter_label(adapter)}; try-on adapter: {lora.adapter_label(tryon_adapter)}")
app = widgets.TryOnApp(model=lab.model_dir, device=lab.device, dtype=lab.dtype_name, person=person, garment=garment,
                       steps=steps, seed=seed, teacache=teacache, logos_text=logos,
                       **widgets.adapter_options(adapter, tryon_adapter))
display(app.ui)

# %% [markdown]
# ## 1. One run, exactly as the Run button does it
# The widget above shows the result in a live kernel; the same images follow as a plain figure, so the
# HTML export of a headless run shows them too. A second `app.run()` must reuse the warm pipeline.

# %%
result = app.run()
assert result is not None, f"run failed: {app.last_error}"
fig = notebook.images([result.person, result.tryon, result.logo_boxes_image],
                      ["person", "try-on", "after logo pass\n(found logos boxed)"])
notebook.table(result.timings, note=lab.timing("Seconds per stage") + ".")
notebook.table(logo_lib.match_rows(result.matches), note="" if result.matches else "No logo boxes given.")
loads_after_first = configure.warm_pipelines()
again = app.run()  # warm: the cached pipeline is reused
assert again is not None and configure.warm_pipelines() == loads_after_first, "a second Run reloaded the pipeline"

# %% [markdown]
# ## 2. The logo pass, batched against one call per logo
# On the garment sample's ground-truth try-on, where its logos are known to be present (the toy model's
# own output may not show them clearly enough to be found). Same seeds, so both give the same images; what
# batching changes is the number of pipeline calls.

# %%
ref = samples.load_sample(garment)
logo_cmp = logos_report.compare_passes(app.pipeline(), ref, logo_lib.parse_boxes(app.logo_boxes.value), steps, seed)
notebook.table(logos_report.display_rows(logo_cmp, lab.cpu),
               note=f"{logos_report.timing_note(logo_cmp, lab.cpu)}\n\nBatched vs sequential patches, max abs "
               f"difference: {logo_cmp.max_abs} / 255")
fig = notebook.images([ref.target, logo_lib.draw_boxes(logo_cmp.passes["batched"].image, logo_cmp.matches)],
                      ["ground truth", "batched logo pass\n(found logos boxed)"])

# %% [markdown]
# ### What the pass does to a logo, with and without the trained logo adapter
# PSNR inside the known logo boxes against the ground truth, before and after the batched pass: on the ground truth
# itself (a good pass keeps a crisp logo crisp; what it can reach is bounded by the VAE's round trip) and on the
# model's own try-on of the same pair (a good pass sharpens a blurred logo). The adapter is a LoRA trained on the
# logo task alone (`checkpoints/toy-tryon-logo-lora`, its card says how).

# %%
adapter_rows = logos_report.adapter_rows(app.pipeline(), ref, steps, seed, adapter)
notebook.table(adapter_rows, note="Logo-box PSNR in dB; before the pass the ground truth is the ground truth." if adapter_rows
               else "This sample has no ground truth with logo boxes.")

# %% [markdown]
# ## 3. Two adapters, one compiled model
# Production runs a try-on adapter on the main pass and a logo adapter on the logo pass under one compiled
# transformer. Both go into one adapter slot, filled before compiling and padded to the larger rank; each pass then
# hotswaps its adapter's weights in (peft via diffusers), so after the first round nothing compiles again: later
# rounds run under `fail_on_recompile`. The try-on adapter is the model's trained one when it has one, else a random
# stand-in (printed above); the logo adapter is the trained one when the model has it. The last round is compared
# with the eager model.

# %%
swap = None
if tryon_adapter and adapter:
    from tryon_lab.experiments import lora_swap, variants_report

    swap = lora_swap.pass_swap_rounds(lab.model_dir, lab.device, lab.dtype_name,
                                      variants_report.backends(lab.device, swap_backend)[0], tryon_adapter, adapter,
                                      ref, steps, seed)
    notebook.table(swap["rounds"], note=f"Regional compile ({swap['backend']}): {swap['recompiles_after_first']} graphs "
                   f"compiled after the first round. Against eager: try-on {swap['tryon_psnr_vs_eager']:.1f} dB, after "
                   f"the logo pass {swap['final_psnr_vs_eager']:.1f} dB PSNR.")
    assert swap["recompiles_after_first"] == 0
else:
    print("Skipped: it needs a try-on adapter (tryon_lora) and a logo adapter (logo_lora).")

# %% [markdown]
# ## 4. Record the run

# %%
runs.save_image(output_dir, "person", result.person)
runs.save_image(output_dir, "tryon", result.tryon)
runs.save_image(output_dir, "tryon_logo_pass", result.logo_image)
runs.save_image(output_dir, "tryon_logo_boxes", result.logo_boxes_image)
runs.save_image(output_dir, "target_logo_pass_batched", logo_cmp.passes["batched"].image)
runs.record_inputs(output_dir, {"model": str(app.model_dir),
                                "samples": [str(p) for s in dict.fromkeys((person, garment))
                                            for p in samples.load_sample(s).paths.values()]})
runs.save_metrics(output_dir, {"model": lab.description, "stamp": lab.stamp,
                               "settings": result.settings, "timings": result.timings,
                               "matches": logo_lib.match_rows(result.matches), "logo_pass": logo_cmp.rows,
                               "batched_vs_sequential_max_abs": logo_cmp.max_abs, "logo_adapter": str(adapter),
                               "logo_psnr_with_adapter": adapter_rows, "two_adapters": swap,
                               "pipeline_loads": configure.warm_pipelines()})
runs.record_tolerances(output_dir, {"image_psnr_min": 40.0, "metrics_rtol": 1e-3,
                                    "metrics_ignore": ["timings*", "logo_pass*", "stamp.*", "pipeline_loads",
                                                       "matches*confidence", "two_adapters.rounds*"]})
assert logo_cmp.max_abs <= 2, f"batched and sequential logo passes differ by {logo_cmp.max_abs}"
