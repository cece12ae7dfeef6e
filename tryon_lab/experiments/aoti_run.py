"""The cold path of the AOTInductor prototype: FLUX Fill try-on from exported packages, in plain torch.

A fresh process that imports only this file (torch, numpy, PIL, safetensors) loads the ``.pt2`` packages
``aoti.py`` wrote and runs what ``FluxFillPipeline`` does for one fixed request size:

    prepare_inputs  pixels -> [-1, 1], binarized mask, the masked image through the exported VAE encoder,
                    the per-request CPU generators drawn in the stock order (image sample, noise, masked sample)
    run_exported    the Fill denoise loop (FlowMatchEulerDiscrete Euler steps on the schedule saved at export
                    time), then the exported VAE decoder (unpack, unscale, decode)

Nothing here imports diffusers, transformers or ``tryon_lab``'s loaders: that import (~10 s) and dynamo tracing
are what the packages exist to skip. The conditioning is the cached text embeddings (saved beside the packages)
followed by the garment's Redux tokens from the exported SigLIP + embedder, or tensors the caller made.

Run as ``python -m tryon_lab.experiments.aoti_run FOLDER INPUTS OUT``: the child-process entry (see ``main``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..fill_setup import image_ids, mask_latents, pack

TRANSFORMER = "transformer.pt2"
TRANSFORMER_CONSTANTS = "transformer_constants.safetensors"  # its weights, when exported outside the package
VAE_DECODER = "vae_decoder.pt2"
VAE_ENCODER = "vae_encoder.pt2"
REDUX = "redux.pt2"  # SigLIP + Redux embedder: garment pixels -> image tokens
TEXT = "text_embeds.safetensors"  # the cached prompt's T5 and CLIP embeddings (one fixed prompt)
SCHEDULE = "schedule.safetensors"  # sigmas/timesteps per step count + the request geometry (metadata)


@dataclass
class Schedule:
    """What the exporting process computed with diffusers, so the cold one need not import it."""

    meta: dict  # height, width, batch, latent_channels, vae_scale_factor, guidance_scale, dtype, ...
    tensors: dict[str, torch.Tensor]  # "sigmas_{n}", "timesteps_{n}" for each exported step count

    @property
    def steps(self) -> list[int]:
        return sorted(int(k.split("_")[1]) for k in self.tensors if k.startswith("sigmas_"))

    def sigmas(self, steps: int) -> torch.Tensor:
        if f"sigmas_{steps}" not in self.tensors:
            raise KeyError(f"no schedule for {steps} steps; the packages were exported for {self.steps} "
                           "(export again with this step count).")
        return self.tensors[f"sigmas_{steps}"]

    def timesteps(self, steps: int) -> torch.Tensor:
        self.sigmas(steps)
        return self.tensors[f"timesteps_{steps}"]

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.meta["dtype"])

    @property
    def device(self) -> torch.device:
        """Where the packages were compiled for (and so where every input must be)."""
        return torch.device(self.meta.get("device", "cpu"))


def save_schedule(path: str | Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"meta": json.dumps(meta)})
    return Path(path)


def load_schedule(path: str | Path) -> Schedule:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    return Schedule(meta, tensors)


class PackageRunner:
    """A ``.pt2`` package called with positional tensors, through torch's C++ package loader alone.

    ``torch._inductor.aoti_load_package`` does the same but first imports ``torch._inductor`` (and with it dynamo
    and sympy): about 2 s of a cold start here, for nothing these packages need (tensors in, tensors out).
    """

    def __init__(self, path: str | Path):
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        outputs = self.loader.boxed_run(list(tensors))
        return outputs[0] if len(outputs) == 1 else outputs


def load_package(path: str | Path, lean: bool = True):
    """One ``.pt2`` package, ready to call (compiled code and weights, no tracing).

    ``lean``: the C++ loader only (``PackageRunner``); otherwise ``torch._inductor.aoti_load_package``.
    """
    if lean:
        return PackageRunner(path)
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(path))


def load_constants(package, path: str | Path, device: torch.device) -> int:
    """Hand a package exported without its weights (``aoti._compile``'s ``constants_out``) the tensors of the
    safetensors file ``path``, read straight to ``device`` and used in place (no copy). Returns bytes read."""
    from safetensors.torch import load_file

    constants = load_file(str(path), device=str(device))
    loader = package.loader
    missing = sorted(set(loader.get_constant_fqns()) - set(constants))
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} weights the package needs (first: {missing[0]}); export the "
                         "package and its weights together again (aoti.export_all).")
    loader.load_constants(constants, False, True, True)  # active buffer, every constant, user-managed (no copy)
    package.constants = constants  # the package uses these tensors in place: keep them alive with it
    return sum(t.numel() * t.element_size() for t in constants.values())


def load_transformer(path: str | Path, device: torch.device, lean: bool = True):
    """The transformer package at ``path``, with its weights from beside it when they were exported apart."""
    path = Path(path)
    package = load_package(path, lean)
    if (path.parent / TRANSFORMER_CONSTANTS).exists():
        load_constants(package, path.parent / TRANSFORMER_CONSTANTS, device)
    return package


# ------------------------------------------------------------------------------- stock pipeline arithmetic
def image_tensor(images: list[Image.Image]) -> torch.Tensor:
    """``VaeImageProcessor.preprocess`` for images already at the request size: (B, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(i.convert("RGB")).astype(np.float32) / 255.0 for i in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0


def mask_tensor(masks: list[Image.Image]) -> torch.Tensor:
    """The Fill mask processor (grayscale, binarized at 0.5, not normalized): (B, 1, H, W) of 0/1."""
    arr = np.stack([np.asarray(m.convert("L")).astype(np.float32) / 255.0 for m in masks])[:, None]
    m = torch.from_numpy(arr)
    return (m >= 0.5).to(m.dtype)


def gaussian_sample(moments: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """``DiagonalGaussianDistribution.sample`` with one CPU generator per batch row."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    draw = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g, dtype=mean.dtype) for g in generators])
    return mean + std * draw.to(mean.device)  # drawn on the CPU generators, as diffusers' randn_tensor does


def redux_pixels(garments: list[Image.Image], size: int) -> torch.Tensor:
    """The Redux SiglipImageProcessor (RGB, bicubic resize, [-1, 1]) in PIL and numpy; within 1 ulp of it."""
    arr = np.stack([np.asarray(g.convert("RGB").resize((size, size), Image.BICUBIC)).astype(np.float32)
                    for g in garments])
    return torch.from_numpy((arr * np.float32(1 / 255) - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def conditioning(redux, text: dict[str, torch.Tensor], garments: list[Image.Image], size: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``pipeline.conditioning`` without diffusers: cached text embeddings, then each garment's Redux tokens."""
    device = text["prompt_embeds"].device
    tokens = torch.cat([redux(redux_pixels([g], size).to(device, dtype)) for g in garments])
    batch = tokens.shape[0]
    prompt_embeds = torch.cat([text["prompt_embeds"].expand(batch, -1, -1).to(tokens.dtype), tokens], dim=1)
    return prompt_embeds, text["pooled"].expand(batch, -1)


@dataclass
class ColdInputs:
    """The transformer's inputs for one request batch, made before the loop."""

    hidden: torch.Tensor  # (B, tokens, latent + masked latent + mask channels); [..., :latent_channels] are latents
    latent_channels: int
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    image_ids: torch.Tensor
    guidance: torch.Tensor


@torch.no_grad()
def prepare_inputs(encoder, schedule: Schedule, images: list[Image.Image], masks: list[Image.Image],
                   prompt_embeds: torch.Tensor, pooled: torch.Tensor, seeds: list[int]) -> ColdInputs:
    """Steps 3-6 of ``FluxFillPipeline.__call__`` for one diptych size, with ``encoder`` the exported VAE encoder.

    The stock pipeline encodes the unmasked image and samples from it (one draw per generator), then mixes it with
    noise at the first sigma, which is 1.0 for Fill (strength 1): the result is the noise alone. So the draw is made
    and dropped, keeping each generator's stream as stock, and the unmasked image is never encoded.
    """
    m = schedule.meta
    dtype, vsf, batch = schedule.dtype, m["vae_scale_factor"], len(seeds)
    if (images[0].size[1], images[0].size[0]) != (m["height"], m["width"]) or batch != m["batch"]:
        raise ValueError(f"the packages were exported for batch {m['batch']} of {m['width']}x{m['height']} diptychs; "
                         f"got {batch} of {images[0].size[0]}x{images[0].size[1]}.")
    if m["first_sigma"] != 1.0:
        raise ValueError("the cold path skips the unmasked-image encode, which needs the first sigma to be 1.0")
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    c, h, w = m["latent_channels"], 2 * (m["height"] // (vsf * 2)), 2 * (m["width"] // (vsf * 2))
    noise = []
    for g in generators:
        torch.randn((1, c, h, w), generator=g, dtype=dtype)  # the unmasked image's sample, unused at sigma 1
        noise.append(torch.randn((1, c, h, w), generator=g, dtype=dtype))
    device = schedule.device
    latents = pack(torch.cat(noise)).to(device)
    init = image_tensor(images).to(device)
    mask = mask_tensor(masks).to(device)
    masked = (init * (1 - mask)).to(dtype)
    moments = encoder(masked)
    masked_latents = (gaussian_sample(moments, generators) - m["shift_factor"]) * m["scaling_factor"]
    hidden = torch.cat((latents, pack(masked_latents.to(dtype)), mask_latents(mask.to(dtype), vsf)), dim=-1)
    return ColdInputs(hidden=hidden, latent_channels=latents.shape[-1], prompt_embeds=prompt_embeds.to(device, dtype),
                      pooled=pooled.to(device, dtype),
                      text_ids=torch.zeros(prompt_embeds.shape[1], 3, dtype=dtype, device=device),
                      image_ids=image_ids(m["height"], m["width"], vsf, dtype).to(device),
                      guidance=torch.full([batch], float(m["guidance_scale"]), dtype=torch.float32, device=device))


@torch.no_grad()
def denoise_exported(transformer, inputs: ColdInputs, schedule: Schedule, steps: int) -> torch.Tensor:
    """The Fill loop: transformer on [latents | conditioning], then FlowMatchEulerDiscrete's Euler step
    ``(x.float() + (sigma_next - sigma) * v).to(v.dtype)``; returns the final packed latents."""
    sigmas, timesteps = schedule.sigmas(steps), schedule.timesteps(steps)
    hidden = inputs.hidden.clone()
    n, batch = inputs.latent_channels, hidden.shape[0]
    for i in range(steps):
        t = timesteps[i].expand(batch).to(hidden.device, hidden.dtype) / 1000
        v = transformer(hidden, t, inputs.guidance, inputs.pooled, inputs.prompt_embeds, inputs.text_ids,
                        inputs.image_ids)
        latents = hidden[..., :n]
        hidden[..., :n] = (latents.float() + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
    return hidden[..., :n].clone()


@torch.no_grad()
def run_exported(transformer_pkg, vae_pkg, inputs: ColdInputs, schedule: Schedule,
                 steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoise then decode; returns (packed latents, images in [-1, 1] as (B, 3, H, W)).

    ``transformer_pkg`` / ``vae_pkg``: loaded packages (``load_package``) or paths to ``.pt2`` files.
    """
    transformer = (load_transformer(transformer_pkg, schedule.device) if isinstance(transformer_pkg, str | Path)
                   else transformer_pkg)
    decoder = load_package(vae_pkg) if isinstance(vae_pkg, str | Path) else vae_pkg
    latents = denoise_exported(transformer, inputs, schedule, steps)
    return latents, decoder(latents)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """The stock ``postprocess(output_type='pil')`` arithmetic."""
    x = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
    return [Image.fromarray(a) for a in (x * 255).round().to(torch.uint8).numpy()]


HEAVY_MODULES = ("diffusers", "transformers", "peft", "torchao", "tryon_lab.configure", "tryon_lab.loading",
                 "torch._inductor", "torch._dynamo", "sympy")  # what the cold path exists to leave out


@dataclass
class ColdPackages:
    """Everything the cold path loads from an export folder, ready to run requests."""

    schedule: Schedule
    transformer: object
    encoder: object
    decoder: object
    redux: object | None = None  # with ``text``: the conditioning made here (else the caller brings it)
    text: dict[str, torch.Tensor] | None = None
    weights_bytes: int = 0  # the transformer's weights read from beside its package


def load_packages(folder: str | Path, lean: bool = True, with_redux: bool = True, on_stage=None) -> ColdPackages:
    """The packages of ``folder`` (``on_stage("artifacts")`` after the compiled code), then the transformer's
    weights when they were exported apart and the saved text embeddings (``on_stage("weights")``)."""
    folder, on_stage = Path(folder), on_stage or (lambda name: None)
    schedule = load_schedule(folder / SCHEDULE)
    names = (TRANSFORMER, VAE_ENCODER, VAE_DECODER, *((REDUX,) if with_redux else ()))
    transformer, encoder, decoder, *redux = (load_package(folder / n, lean) for n in names)
    on_stage("artifacts")
    p = ColdPackages(schedule, transformer, encoder, decoder, redux[0] if redux else None)
    if (folder / TRANSFORMER_CONSTANTS).exists():
        p.weights_bytes = load_constants(transformer, folder / TRANSFORMER_CONSTANTS, schedule.device)
    if with_redux:
        from safetensors.torch import load_file

        p.text = load_file(str(folder / TEXT), device=str(schedule.device))
    if schedule.device.type == "cuda":
        torch.cuda.synchronize(schedule.device)
    on_stage("weights")
    return p


@torch.no_grad()
def run_request(p: ColdPackages, images: list[Image.Image], masks: list[Image.Image], seeds: list[int], steps: int,
                prompt_embeds: torch.Tensor | None = None, pooled: torch.Tensor | None = None, on_stage=None,
                transformer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One request batch of diptychs: conditioning (the Redux tokens of each garment half, unless the caller gives
    ``prompt_embeds``/``pooled``), inputs, the Fill loop, the decode; ``on_stage(name)`` after each ("redux",
    "prepare", "denoise", "decode"). ``transformer``: a stand-in for ``p.transformer`` (a timing wrapper).
    Returns (packed latents, images in [-1, 1] as (B, 3, H, W))."""
    on_stage, m = on_stage or (lambda name: None), p.schedule.meta
    if prompt_embeds is None or pooled is None:
        garments = [i.crop((0, 0, m["width"] // 2, m["height"])) for i in images]
        prompt_embeds, pooled = conditioning(p.redux, p.text, garments, m["redux_size"], p.schedule.dtype)
        on_stage("redux")
    inputs = prepare_inputs(p.encoder, p.schedule, images, masks, prompt_embeds, pooled, seeds)
    on_stage("prepare")
    latents = denoise_exported(transformer or p.transformer, inputs, p.schedule, steps)
    on_stage("denoise")
    image = p.decoder(latents)
    on_stage("decode")
    return latents, image


def cold_tryon(folder: str | Path, images: list[Image.Image], masks: list[Image.Image], seeds: list[int], steps: int,
               prompt_embeds: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
               lean: bool = True) -> dict:
    """``load_packages`` + ``run_request`` for one batch (``lean``: as ``load_package``); tensors, stage seconds."""
    seconds, clock = {}, [time.perf_counter()]

    def stage(name: str) -> None:
        now, key = time.perf_counter(), "load_packages" if name in ("artifacts", "weights") else name
        seconds[key] = seconds.get(key, 0.0) + now - clock[0]
        clock[0] = now

    p = load_packages(folder, lean, with_redux=prompt_embeds is None or pooled is None, on_stage=stage)
    latents, image = run_request(p, images, masks, seeds, steps, prompt_embeds, pooled, on_stage=stage)
    return {"latents": latents, "image": image, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    """Child-process entry: FOLDER (packages), INPUTS (a safetensors file with ``prompt_embeds``, ``pooled``,
    ``images`` uint8 (B, H, W, 3), ``masks`` uint8 (B, H, W), optional ``prompt_embeds`` and ``pooled`` (else Redux runs
    from the package); metadata ``seeds``, ``steps``), OUT (safetensors of
    ``latents`` and ``image``), and ``--inductor-loader`` to load through ``torch._inductor`` instead of the lean
    loader. Prints one JSON line: stage seconds and the heavy modules this process holds."""
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()
    args = argv if argv is not None else sys.argv[1:]
    folder, inputs_file, out = args[:3]
    from safetensors import safe_open

    with safe_open(inputs_file, "pt") as f:
        meta = f.metadata()
    t = load_file(inputs_file)
    images = [Image.fromarray(a) for a in t["images"].numpy()]
    masks = [Image.fromarray(a, "L") for a in t["masks"].numpy()]
    result = cold_tryon(folder, images, masks, json.loads(meta["seeds"]), int(meta["steps"]), t.get("prompt_embeds"),
                        t.get("pooled"), lean="--inductor-loader" not in args)
    save_file({"latents": result["latents"].contiguous(), "image": result["image"].contiguous()}, out)
    print(json.dumps({"seconds": result["seconds"], "main_s": time.perf_counter() - start,
                      "modules": [m for m in HEAVY_MODULES if m in sys.modules]}))


if __name__ == "__main__":
    main()
