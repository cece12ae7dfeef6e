"""Speed knobs for the FLUX Fill transformer, each a thin call into the library that owns it.

- FP8 weights: ``torchao.quantization.quantize_`` with torchao's float8 configs; only the ``nn.Linear``
  layers inside the transformer blocks become FP8, embedders / norms / the output head stay in the
  model dtype (they are small, and precision there matters most).
- Compilation: regional (diffusers ``compile_repeated_blocks``: one double-stream and one single-stream
  block compiled and reused by their siblings, so compile time stays small) or full ``torch.compile``.
- Compile-artefact cache: ``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``, so a fresh
  process skips most compile work.
- Recompile guard: dynamo's graph counter and ``set_stance("fail_on_recompile")`` prove steady state.

The experiment helpers at the bottom (``run_variants``, ``cold_start_breakdown``) drive a whole try-on and
therefore import ``pipeline`` lazily; ``pipeline`` never imports this module, so there is no cycle.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .bench import measure
from .metrics import psnr, rel_l2, ssim

QUANT_MODES = ("none", "fp8_weight_only", "fp8_dynamic_row", "fp8_dynamic_tensor")
COMPILE_MODES = ("none", "regional", "full")
BLOCKS = ("transformer_blocks.*", "single_transformer_blocks.*")  # only Linears in here may become FP8
# fnmatch patterns on full module names kept in the model dtype ("*norm*": the AdaLN modulation Linears,
# which see one token per sample, so FP8 saves memory there but no time and costs precision)
DEFAULT_KEEP = ("x_embedder", "context_embedder", "time_text_embed.*", "norm_out.*", "proj_out", "*norm*")


class SpeedConfigError(ValueError):
    """An unknown mode, or a mode this device cannot run; the message names the alternatives."""


def _check(mode: str, allowed: tuple[str, ...], what: str) -> None:
    if mode not in allowed:
        raise SpeedConfigError(f"unknown {what} mode {mode!r}; choose one of {', '.join(allowed)}.")


# ----------------------------------------------------------------------------------------------- FP8
def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def fp8_dynamic_problem(device: str | torch.device) -> str | None:
    """Why dynamic FP8 (FP8 activations x FP8 weights) cannot run on ``device``, or None when it can.

    It needs FP8 tensor-core matmuls (``torch._scaled_mm``): CUDA compute capability >= 8.9 (Ada, Hopper).
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        where = f"the device is {device.type}"
    else:
        cc = torch.cuda.get_device_capability(device)
        if cc >= (8, 9):
            return None
        where = f"{torch.cuda.get_device_name(device)} has compute capability {cc[0]}.{cc[1]}"
    return (f"dynamic FP8 needs a CUDA GPU of compute capability >= 8.9 (L4, L40, H100, ...); {where}. "
            "Use mode='fp8_weight_only' (FP8 weights, matmuls in the model dtype; runs on CPU and older GPUs) "
            "or mode='none'.")


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor, looking inside tensor subclasses (torchao's Float8Tensor holds qdata + scale)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (FP8 weights counted at their real size)."""
    return sum(tensor_bytes(p) for p in module.parameters()) + sum(tensor_bytes(b) for b in module.buffers())


def fp8_filter(keep: tuple[str, ...] = DEFAULT_KEEP):
    """``filter_fn`` for ``quantize_``: Linears inside the blocks, not kept by name, not LoRA adapters."""

    def fn(module: torch.nn.Module, name: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and "lora_" not in name
                and any(fnmatch.fnmatch(name, b) for b in BLOCKS)
                and not any(fnmatch.fnmatch(name, k) for k in keep))

    return fn


def quantize_transformer(transformer: torch.nn.Module, mode: str = "none", keep: tuple[str, ...] = DEFAULT_KEEP,
                         inductor_tuning: bool = False, device: str | torch.device | None = None) -> dict:
    """Quantize the block Linears in place with torchao; returns weight bytes before/after and the layer count.

    Dynamic FP8 on a device without FP8 matmuls raises ``SpeedConfigError`` (never a silent fallback).
    Load LoRA adapters before calling this: adapter Linears are left alone, their base layers become FP8.
    ``inductor_tuning`` is torchao's ``set_inductor_config``: it turns on inductor's coordinate-descent
    autotuning for the whole process (every later compile too), which costs minutes of compile on a GPU.
    ``device``: quantize a model held on the CPU layer by layer on this device (torchao moves each Linear
    there first), so a card smaller than the bf16 model can still make the FP8 one.
    """
    _check(mode, QUANT_MODES, "quantization")
    before = weight_bytes(transformer)
    fn = fp8_filter(keep)
    layers = [n for n, m in transformer.named_modules() if fn(m, n)]
    if mode != "none":
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            PerRow,
            PerTensor,
            quantize_,
        )

        if mode.startswith("fp8_dynamic") and (problem := fp8_dynamic_problem(device or _device_of(transformer))):
            raise SpeedConfigError(f"{mode}: {problem}")
        tune = dict(set_inductor_config=inductor_tuning)
        config = {"fp8_weight_only": lambda: Float8WeightOnlyConfig(**tune),
                  "fp8_dynamic_row": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), **tune),
                  "fp8_dynamic_tensor": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor(), **tune),
                  }[mode]()
        quantize_(transformer, config, filter_fn=fn, device=device)
    return {"quant": mode, "weight_bytes_before": before, "weight_bytes": weight_bytes(transformer),
            "fp8_layers": len(layers) if mode != "none" else 0}


