"""AOTInductor export of the FLUX Fill try-on: build once with diffusers, run later without it.

A cold process spends most of its time before the first try-on importing diffusers (and what it pulls in) and
tracing for ``torch.compile``. Here the exporting process (the slim pipeline from ``configure.build_pipeline``)
writes, for one fixed request size:

    transformer.pt2     FluxTransformer2DModel.forward (torch.export -> aoti_compile_and_package, weights inside)
    vae_encoder.pt2     the VAE encoder's moments (the masked image's latents are sampled from them)
    vae_decoder.pt2     unpack + unscale + VAE decode of packed latents
    redux.pt2           SigLIP + Redux embedder: garment pixels -> image tokens
    schedule.safetensors  the sigmas/timesteps FluxFillPipeline computes for this size, per step count
    text_embeds.safetensors  the cached prompt embeddings (the text encoders are never needed at run time)

and the cold path (``aoti_run.py``, torch-only imports) loads them and runs the Fill loop in plain torch.
The caller may still pass the conditioning (``prompt_embeds``, ``pooled``, as ``pipeline.conditioning``
makes them) instead of the Redux package.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import fill_setup, hotpath, pipeline
from ..images import PreparedInput
from ..loading import SlimPipeline
from ..metrics import rel_l2  # noqa: F401 (callers compare exported against eager with it)
from . import aoti_run
from .aoti_run import REDUX, SCHEDULE, TEXT, TRANSFORMER, TRANSFORMER_CONSTANTS, VAE_DECODER, VAE_ENCODER


class _Transformer(torch.nn.Module):
    """The transformer's keyword call as positional tensors in and one tensor out (what export wants)."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden, timestep, guidance, pooled, prompt_embeds, text_ids, image_ids):
        return self.transformer(hidden_states=hidden, timestep=timestep, guidance=guidance, pooled_projections=pooled,
                                encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=image_ids,
                                return_dict=False)[0]


class _Decoder(torch.nn.Module):
    """``pipeline.vae_decode`` as a module: packed latents -> images in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module, height: int, width: int, vae_scale_factor: int):
        super().__init__()
        self.vae, self.height, self.width, self.vsf = vae, height, width, vae_scale_factor

    def forward(self, latents):
        x = fill_setup.unpack(latents, self.height, self.width, self.vsf)
        x = x / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self.vae.decode(x.to(self.vae.dtype), return_dict=False)[0]


class _Encoder(torch.nn.Module):
    """The VAE encoder's Gaussian parameters (mean | logvar); sampling stays outside, on the caller's generators."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image).latent_dist.parameters


class _Redux(torch.nn.Module):
    """``pipeline.encode_garment`` after the image processor: pixel values -> Redux tokens."""

    def __init__(self, redux):
        super().__init__()
        self.encoder, self.embedder = redux.image_encoder, redux.image_embedder

    def forward(self, pixels):
        return self.embedder(self.encoder(pixels).last_hidden_state).image_embeds


def _compile(module: torch.nn.Module, args: tuple, out_path: str | Path, constants_out: str | Path | None = None,
             on_stage=None) -> Path:
    """torch.export (fixed shapes), then AOTInductor into one ``.pt2``.

    The weights go inside the package, or with ``constants_out`` into that safetensors file instead: a package
    of many gigabytes is a zip that loading extracts to a temporary folder (a full copy of the weights), while a
    safetensors file is read once, straight to the device, and handed to the package without a copy
    (``aoti_run.load_transformer``).
    """
    from torch._inductor import aoti_compile_and_package

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    configs = {"aot_inductor.package_constants_in_so": False} if constants_out else None
    on_stage = on_stage or (lambda name: None)
    with torch.no_grad():
        program = torch.export.export(module.eval(), args)
        on_stage(f"{out_path.stem} exported")
        path = Path(aoti_compile_and_package(program, package_path=str(out_path), inductor_configs=configs))
        on_stage(f"{out_path.stem} compiled")
    if constants_out:
        fqns = constant_fqns(path)
        on_stage(f"{out_path.stem} loaded without weights: {len(fqns)} constants")
        write_constants(module, fqns, constants_out, dict(program.constants))
    return path


