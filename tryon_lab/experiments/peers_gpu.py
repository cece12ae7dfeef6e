"""Levers and peers for the GPU step-speed benchmark that are not pipeline options: each is built from stock
libraries around an already configured pipeline, so ``gpu_bench`` can time it beside our variants.

- ``static_fp8``: ``quant``'s ``fp8_static_tensor`` (torchao's observer flow) calibrated on the benchmark's own
  input: per-tensor activation scales fixed once, so no amax pass runs per call.
- ``flux_fast_vae``: the published flux-fast recipe's VAE part: FP8 per-row on the VAE's Linears, channels-last,
  the decoder compiled with max-autotune.
- ``cache_dit``: cache-dit's DBCache (Fn=1, Bn=0) + TaylorSeer order 1, forced to a compute/skip mask, as the
  per-image peer of our step cache (same mask, so the timing compares the same number of full passes).
- ``cache_dit_parallel``: cache-dit's own Ulysses for FLUX, the two-GPU peer of ``parallel``'s.
"""

from __future__ import annotations

import torch


def static_fp8(pipe, calibrate) -> dict:
    """The transformer's block Linears to FP8 with static per-tensor activation scales (``quant``'s
    ``fp8_static_tensor``), calibrated by ``calibrate()`` on the benchmark's own input instead of the bundled sample."""
    from ..quant import STATIC, quantize_transformer

    def run() -> str:
        calibrate()
        return "the benchmark's own input, 2 steps"

    report = quantize_transformer(pipe.transformer, STATIC, calibrate=run)
    return {"static_fp8_layers": report["fp8_layers"], **report}


def flux_fast_vae(pipe, gpu: bool = True) -> dict:
    """The peer recipe's VAE: FP8 per-row Linears (torchao), channels-last, decoder compiled with max-autotune
    (``gpu=False``, the CPU smoke run: FP8 weights only, no compile)."""
    from torchao.quantization import quantize_

    from ..quant import fp8_config

    vae = pipe.fill.vae
    quantize_(vae, fp8_config("fp8_dynamic_row" if gpu else "fp8_weight_only"))
    vae.to(memory_format=torch.channels_last)
    if gpu:
        vae.decoder.compile(mode="max-autotune", fullgraph=True)
    return {"vae_fp8": True, "vae_compiled": gpu}


def cache_dit(pipe, mask: list[bool], steps: int) -> dict:
    """cache-dit DBCache + TaylorSeer on the Fill pipeline, forced to ``mask`` (True = full pass)."""
    import cache_dit

    cfg = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=1,
                                  num_inference_steps=steps, steps_computation_mask=[int(m) for m in mask],
                                  steps_computation_policy="static")  # forced: skip exactly where the mask says
    cache_dit.enable_cache(pipe.fill, cache_config=cfg,
                           calibrator_config=cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1))
    return {"cache_dit": cache_dit.__version__ if hasattr(cache_dit, "__version__") else "installed",
            "computed": int(sum(mask))}


def cache_dit_parallel(pipe_or_transformer, world: int, **options) -> dict:
    """cache-dit's own context parallelism for FLUX (a Fill pipeline or its transformer), no step cache: Ulysses over
    ``world`` ranks with its options, e.g. ``ulysses_async`` (each of Q, K, V starts its all-to-all while the next
    one is projected) or ``ulysses_float8`` (FP8 all-to-alls). Call inside the process group, before the first
    image."""
    import importlib.util

    import cache_dit

    if options.get("ulysses_float8") and importlib.util.find_spec("cutlass") is None:
        # measured on two H200s: under regional compile (fullgraph) dynamo stops at that failed import
        raise RuntimeError("cache-dit's FP8 all-to-all (ulysses_float8) probes the CuTe DSL (`import cutlass.cute`) "
                           "inside each compiled block, and it is not installed here, so torch.compile stops there. "
                           "Install `nvidia-cutlass-dsl`, or run the peer without FP8 all-to-alls (cache_dit_async).")
    cfg = cache_dit.ParallelismConfig(ulysses_size=world, **options)
    cache_dit.enable_cache(pipe_or_transformer, parallelism_config=cfg)
    return {"peer": f"cache-dit {cache_dit.__version__}", "ulysses_size": world, **options}
