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
# # 02 · TeaCache for FLUX Fill: calibrate, fit, sweep
#
# Consecutive denoising steps of a diffusion transformer often produce nearly the same output.
# **TeaCache** (timestep-embedding-aware cache) predicts that from something cheap: how much block 0's
# *modulated input* (the AdaLayerNormZero output, which already mixes the latents with the timestep
# embedding) changed since the previous step. A polynomial rescales that input change into the expected
# output change; the rescaled changes are summed, and while the sum stays under a threshold the step
# reuses the cached residual of the whole block stack instead of running the 57 blocks.
#
# The polynomial is model-specific. The published one was fitted on FLUX.1-dev text-to-image; here it is
# fitted on *this* FLUX Fill model and try-on inputs, checked on held-out requests, and then every
# threshold is compared with full compute, with three caches diffusers ships (First Block Cache,
# MagCache, TaylorSeer) and with its strongest peer, cache-dit's DBCache + TaylorSeer. TeaCache itself runs
# in two flavours: `order 0` reuses the cached residual as it is, `order 1` extrapolates it along the last
# two computed residuals (TaylorSeer's first-order forecast). Every number comes from this run, on the model
# named under the setup cell.

# %% tags=["parameters"]
model = "default"  # "default" (trained toy model if committed, else random), "random", or a folder with real snapshots
device = "auto"  # "auto", "cpu", "cuda"
dtype = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bfloat16", "float32"
calibration_size = 4  # requests the polynomial is fitted on
holdout_size = 2  # requests it is checked on (and the sweep runs on)
steps = 12
guidance_scale = 30.0
thresholds = [0.05, 0.1, 0.2, 0.4, 0.8]  # TeaCache rel_l1_thresh values to sweep (0.05: 2x fewer passes at 28 steps)
published_thresholds = [0.25, 0.6]  # the published FLUX t2i coefficients, for comparison
degree = None  # polynomial degree; None: chosen by held-out error (4 when tied)
min_psnr = 35.0  # dB vs full compute: the recommended threshold keeps every image at least this close
include_diffusers = True  # also sweep diffusers' First Block Cache, MagCache and TaylorSeer
diffusers_settings = {"first_block_cache": [0.2, 0.45, 0.7], "mag_cache": [0.06, 0.24], "taylorseer": [2, 4]}
orders = [0, 1]  # TeaCache's skipped residual: 0 reused, 1 extrapolated to first order
include_cache_dit = True  # the peer: DBCache + TaylorSeer of cache-dit (Fn 1, Bn 0, order 1), in its own process
fitted_schedule = True  # also our first-order cache on a compute schedule fitted on the calibration requests
schedule_refine_runs = 8  # closed-loop runs per pass budget that refine the fitted schedule (0: the fit alone)
cache_dit_thresholds = [0.05, 0.1, 0.2, 0.3, 0.45]  # its residual_diff_threshold values
more_steps = [28]  # calibrate and sweep again at these step counts (the equal-passes comparison)
quality_steps = [8, 12, 20, 28]  # steps vs quality (the full grid: steps_quality.FULL_GRID, 8 to 50)
quality_schedulers = ["euler", "euler_beta", "heun", "dpm++", "unipc", "deis"]  # the first is the reference's
quality_reference_steps = 28
seed = 0
output_dir = "runs/scratch/02"

# %%
from tryon_lab import notebook

lab = notebook.setup(model, device, dtype, output_dir)  # model, device, commit; quiets known library noise

from tryon_lab import pipeline, runs, synthetic, teacache
from tryon_lab.experiments import step_schedule, steps_quality, teacache_fit, teacache_report

slim = lab.pipeline()

# %% [markdown]
# ## 1. Requests
# Procedural try-on pairs (`tryon_lab.synthetic`): person, garment, repaint mask and the exact ground
# truth. The first `calibration_size` fit the polynomial; the last `holdout_size` are never fitted and
# are also the requests of the sweep.

# %%
pairs = [synthetic.make_sample(seed, i) for i in range(calibration_size + holdout_size)]
requests = [pipeline.TryOnRequest(p.person, p.garment, p.mask, seed=seed + i, name=f"sample{i}")
            for i, p in enumerate(pairs)]
settings = pipeline.TryOnSettings(steps=steps, guidance_scale=guidance_scale, progress=False)

# %% [markdown]
# ## 2. Calibration: full-compute trajectories
# Every request runs with full compute while the hook records, per step, the relative L1 change of
# block 0's modulated input (*x*) and of the model output (*y*). TeaCache's bet is that *y* is a smooth
# function of *x*.

# %%
calibration = teacache_fit.calibrate(slim, requests, settings)
fit = teacache_fit.fit_coefficients(calibration, degree=degree, holdout=holdout_size)
notebook.table(teacache_fit.degree_table(fit), floatfmt="{:.4g}", note=teacache_fit.describe_fit(fit))
fig = teacache_report.plot_calibration(calibration, fit)

# %% [markdown]
# The dashed curve is the published polynomial. It was fitted on another model and task, so it maps
# this model's input changes to output changes it does not have: thresholds are not portable between
# coefficient sets, and a threshold tuned for the published curve means something else here.
#
# ## 3. Sweep: every method against full compute
# `computed` counts the steps in which the last block's attention ran (a full pass for TeaCache,
# First Block Cache, MagCache and cache-dit's DBCache; TaylorSeer predicts attention outputs but still runs
# the MLPs), and `ideal_speedup` (steps / computed) is what that pass count promises. `psnr`, `ssim` and `latent_rel_l2`
# compare with the full-compute image of the same request; `gt_psnr` is PSNR against the ground truth
# inside the mask. On a GPU, `speedup` is the measured full-compute denoising time over the method's (fastest
# image); its gap to `ideal_speedup` is each method's per-step overhead.