# ----------------------------------------------------------------------------------------- compile
def compile_transformer(transformer: torch.nn.Module, mode: str = "none", backend: str = "inductor",
                        fullgraph: bool = True, **compile_kwargs) -> torch.nn.Module:
    """Compile in place: ``regional`` = diffusers ``compile_repeated_blocks``, ``full`` = ``module.compile``.

    Both keep the module object, so the pipeline that holds it needs no change. Compilation is lazy:
    the first call pays for it (measure it as first call minus a steady call).
    """
    _check(mode, COMPILE_MODES, "compile")
    kwargs = dict(fullgraph=fullgraph, backend=backend, **compile_kwargs)
    if mode == "regional":
        transformer.compile_repeated_blocks(**kwargs)
    elif mode == "full":
        transformer.compile(**kwargs)
    return transformer


@contextmanager
def count_recompiles(strict: bool = False):
    """Yields a dict whose ``graphs`` is the number of graphs dynamo compiled inside the block.

    ``strict=True`` also sets ``torch.compiler.set_stance("fail_on_recompile")``, so any recompile raises:
    use it around calls that must be steady state (after warm-up, after a LoRA hotswap).
    """
    from torch._dynamo.utils import counters

    out: dict = {}
    before = counters["stats"]["unique_graphs"]
    try:
        with torch.compiler.set_stance("fail_on_recompile") if strict else nullcontext():
            yield out
    finally:
        out["graphs"] = counters["stats"]["unique_graphs"] - before


def reset_compiled() -> None:
    """Forget compiled code in this process (dynamo caches), so the next compile is measured from scratch."""
    torch._dynamo.reset()


def save_compile_artifacts(path: str | Path) -> dict:
    """Write every compile artefact this process produced (FX graphs, AOT autograd, kernels, autotune).

    On CUDA the Triton kernels travel inside; on CPU the C++ kernels are rebuilt by the compiler on load
    (only the Python-side work is skipped), unless the local inductor cache folder is kept.
    """
    out = torch.compiler.save_cache_artifacts()
    if out is None:
        return {"saved": False, "bytes": 0, "entries": {}}
    data, info = out
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return {"saved": True, "bytes": len(data), "entries": {k: len(v) for k, v in info.artifacts.items()}}


def load_compile_artifacts(path: str | Path) -> dict | None:
    """Load artefacts written by ``save_compile_artifacts`` before compiling; None when there is no file."""
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    info = torch.compiler.load_cache_artifacts(data)
    return {"bytes": len(data), "entries": {k: len(v) for k, v in info.artifacts.items()} if info else {}}


