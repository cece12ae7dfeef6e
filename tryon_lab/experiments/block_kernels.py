"""Probe: how fast inductor's fused elementwise kernels run inside the best step's blocks, under inductor knobs.

The best full-size step (static FP8 + fused QKV + regional compile + FA3 + step graph, H200) spends ~17.7 ms of
its ~81 ms in inductor's fused Triton kernels (norm + modulation + FP8 quantize, GELU + concat + quantize, RMS
norm + RoPE): about twice the time their bytes take at the rate plain elementwise kernels reach. This probe builds the
transformer at full width with one block of each kind, quantizes it as the best step does (static FP8 calibrated
on its own inputs), compiles its blocks regionally under each knob set, and for each: the block calls' time (CUDA
events, median), every kernel's time in the blocks (profiler), the bytes inductor counts for each Triton kernel
(``kernel_num_gb``, written into the kernel's source with ``benchmark_kernel``) and so its GB/s, the output's
rel-L2 against the same quantized blocks eager, and the generated source of the slowest kernels; each block class
is also profiled alone on the inputs it was called with, so its Triton time times the full model's block count
projects the step's (run 18's profile: 17.7 ms). A knob set that fails to compile is kept as a row with its error.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

from ..compiling import sigmoid_gelu
from ..metrics import rel_l2
from ..quant import STATIC, fuse_qkv, quantize_transformer
from ..timers import kernel_ms, sync
from . import fullsize
from .teacache_bench import transformer_inputs

# inductor config overrides per knob set (dotted names as ``torch._inductor.config.patch`` takes them)
KNOBS = {
    "default": {},
    "pointwise_autotune": {"max_autotune_pointwise": True},
    "nd_tiling": {"triton.prefer_nd_tiling": True},
    "block_ptr": {"triton.use_block_ptr": True},
    "aggressive_fusion": {"aggressive_fusion": True},
    "coordinate_descent": {"coordinate_descent_tuning": True},
    "multi_kernel": {"triton.multi_kernel": 1},
    # a model change, not a config: GELU's tanh form as x * sigmoid(2z) (``compiling.sigmoid_gelu``); it stays for
    # the knob sets after it, so the probe runs these after the config-only ones
    "sigmoid_gelu": {},
    "sigmoid_gelu_multi_kernel": {"triton.multi_kernel": 1},
}
MODEL_CHANGE = "sigmoid_gelu"  # the prefix of the knob sets that change the model
BLOCKS = {"FluxTransformerBlock": "num_layers", "FluxSingleTransformerBlock": "num_single_layers"}
_NUM_GB = re.compile(r"""['"]kernel_num_gb['"]\s*:\s*([0-9.eE+-]+)""")


