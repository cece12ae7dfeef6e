# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# Test notebook: writes a seeded PNG and a metrics JSON, records an input file.

# %% tags=["parameters"]
output_dir = "runs/scratch/nb_ok"
seed = 0
size = 4
input_file = ""
psnr_min = 0.0

# %%
# ruff: noqa: E402 - imports follow the papermill parameters cell
import random

from PIL import Image

from tryon_lab.runs import record_inputs, record_tolerances, save_image, save_metrics

rng = random.Random(seed)
pixels = bytes(rng.randrange(256) for _ in range(size * size * 3))
img = Image.frombytes("RGB", (size, size), pixels)
save_image(output_dir, "image", img)
save_metrics(output_dir, {"seed": seed, "size": size, "mean": sum(pixels) / len(pixels)})
if input_file:
    record_inputs(output_dir, {"data": input_file})
if psnr_min:
    record_tolerances(output_dir, {"image_psnr_min": psnr_min})
print("size", size)