def _torch_only(code: str, path: str | Path):
    """``code`` in a fresh process that imports torch alone, the package path as its argument; a crash there
    leaves its Python stack in stderr (faulthandler)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, str(path)], capture_output=True,
                          text=True)


def constant_fqns(path: str | Path) -> list[str]:
    """The names of the weights a package takes from outside, read by a process that imports torch alone.

    The package is loaded where it will run, in a torch-only process: on the H200 image (torch 2.11, CUDA 13) a
    CUDA package loaded by the exporting process, which holds diffusers and torchao, crashed the process
    (segmentation fault, with the weights inside the package or not, bf16 or FP8).
    """
    import json

    code = ("import json, sys, torch; loader = torch._C._aoti.AOTIModelPackageLoader(sys.argv[1], 'model', False, 1, -1);"
            " print('FQNS ' + json.dumps(loader.get_constant_fqns()))")
    p = _torch_only(code, path)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("FQNS ")]
    if p.returncode or not lines:
        raise RuntimeError(f"loading {path} in a torch-only process failed (exit {p.returncode}): {p.stderr[-2000:]}")
    return json.loads(lines[-1][5:])


def loader_check(work: str | Path, device: str) -> dict:
    """Whether this machine's torch loads an AOTInductor package at all: a two-layer module packaged here and
    run once in a process that imports torch alone. On the H200 image (torch 2.11, CUDA 13, gcc 13) this load
    crashes (segmentation fault), so the full-size export (minutes) is not worth starting there."""
    from torch._inductor import aoti_compile_and_package

    start = time.perf_counter()
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()).to(device).eval()
    with torch.no_grad():
        program = torch.export.export(module, (torch.randn(8, 64, device=device),))
        path = aoti_compile_and_package(program, package_path=str(Path(work) / "loader_check.pt2"))
    code = (f"import sys, torch; run = torch._inductor.aoti_load_package(sys.argv[1]);"
            f" print('RAN', tuple(run(torch.randn(8, 64, device='{device}')).shape))")
    p = _torch_only(code, path)
    ok = p.returncode == 0 and "RAN (8, 64)" in p.stdout
    return {"ok": ok, "returncode": p.returncode, "seconds": time.perf_counter() - start,
            "reason": "" if ok else p.stderr[-1500:]}


def package_constant(module: torch.nn.Module, fqn: str, lifted: dict | None = None) -> torch.Tensor:
    """The tensor a package expects under ``fqn``: a parameter or buffer, a constant the export lifted
    (``lifted``: ``ExportedProgram.constants``), or for a tensor-subclass weight (torchao's Float8Tensor) one of its
    inner tensors, which AOTInductor names ``<module>.parametrizations.<weight>.original<i>`` in
    ``__tensor_flatten__`` order."""
    if lifted and fqn in lifted:
        return lifted[fqn]
    if ".parametrizations." in fqn:
        owner, rest = fqn.split(".parametrizations.")
        attr, original = rest.split(".")
        weight = module.get_parameter(f"{owner}.{attr}")
        names, _ = weight.__tensor_flatten__()
        return getattr(weight, names[int(original.removeprefix("original"))])
    try:
        return module.get_parameter(fqn)
    except AttributeError:
        return module.get_buffer(fqn)


def write_constants(module: torch.nn.Module, fqns: list[str], out_path: str | Path, lifted: dict | None = None) -> Path:
    """Every constant a package was compiled to take from outside, in one safetensors file."""
    from safetensors.torch import save_file

    tensors = {f: package_constant(module, f, lifted).detach().contiguous() for f in fqns}
    save_file(tensors, str(out_path), metadata={"format": "tryon_lab.aoti_constants/1"})
    return Path(out_path)


def example_inputs(pipe: SlimPipeline, prepared: list[PreparedInput], seeds: list[int], steps: int,
                   guidance_scale: float = 30.0) -> hotpath.DenoiseState:
    """The transformer inputs of one request batch, through the stock pipeline's own setup (``hotpath``)."""
    tokens, _ = pipeline.encode_garments(pipe, [pipeline.garment_of(p) for p in prepared])
    prompt_embeds, pooled = pipeline.conditioning(pipe.prompt_embeds, pipe.pooled_prompt_embeds, tokens)
    width, height = prepared[0].diptych.size
    return hotpath.prepare_state(pipe.fill, [p.diptych for p in prepared], [p.mask for p in prepared], prompt_embeds,
                                 pooled, height, width, steps, guidance_scale, pipeline.generators(seeds))


def export_transformer(pipe: SlimPipeline, example: hotpath.DenoiseState, out_path: str | Path,
                       constants_out: str | Path | None = None, on_stage=None) -> Path:
    """The Fill transformer for ``example``'s shapes (batch, tokens, text length); ``constants_out``: its weights
    in a safetensors file beside the package instead of inside it."""
    args = (example.inputs, example.timesteps[0], example.guidance, example.pooled, example.prompt_embeds,
            example.text_ids, example.image_ids)
    return _compile(_Transformer(pipe.transformer), args, out_path, constants_out, on_stage)


def export_vae_decoder(pipe: SlimPipeline, latents: torch.Tensor, height: int, width: int, out_path: str | Path) -> Path:
    """Unpack, unscale and decode packed ``latents`` of a ``height`` x ``width`` diptych."""
    fill = pipe.fill
    return _compile(_Decoder(fill.vae, height, width, fill.vae_scale_factor), (latents,), out_path)


def export_vae_encoder(pipe: SlimPipeline, image: torch.Tensor, out_path: str | Path) -> Path:
    """The VAE encoder for ``image``'s shape ((batch, 3, H, W) in [-1, 1])."""
    return _compile(_Encoder(pipe.fill.vae), (image,), out_path)


def redux_size(pipe: SlimPipeline) -> int:
    """The square side the Redux image processor resizes garments to."""
    size = pipe.redux.feature_extractor.size
    height = getattr(size, "height", None) or (size.get("height") if isinstance(size, dict) else size)
    return int(height)


def export_redux(pipe: SlimPipeline, out_path: str | Path) -> Path:
    """SigLIP + Redux embedder for one garment at the processor's size."""
    device = next(pipe.redux.image_encoder.parameters()).device
    pixels = torch.zeros(1, 3, redux_size(pipe), redux_size(pipe), dtype=pipe.dtype, device=device)
    return _compile(_Redux(pipe.redux), (pixels,), out_path)


def schedule_tensors(pipe: SlimPipeline, height: int, width: int, steps: int) -> dict[str, torch.Tensor]:
    """The sigmas and timesteps ``FluxFillPipeline`` uses for this size and step count (its own calls)."""
    from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift, retrieve_timesteps

    fill = pipe.fill
    cfg = fill.scheduler.config
    seq_len = (height // fill.vae_scale_factor // 2) * (width // fill.vae_scale_factor // 2)
    mu = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    timesteps, n = retrieve_timesteps(fill.scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    timesteps, n = fill.get_timesteps(n, 1.0, "cpu")
    return {f"sigmas_{steps}": fill.scheduler.sigmas.float().cpu().clone(),
            f"timesteps_{steps}": timesteps.float().cpu().clone()}


def export_all(pipe: SlimPipeline, prepared: list[PreparedInput], seeds: list[int], out_dir: str | Path,
               steps: tuple[int, ...] = (2, 20, 28), guidance_scale: float = 30.0,
               external_weights: bool = False, on_stage=None) -> dict:
    """Every package and the schedule for ``prepared``'s size and batch into ``out_dir``; returns paths and seconds.

    ``external_weights``: the transformer's weights in ``aoti_run.TRANSFORMER_CONSTANTS`` beside its package (what
    a full-size model needs: see ``_compile``); the small packages keep theirs inside. ``on_stage(name)`` after each.
    """
    on_stage = on_stage or (lambda name: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width, height = prepared[0].diptych.size
    example = example_inputs(pipe, prepared, seeds, steps[0], guidance_scale)
    fill, seconds = pipe.fill, {}
    tensors: dict[str, torch.Tensor] = {}
    for n in steps:
        tensors.update(schedule_tensors(pipe, height, width, n))
    meta = {"height": height, "width": width, "batch": len(prepared), "latent_channels": fill.vae.config.latent_channels,
            "vae_scale_factor": fill.vae_scale_factor, "guidance_scale": guidance_scale,
            "scaling_factor": fill.vae.config.scaling_factor, "shift_factor": fill.vae.config.shift_factor,
            "dtype": str(pipe.dtype).removeprefix("torch."), "first_sigma": float(tensors[f"sigmas_{steps[0]}"][0]),
            "text_tokens": int(example.prompt_embeds.shape[1]), "redux_size": redux_size(pipe),
            "model": pipe.description, "device": example.inputs.device.type}
    aoti_run.save_schedule(out_dir / SCHEDULE, meta, tensors)
    from safetensors.torch import save_file

    save_file({"prompt_embeds": pipe.prompt_embeds.contiguous().cpu(),
               "pooled": pipe.pooled_prompt_embeds.contiguous().cpu()}, str(out_dir / TEXT))
    start = time.perf_counter()
    (out_dir / TRANSFORMER_CONSTANTS).unlink(missing_ok=True)
    export_transformer(pipe, example, out_dir / TRANSFORMER, out_dir / TRANSFORMER_CONSTANTS if external_weights else None,
                       on_stage)
    seconds["transformer"] = time.perf_counter() - start
    on_stage("transformer")
    start = time.perf_counter()
    export_vae_decoder(pipe, example.latents.contiguous(), height, width, out_dir / VAE_DECODER)
    seconds["vae_decoder"] = time.perf_counter() - start
    on_stage("vae_decoder")
    start = time.perf_counter()
    image = aoti_run.image_tensor([p.diptych for p in prepared]).to(example.inputs.device, pipe.dtype)
    export_vae_encoder(pipe, image, out_dir / VAE_ENCODER)
    seconds["vae_encoder"] = time.perf_counter() - start
    on_stage("vae_encoder")
    start = time.perf_counter()
    export_redux(pipe, out_dir / REDUX)
    seconds["redux"] = time.perf_counter() - start
    on_stage("redux")
    return {"dir": out_dir, "seconds": seconds, "meta": meta}


def reference(pipe: SlimPipeline, prepared: list[PreparedInput], seeds: list[int], steps: int,
              guidance_scale: float = 30.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The slim pipeline's own latents and decoded images for the same request, plus its conditioning tensors
    (prompt_embeds, pooled) that the cold path takes as inputs."""
    tokens, _ = pipeline.encode_garments(pipe, [pipeline.garment_of(p) for p in prepared])
    prompt_embeds, pooled = pipeline.conditioning(pipe.prompt_embeds, pipe.pooled_prompt_embeds, tokens)
    settings = pipeline.TryOnSettings(steps=steps, guidance_scale=guidance_scale, progress=False, hot_path=False)
    latents = pipeline.denoise(pipe.fill, prepared, prompt_embeds, pooled, settings, seeds)
    width, height = prepared[0].diptych.size
    image = pipeline.vae_decode(pipe.fill, latents, height, width)
    return latents, image, prompt_embeds, pooled


def write_cold_inputs(path: str | Path, prepared: list[PreparedInput], prompt_embeds: torch.Tensor,
                      pooled: torch.Tensor | None, seeds: list[int], steps: int) -> Path:
    """The file ``aoti_run.main`` reads in a fresh process: pixels, masks, seeds, steps, and the conditioning
    unless ``prompt_embeds`` is None (then the child runs the Redux package)."""
    import json

    from safetensors.torch import save_file

    images = np.stack([np.asarray(p.diptych.convert("RGB")) for p in prepared])
    masks = np.stack([np.asarray(p.mask.convert("L")) for p in prepared])
    tensors = {"images": torch.from_numpy(images), "masks": torch.from_numpy(masks)}
    if prompt_embeds is not None and pooled is not None:
        tensors.update(prompt_embeds=prompt_embeds.contiguous().cpu(), pooled=pooled.contiguous().cpu())
    save_file(tensors, str(path), metadata={"seeds": json.dumps([int(s) for s in seeds]), "steps": str(steps)})
    return Path(path)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return aoti_run.to_pil(images)