# %%
holdout, targets = teacache_report.held_out(requests, [p.target for p in pairs], calibration_size, holdout_size)
peers, peer_note = teacache_report.peers(cache_dit_thresholds, include_cache_dit)
if fitted_schedule:  # fitted at each sweep's step count on the calibration requests, run on the held-out ones
    peers.append(step_schedule.peer(requests[:calibration_size], refine_evals=schedule_refine_runs))
sweep_options = dict(include_diffusers=include_diffusers, published_thresholds=published_thresholds,
                     diffusers_params=diffusers_settings, orders=orders, peers=peers)
rows = teacache_fit.sweep(slim, holdout, thresholds, settings, fit.coefficients, targets=targets,
                          input_range=fit.input_range, **sweep_options)
notebook.table(teacache_report.sweep_rows(rows), teacache_report.sweep_columns(lab.cpu),
               note=teacache_report.speed_note(lab.cpu) + "\n\n" + peer_note)
fig = teacache_report.plot_pareto(rows, lab.cpu)

# %% [markdown]
# ## 4. Recommended threshold and what it looks like
# The largest threshold whose images (and those of every smaller threshold) stay within `min_psnr` of
# full compute. Below: full compute, TeaCache at three thresholds (with the passes each computed), and the
# ground truth.

# %%
recommended = teacache_fit.recommend_threshold(rows, min_psnr=min_psnr)
notebook.markdown(f"**Recommended rel_l1_thresh: {recommended}** (min PSNR {min_psnr} dB vs full compute, "
                  f"{steps} steps)")
fig = teacache_fit.plot_samples(rows, target=targets[0], include=recommended)

# %% [markdown]
# ## 5. At equal passes, across step counts
# The coefficients are fitted again at every step count in `more_steps` (a step's change depends on the
# step size), and every method is swept again. The plot puts all methods on one axis, transformer passes
# per image; the table reads each method's PSNR at 2x, 3x and 4x fewer passes than steps (linear between
# the two nearest points of its sweep; empty where its sweep did not reach) and names who leads.
#
# `teacache_scheduled` keeps our first-order extrapolation and replaces the run-time decision with a schedule
# fitted on the calibration requests (`experiments.step_schedule`): replaying the steps cache-dit computes, our
# extrapolation is as close to full compute as cache-dit, so the choice of steps is what decides quality. For
# each pass budget a dynamic programme picks the steps whose skipping costs the least first-order extrapolation
# error on the calibration trajectories (two proxies: the residual's error, the output's error times the step
# size; the one closer to full compute on the calibration requests is kept). Both proxies are open loop (they
# score each skip as if every earlier step had been computed), so the schedule is then refined in closed loop on
# two calibration requests: one computed step moved at a time to a skipped neighbour, kept when the images get
# closer to full compute (`schedule_refine_runs` runs at most per budget). The schedule is static: no
# decision at run time and no block computed on a skipped step (cache-dit runs its first block on every step).

# %%
more, more_fits = teacache_report.sweep_at_steps(slim, requests, [p.target for p in pairs], more_steps, settings,
                                                 calibration_size, holdout_size, thresholds, degree, **sweep_options)
by_steps, fits = {steps: rows, **more}, {steps: fit, **more_fits}
fig = teacache_report.plot_passes(by_steps)
lead = teacache_report.lead_table(by_steps)
notebook.table(lead, floatfmt="{:.1f}", note="PSNR vs full compute (dB) at the passes in the second column.")

# %% [markdown]
# ## 6. Steps against quality
# Fewer steps is the other way to fewer passes. For every scheduler that runs with FLUX Fill: masked PSNR
# against the ground truth and PSNR against the first scheduler's `quality_reference_steps` output, against
# passes per image; dashed: TeaCache (order 1, at its recommended threshold per step count) on top of the
# default scheduler, i.e. the step cache combined with the step count.

# %%
caches = teacache_report.recommended_caches(by_steps, fits, min_psnr, order=1)
quality, failed = steps_quality.steps_quality(slim, holdout, targets, settings, quality_steps, quality_schedulers,
                                              quality_reference_steps, caches)
notebook.table(teacache_fit.scalar_rows(quality), ["scheduler", "steps", "setting", "computed", "psnr", "gt_psnr"],
               note=steps_quality.failed_note(failed))
fig = steps_quality.plot(quality, quality_reference_steps)

# %% [markdown]
# ## 7. Record the run
# The coefficients file carries its provenance (model fingerprint, resolution, steps, calibration and
# held-out requests, degree, errors, recommended threshold, date); `load_coefficients(path,
# expected_fingerprint=...)` refuses it for another model.

# %%
coeff_file = teacache.save_coefficients(lab.output_dir / "teacache_coefficients.json", fit, calibration, recommended)
teacache_report.save_images(output_dir, rows)
runs.record_inputs(output_dir, {"model": str(lab.model_dir)})
runs.save_metrics(output_dir, {"model": lab.description, "fingerprint": slim.fingerprint,
                               "device": lab.stamp["device"], "fit": vars(fit), "recommended_threshold": recommended,
                               "sweep": teacache_fit.scalar_rows(rows), "lead": lead,
                               "by_steps": {n: teacache_fit.scalar_rows(r) for n, r in more.items()},
                               "steps_quality": teacache_fit.scalar_rows(quality), "schedulers_failed": failed})
runs.record_tolerances(output_dir, {"metrics_ignore": ["*s_per_image", "*denoise_s", "*speedup", "date", "device"]})
notebook.markdown(f"Coefficients: `{coeff_file}`")
