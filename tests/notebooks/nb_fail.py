# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% tags=["parameters"]
output_dir = "runs/scratch/nb_fail"
seed = 0

# %%
# ruff: noqa: E402 - imports follow the papermill parameters cell
from tryon_lab.runs import save_metrics

save_metrics(output_dir, {"seed": seed, "stage": "before failure"})

# %%
raise ValueError(f"deliberate failure (seed={seed})")

# %%
print("never reached")
