"""LoRA hotswap, measured: swap A -> B on a compiled transformer against unload + load + recompile; and the
try-on and logo adapters swapped through one slot of a compiled model, pass after pass."""

from __future__ import annotations

from dataclasses import replace

from .. import configure, flow
from ..compiling import compile_transformer, count_recompiles
from ..lora import LoraState, load_lora, lora_rank, pass_slot, prepare_hotswap, quiet_diffusers
from ..metrics import psnr, rel_l2
from ..pipeline import TryOnRequest, TryOnSettings
from ..timers import measure


def swap_benchmark(fill_pipe, paths: list, call, compile_mode: str = "regional", backend: str = "inductor",
                   reload: bool = True) -> dict:
    """Hotswap A -> B on a compiled transformer vs the way without hotswap (unload, load B, recompile).

    ``fill_pipe`` holds no adapter yet; ``call()`` makes one image and returns its latents. Reports the swap's
    seconds and recompiles (must be 0), and checks that both ways to reach B give the same latents.
    """
    a, b = paths[:2]
    device = next(fill_pipe.transformer.parameters()).device
    state = LoraState()
    prepare_hotswap(fill_pipe, max(lora_rank(p) for p in paths), state)
    load_lora(fill_pipe, a, "lora", state=state)
    compile_transformer(fill_pipe.transformer, compile_mode, backend)
    with count_recompiles() as g_first, measure(device) as m_first:
        call()
    with measure(device) as m_steady:
        lat_a = call()
    swap = load_lora(fill_pipe, b, "lora", hotswap=True, state=state)
    with count_recompiles(strict=True) as g_swap, measure(device) as m_swap:
        lat_b = call()
    out = {"compile": compile_mode, "backend": backend, "graphs_first": g_first["graphs"], "first_s": m_first["seconds"],
           "steady_s": m_steady["seconds"], "swap_s": swap["seconds"], "recompiles_after_swap": g_swap["graphs"],
           "call_after_swap_s": m_swap["seconds"], "swap_changed_rel_l2": rel_l2(lat_b, lat_a)}
    if reload:
        with measure(device) as m_reload, count_recompiles() as g_reload:
            with quiet_diffusers():
                fill_pipe.unload_lora_weights()
            load_lora(fill_pipe, b, "lora", state=state)
            call()
        lat_b2 = call()
        out.update(reload_recompile_s=m_reload["seconds"], graphs_reload=g_reload["graphs"],
                   swap_vs_reload_rel_l2=rel_l2(lat_b, lat_b2))
    return out


def pass_swap_rounds(model_dir, device: str, dtype: str, backend: str, tryon_adapter, logo_adapter, sample,
                     steps: int, seed: int = 0, rounds: int = 3) -> dict:
    """On ``sample`` (its person, garment, mask and garment logo boxes): the try-on adapter on the main pass and the
    logo adapter on the logo pass of one regionally compiled model (``backend``; one adapter slot,
    ``lora.pass_slot``), ``rounds`` times; then the same on the eager model.

    Per round: graphs compiled (the first compiles; every later one must compile none: it runs under
    ``fail_on_recompile``) and seconds; then the last round's images against eager ones (PSNR, dB).
    """
    request, settings = TryOnRequest(sample.person, sample.garment, sample.mask, seed=seed), TryOnSettings(
        steps=steps, progress=False)

    def run(pipe):
        return flow.tryon_with_logos(pipe, request, settings, sample.garment_logo_boxes, logo_lora=logo_adapter,
                                     match_threshold=0.0, tryon_lora=tryon_adapter)

    options = configure.PipelineOptions(device=device, dtype=dtype, compile="regional", compile_backend=backend)
    compiled = configure.get_pipeline(model_dir, replace(options, **pass_slot([tryon_adapter, logo_adapter])))
    rows = []
    for i in range(rounds):
        with count_recompiles(strict=i > 0) as g, measure(device) as m:
            out = run(compiled)
        rows.append({"round": i + 1, "graphs compiled": g["graphs"], "seconds": m["seconds"],
                     "logos redrawn": len(out.logos.patches)})
    ref = run(configure.get_pipeline(model_dir, replace(options, compile="none")))
    return {"rounds": rows, "recompiles_after_first": sum(r["graphs compiled"] for r in rows[1:]),
            "tryon_psnr_vs_eager": min(100.0, psnr(out.tryon.images[0], ref.tryon.images[0])),  # 100: identical
            "final_psnr_vs_eager": min(100.0, psnr(out.image, ref.image)), "tryon_adapter": str(tryon_adapter),
            "logo_adapter": str(logo_adapter), "compile": "regional", "backend": backend}
