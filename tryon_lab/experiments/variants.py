"""Equivalence experiments: FP8 / compile / LoRA variants against the eager reference, with error probes.

Each variant is built through ``configure.build_pipeline`` and run twice (first call, steady call); final
latents, images, every step and every block are compared with the reference.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch

from ..compiling import COMPILE_MODES, count_recompiles, reset_compiled
from ..configure import PipelineOptions, build_pipeline
from ..embeddings import dtype_name
from ..metrics import psnr, rel_l2, ssim
from ..pipeline import tryon
from ..quant import QUANT_MODES, SpeedConfigError, fp8_matmul_problem
from ..timers import measure


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
    v = parse_variant(variant, backend) if isinstance(variant, str) else variant
    row: dict = {**asdict(v), "variant": v.name, "status": "ok", "reason": ""}
    row.pop("name")
    if problem := fp8_matmul_problem(v.quant, device):
        return VariantRun({**row, "status": "skipped", "reason": problem})
    reset_compiled()
    options = PipelineOptions(device=device, dtype=dtype_name(dtype), fp8=v.quant, compile=v.compile,
                              compile_backend=v.backend, loras=(("lora", str(lora_path)),) if v.lora else ())
    pipe = build_pipeline(model_dir, options)
    run = VariantRun(row)
    row.update(pipe.build_report.get("quant", {}))
    if reference is not None and reference.call_kwargs and v.quant != "none":
        with torch.compiler.set_stance("force_eager"):  # the FP8 model's blocks, before any compile work
            run.blocks = block_errors(block_outputs(pipe.transformer, reference.call_kwargs), reference.block_out)
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