# --------------------------------------------------------------------------------- error probes
def block_outputs(transformer: torch.nn.Module, kwargs: dict) -> dict[str, torch.Tensor]:
    """One eager transformer call with forward hooks on every block; each block's outputs, flattened, on the CPU."""
    outs: dict[str, torch.Tensor] = {}

    def keep(name, _module, _args, output):
        parts = output if isinstance(output, tuple) else (output,)
        outs[name] = torch.cat([t.detach().float().flatten().cpu() for t in parts if torch.is_tensor(t)])

    named = [(f"double.{i}", b) for i, b in enumerate(transformer.transformer_blocks)]
    named += [(f"single.{i}", b) for i, b in enumerate(transformer.single_transformer_blocks)]
    hooks = [b.register_forward_hook(lambda m, a, o, n=n: keep(n, m, a, o)) for n, b in named]
    try:
        with torch.no_grad():
            transformer(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    return outs


def block_errors(test: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[dict]:
    """Per-block relative L2 of the outputs (errors accumulate from block to block)."""
    return [{"block": k, "rel_l2": rel_l2(test[k], ref[k])} for k in ref]


@contextmanager
def capture_call(module: torch.nn.Module):
    """Yields a dict that receives the keyword arguments of the first call of ``module`` (detached clones)."""
    seen: dict = {}

    def hook(_m, args, kwargs):
        if not seen:
            seen.update({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        h.remove()


def step_recorder(store: list):
    """``callback_on_step_end`` that keeps every step's latents (float, CPU) for a per-step error curve."""

    def cb(_pipe, _i, _t, kw):
        store.append(kw["latents"].detach().float().cpu())
        return kw

    return cb


# ------------------------------------------------------------------------------------ experiments
@dataclass
class Tolerance:
    """What 'equivalent' means: final latents within ``latent_rel_l2`` and images above ``image_psnr_min``."""

    latent_rel_l2: float
    image_psnr_min: float


# Compilation reorders float ops only; FP8 rounds every block weight to 3 mantissa bits.
TOLERANCES = {"compile": Tolerance(1e-2, 40.0), "fp8": Tolerance(5e-2, 30.0)}


@dataclass
class Variant:
    name: str
    quant: str = "none"
    compile: str = "none"
    backend: str = "inductor"
    lora: bool = False


def parse_variant(spec: str, backend: str = "inductor") -> Variant:
    """``"fp8_weight_only+regional+lora@aot_eager"``: tokens joined by '+', optional '@backend'."""
    body, _, be = spec.partition("@")
    v = Variant(spec, backend=be or backend)
    for tok in body.split("+"):
        if tok in QUANT_MODES[1:]:
            v.quant = tok
        elif tok in COMPILE_MODES[1:]:
            v.compile = tok
        elif tok == "lora":
            v.lora = True
        elif tok not in ("eager", "none"):
            raise SpeedConfigError(f"unknown variant part {tok!r} in {spec!r}; parts: {', '.join(QUANT_MODES[1:])}, "
                                   f"{', '.join(COMPILE_MODES[1:])}, lora, eager; optional @backend.")
    return v


@dataclass
class VariantRun:
    row: dict  # JSON-able numbers and verdict
    images: list = field(default_factory=list)
    latents: torch.Tensor | None = None
    steps: list = field(default_factory=list)  # per-step latents of the steady call
    step_rel_l2: list = field(default_factory=list)
    blocks: list = field(default_factory=list)  # per-block FP8 errors
    block_out: dict = field(default_factory=dict)  # reference only: block outputs
    call_kwargs: dict = field(default_factory=dict)  # reference only: one transformer call's inputs


def run_variant(model_dir, variant: str | Variant, requests: list, settings, dtype=torch.float32,
                device: str = "cpu", reference: VariantRun | None = None, targets: list | None = None,
                lora_path=None, backend: str = "inductor") -> VariantRun:
    """Load a fresh slim pipeline, apply LoRA -> FP8 -> compile, run twice (first call, steady call) and
    compare with ``reference`` (final latents, images, every step, every block) and ``targets`` (ground truth)."""
    from .loading import load_slim
    from .pipeline import tryon

    v = parse_variant(variant, backend) if isinstance(variant, str) else variant
    row: dict = {**asdict(v), "variant": v.name, "status": "ok", "reason": ""}
    row.pop("name")
    if v.quant.startswith("fp8_dynamic") and (problem := fp8_dynamic_problem(device)):
        return VariantRun({**row, "status": "skipped", "reason": problem})
    reset_compiled()
    pipe = load_slim(model_dir, dtype, device)
    run = VariantRun(row)
    if v.lora:
        from .lora import load_lora

        load_lora(pipe.fill, lora_path, "lora")
    row.update(quantize_transformer(pipe.transformer, v.quant))
    if reference is not None and reference.call_kwargs and v.quant != "none":
        run.blocks = block_errors(block_outputs(pipe.transformer, reference.call_kwargs), reference.block_out)
    compile_transformer(pipe.transformer, v.compile, v.backend)
    compiled = v.compile != "none"
    with count_recompiles() as g1, measure(device) as m1:
        first = tryon(pipe, requests, settings)
    try:
        capture = capture_call(pipe.transformer) if reference is None else nullcontext({})  # hooks stay eager-only
        with count_recompiles(strict=compiled) as g2, measure(device) as m2, capture as kw:
            res = tryon(pipe, requests, settings, callback=step_recorder(run.steps))
    except RuntimeError as e:  # fail_on_recompile: a recompile in steady state
        return VariantRun({**row, "status": "failed", "reason": f"recompiled in steady state: {e}"[:300]})
    if reference is None:
        run.call_kwargs, run.block_out = kw, block_outputs(pipe.transformer, kw)
    extra = max(0.0, m1["seconds"] - m2["seconds"])  # compile time when compiled, else one-time warm-up
    row.update(first_s=m1["seconds"], steady_s=m2["seconds"], first_extra_s=extra, compile_s=extra if compiled else 0.0,
               denoise_s=res.timings["denoise"], peak_mem_bytes=max(m1["memory_bytes"], m2["memory_bytes"]),
               mem_kind=m1["memory_kind"], graphs_first=g1["graphs"], recompiles_steady=g2["graphs"])
    run.images, run.latents = res.images, res.latents
    if targets:
        row["gt_psnr"] = sum(psnr(a, b) for a, b in zip(res.images, targets, strict=True)) / len(targets)
        row["gt_ssim"] = sum(ssim(a, b) for a, b in zip(res.images, targets, strict=True)) / len(targets)
    if reference is not None:
        tol = TOLERANCES["fp8" if v.quant != "none" else "compile"]
        run.step_rel_l2 = [rel_l2(a, b) for a, b in zip(run.steps, reference.steps, strict=True)]
        p = float(min(psnr(a, b) for a, b in zip(res.images, reference.images, strict=True)))
        ok = bool((err := rel_l2(res.latents, reference.latents)) <= tol.latent_rel_l2 and p >= tol.image_psnr_min)
        row.update(latent_rel_l2=err, image_psnr=p, tol_rel_l2=tol.latent_rel_l2, tol_psnr=tol.image_psnr_min,
                   image_ssim=min(ssim(a, b) for a, b in zip(res.images, reference.images, strict=True)),
                   equivalent=ok, verdict=(f"{v.name}: {'equivalent' if ok else 'NOT equivalent'} "
                                           f"(final-latent rel-L2 {err:.2e} vs <= {tol.latent_rel_l2:g}; "
                                           f"image PSNR {p:.1f} dB vs >= {tol.image_psnr_min:g} dB)"))
    del first, pipe
    return run


def run_variants(model_dir, variants: list[str], requests: list, settings, dtype=torch.float32, device="cpu",
                 targets=None, lora_path=None, backend: str = "inductor") -> dict[str, VariantRun]:
    """The eager reference (and eager + LoRA when a variant uses LoRA), then every variant against its reference."""
    parsed = [parse_variant(s, backend) for s in variants]
    common = dict(requests=requests, settings=settings, dtype=dtype, device=device, targets=targets, lora_path=lora_path)
    runs = {"eager": run_variant(model_dir, Variant("eager"), **common)}
    if any(v.lora for v in parsed):
        runs["eager+lora"] = run_variant(model_dir, Variant("eager+lora", lora=True), **common)
    for name, r in runs.items():
        r.row["verdict"] = f"{name}: the reference"
    for v in parsed:
        runs[v.name] = run_variant(model_dir, v, reference=runs["eager+lora" if v.lora else "eager"], **common)
    return runs


# ------------------------------------------------------------------------------------- cold start
_CHILD = "import time; t0 = time.perf_counter(); import tryon_lab.speed as s; s._cold_child(t0)"


def _cold_child(t0: float) -> None:
    """Subprocess body of ``cold_start``: import, load, (artefacts), compile + first image, steady image."""
    from .loading import load_slim
    from .pipeline import TryOnRequest, TryOnSettings, tryon
    from .synthetic import make_sample

    a = json.loads(sys.argv[1])
    out = {"import_s": time.perf_counter() - t0}
    v, dtype = parse_variant(a["variant"], a["backend"]), getattr(torch, a["dtype"])
    with measure(a["device"]) as m:
        pipe = load_slim(a["model_dir"], dtype, a["device"])
        if a.get("artifacts_in"):
            out["artifacts"] = load_compile_artifacts(a["artifacts_in"])
        quantize_transformer(pipe.transformer, v.quant)
        compile_transformer(pipe.transformer, v.compile, v.backend)
    out["load_s"] = m["seconds"]
    s = make_sample(a["seed"], 0)
    req, settings = TryOnRequest(s.person, s.garment, s.mask, seed=a["seed"]), TryOnSettings(a["steps"], progress=False)
    with measure(a["device"]) as m1:
        tryon(pipe, req, settings)
    with measure(a["device"]) as m2:
        tryon(pipe, req, settings)
    out.update(first_image_s=m1["seconds"], image_s=m2["seconds"], compile_s=max(0.0, m1["seconds"] - m2["seconds"]))
    if a.get("artifacts_out"):
        out["saved"] = save_compile_artifacts(a["artifacts_out"])
    print("COLD_START " + json.dumps(out), flush=True)


def cold_start(model_dir, variant: str, inductor_dir, dtype: str = "float32", device: str = "cpu", steps: int = 2,
               seed: int = 0, artifacts_in=None, artifacts_out=None, backend: str = "inductor") -> dict:
    """Time a fresh process from start to its first image (import, load, compile, image) with its own inductor cache."""
    args = dict(model_dir=str(model_dir), variant=variant, dtype=dtype, device=device, steps=steps, seed=seed,
                backend=backend, artifacts_in=str(artifacts_in) if artifacts_in else None,
                artifacts_out=str(artifacts_out) if artifacts_out else None)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir)}
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).resolve().parent.parent)
    wall = time.perf_counter() - start
    line = [x for x in p.stdout.splitlines() if x.startswith("COLD_START ")]
    if p.returncode or not line:
        raise RuntimeError(f"cold-start child failed ({p.returncode}): {p.stderr[-2000:]}")
    out = json.loads(line[-1].split(" ", 1)[1])
    out.update(variant=variant, wall_s=wall, startup_s=max(0.0, wall - out["import_s"] - out["load_s"]
                                                            - out["first_image_s"] - out["image_s"]))
    return out


def cold_start_breakdown(model_dir, variant: str, work_dir, **kw) -> list[dict]:
    """Fresh processes: eager; ``variant`` with a cold compile cache; with the artefacts the cold one saved
    (new inductor folder); and with the cold one's local inductor folder kept (what a warm machine has)."""
    work = Path(work_dir)
    for d in ("inductor-eager", "inductor-cold", "inductor-art"):
        shutil.rmtree(work / d, ignore_errors=True)
    art = work / "compile_artifacts.bin"
    art.unlink(missing_ok=True)
    rows = [{"case": "eager", **cold_start(model_dir, "eager", work / "inductor-eager", **kw)},
            {"case": "cold cache", **cold_start(model_dir, variant, work / "inductor-cold", artifacts_out=art, **kw)},
            {"case": "warm artefacts", **cold_start(model_dir, variant, work / "inductor-art", artifacts_in=art, **kw)},
            {"case": "warm local cache", **cold_start(model_dir, variant, work / "inductor-cold", **kw)}]
    return rows