def build(s: fullsize.Shape, attention: str, seed: int = 0):
    """One double- and one single-stream block at the shape's width, fused QKV, static FP8 calibrated on the
    probe's own inputs (the best step's quantization); returns (transformer, inputs)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(s.device), fullsize.default_dtype(s.torch_dtype):
        tr = FluxTransformer2DModel(**{**s.transformer, "num_layers": 1, "num_single_layers": 1})
    tr.eval().requires_grad_(False)
    fuse_qkv(tr)
    inputs = {**transformer_inputs(s, seed), "timestep": torch.full([1], 0.5, device=s.device, dtype=s.torch_dtype)}
    if attention == "_flash_3":
        from ..attention import enable_fa3

        enable_fa3()
    tr.set_attention_backend(attention)
    with torch.no_grad():
        quantize_transformer(tr, STATIC, calibrate=lambda: (tr(**inputs), "the probe's random inputs")[1])
    return tr, inputs


def block_calls(tr, inputs: dict) -> dict[str, tuple]:
    """Each block class's first block with the (args, kwargs) it was called with, from one eager call."""
    seen: dict[str, tuple] = {}
    handles = [m.register_forward_pre_hook(
        lambda m, args, kwargs: seen.setdefault(type(m).__name__, (m, args, kwargs)) and None, with_kwargs=True)
        for m in tr.modules() if type(m).__name__ in BLOCKS]
    try:
        with torch.no_grad():
            tr(**inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _block_ms(calls_of: dict[str, tuple], device: str, calls: int) -> dict[str, float]:
    """Median milliseconds of each block's call on its recorded inputs (``timers.kernel_ms``)."""
    with torch.no_grad():
        return {name: kernel_ms(lambda b=block, a=args, k=kwargs: b(*a, **k), (), calls, device)[2]
                for name, (block, args, kwargs) in calls_of.items()}


def _kernels(call, calls: int) -> dict[str, dict]:
    """Device time of each kernel per ``call()`` (profiler), by name."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        for _ in range(calls):
            call()
        sync()
    out: dict[str, dict] = {}
    for e in prof.key_averages():  # kernels only: device events, not the CPU ops that launched them
        us = getattr(e, "self_device_time_total", 0.0)
        if us > 0 and str(e.device_type).endswith("CUDA"):
            out[e.key] = {"ms_per_call": us / 1e3 / calls, "launches_per_call": e.count / calls}
    return out


def _sources(folder: Path, names: list[str]) -> dict[str, dict]:
    """Each Triton kernel's generated source and inductor's byte count, from the compile's cache folder."""
    found: dict[str, dict] = {}
    for py in folder.rglob("*.py"):
        text = py.read_text(errors="replace")
        for n in names:
            if n in found or f"def {n}(" not in text:
                continue
            body = text[max(0, text.find(f"def {n}(") - 800):]  # the decorator with its meta comes before the def
            end = body.find("''', device_str")
            body = body[: end if end > 0 else 6000]
            gb = _NUM_GB.search(body)
            found[n] = {"source": body[-6000:], "num_gb": float(gb.group(1)) if gb else None}
    return found


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def probe(s: fullsize.Shape, knobs: list[str], attention: str, work: Path, calls: int = 20,
          budget_s: float = 400.0, top: int = 6) -> dict:
    """Every knob set in ``knobs`` on the same quantized blocks; see the module docstring."""
    import torch._inductor.config as inductor_config

    start = time.perf_counter()
    knobs = sorted(knobs, key=lambda k: k.startswith(MODEL_CHANGE))  # the model change stays: those last
    tr, inputs = build(s, attention)
    with torch.no_grad():
        ref = tr(**inputs)[0].float()  # the quantized blocks eager: what every knob set is compared with
    calls_of = block_calls(tr, inputs)
    rows, counts = {}, {k: s.transformer[v] for k, v in BLOCKS.items()}
    old_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # put back after each knob set's compile
    for knob in knobs:
        if time.perf_counter() - start > budget_s:
            rows[knob] = {"status": "skipped: the probe's budget was spent"}
            continue
        if knob.startswith(MODEL_CHANGE) and not getattr(tr, "_sigmoid_gelu", 0):
            tr._sigmoid_gelu = sigmoid_gelu(tr)
        torch._dynamo.reset()
        for m in tr.modules():  # undo the previous knob set's compile
            if type(m).__name__ in BLOCKS:
                m._compiled_call_impl = None
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-{knob}")  # this knob set's kernels, apart
        try:
            with inductor_config.patch({**KNOBS[knob], "benchmark_kernel": True, "fx_graph_cache": False}):
                t0 = time.perf_counter()
                tr.compile_repeated_blocks(fullgraph=True)
                with torch.no_grad():
                    out = tr(**inputs)[0].float()
                sync(s.device)
                compile_s = time.perf_counter() - t0
            ms = _block_ms(calls_of, s.device, calls)
            kernels = _kernels(lambda: tr(**inputs), 5)
            by_block = {n: _kernels(lambda b=b, a=a, k=k: b(*a, **k), 5) for n, (b, a, k) in calls_of.items()}
        except Exception as e:  # noqa: BLE001 -- a knob this torch cannot compile stays in the table as failed
            rows[knob] = {"status": f"failed: {type(e).__name__}: {str(e)[:300]}"}
            continue
        finally:
            _set_env("TORCHINDUCTOR_CACHE_DIR", old_cache)
        slow = sorted((k for k in kernels if k.startswith("triton_")), key=lambda k: -kernels[k]["ms_per_call"])
        src = _sources(work, slow)
        for k in slow:
            if gb := src.get(k, {}).get("num_gb"):
                kernels[k]["gb"] = gb
                kernels[k]["gb_per_s"] = gb / (kernels[k]["ms_per_call"] / kernels[k]["launches_per_call"] / 1e3)
        triton_by_block = {n: sum(v["ms_per_call"] for k, v in kb.items() if k.startswith("triton_"))
                           for n, kb in by_block.items()}
        rows[knob] = {"status": "ok", "compile_s": compile_s, "block_ms": ms,
                      "projected_blocks_ms_per_step": sum(ms[n] * counts[n] for n in ms),
                      "triton_ms_per_call": sum(kernels[k]["ms_per_call"] for k in slow),
                      "triton_ms_by_block": triton_by_block,  # each class profiled alone on its recorded inputs
                      "projected_triton_ms_per_step": sum(triton_by_block[n] * counts[n] for n in triton_by_block),
                      "rel_l2_vs_eager": rel_l2(out, ref), "kernels": kernels,
                      "kernels_by_block": {n: sorted(k for k in kb if k.startswith("triton_")) for n, kb in by_block.items()},
                      "sources": {k: src[k]["source"] for k in slow[:top] if k in src}}
    return {"shape": s.describe(), "attention": attention, "blocks_per_step": counts, "calls": calls,
            "knobs": {k: KNOBS[k] for k in knobs}, "rows": rows, "seconds": time.perf_counter() - start}
