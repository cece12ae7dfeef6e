"""FLUX Fill's request setup as plain functions, and the parts of a Fill pipeline without the pipeline class.

diffusers' ``FluxFillPipeline`` module imports the CLIP and T5 classes from transformers at its top, and
transformers brings 1.6-2.4 s of imports into every fresh process (H200 serving runs 16-19), although the slim
pipeline never loads a text encoder. A serving process that leaves transformers out (``configure`` option
``redux_process``: SigLIP runs in a process of its own) builds ``FillParts`` instead: the transformer, VAE and
scheduler, diffusers' own image processors, and nothing that needs transformers. The hot path (``hotpath.py``)
prepares every request through the functions below for both, so one code path serves both objects:

    timesteps            the stock sigmas and their resolution shift, set on diffusers' scheduler
    noise_latents        the initial latents, with each generator's draws in the stock order
    masked_latents       the masked image through the VAE, sampled as the stock pipeline samples it
    pack / unpack / image_ids / mask_latents   FLUX's 2x2 token packing and positions

Each is equal to the stock pipeline's step bit for bit (tests/test_fill_setup.py compares them on the toy model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, C * 4), FLUX's 2x2 patch packing."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """The inverse of ``pack`` for an image of ``height`` x ``width`` pixels."""
    b, _, c = latents.shape
    h, w = latent_size(height, width, vae_scale_factor)
    x = latents.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c // 4, h, w)


def latent_size(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """The latent grid of an image, rounded down to whole 2x2 patches."""
    return 2 * (int(height) // (vae_scale_factor * 2)), 2 * (int(width) // (vae_scale_factor * 2))


def image_ids(height: int, width: int, vae_scale_factor: int, dtype: torch.dtype) -> torch.Tensor:
    """Positions of the packed image tokens (0, row, column), as the stock pipeline makes them."""
    h, w = height // vae_scale_factor // 2, width // vae_scale_factor // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(dtype)


def mask_latents(mask: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """Each 8x8 pixel block of the (B, 1, H, W) mask as 64 channels, packed like the latents."""
    b, _, hp, wp = mask.shape
    h, w = latent_size(hp, wp, vae_scale_factor)
    m = mask[:, 0].view(b, h, vae_scale_factor, w, vae_scale_factor).permute(0, 2, 4, 1, 3)
    return pack(m.reshape(b, vae_scale_factor * vae_scale_factor, h, w))


def timesteps(scheduler, steps: int, height: int, width: int, vae_scale_factor: int, device) -> torch.Tensor:
    """The Fill schedule: sigmas 1 .. 1/steps, shifted for the image's token count (``mu``, linear in it from the
    scheduler's base to its max shift), set on ``scheduler`` with its begin index at 0 (strength 1)."""
    cfg = scheduler.config
    tokens = (int(height) // vae_scale_factor // 2) * (int(width) // vae_scale_factor // 2)
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = tokens * slope + (base_shift - slope * base_len)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler.timesteps


@torch.no_grad()
def noise_latents(vae, scheduler, init_image: torch.Tensor, generators: list[torch.Generator], channels: int,
                  vae_scale_factor: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The packed initial latents: noise mixed with the image's latents at the first sigma.

    The stock pipeline samples each image's latents (one draw per generator), then draws the noise. Fill starts at
    sigma 1.0, where the mix is the noise alone: the image's draws are still made, so every generator continues as
    in the stock pipeline, but the image is not encoded."""
    from diffusers.utils.torch_utils import randn_tensor

    batch, (h, w) = init_image.shape[0], latent_size(init_image.shape[-2], init_image.shape[-1], vae_scale_factor)
    first_sigma = float(scheduler.sigmas[scheduler.begin_index or 0])
    image = init_image.to(device=device, dtype=dtype)
    if first_sigma == 1.0:
        shape = (1, vae.config.latent_channels, image.shape[-2] // vae_scale_factor, image.shape[-1] // vae_scale_factor)
        for g in generators:  # the sample of each image's latent distribution, unused at sigma 1
            randn_tensor(shape, generator=g, device=vae.device, dtype=vae.dtype)
        image_latents = None
    else:
        sampled = [vae.encode(image[i:i + 1]).latent_dist.sample(g) for i, g in enumerate(generators)]
        image_latents = (torch.cat(sampled) - vae.config.shift_factor) * vae.config.scaling_factor
    noise = randn_tensor((batch, channels, h, w), generator=generators, device=device, dtype=dtype)
    if image_latents is not None:
        noise = scheduler.scale_noise(image_latents, scheduler.timesteps[:1].repeat(batch), noise)
    return pack(noise)


@torch.no_grad()
def masked_latents(vae, masked_image: torch.Tensor, generators: list[torch.Generator], dtype: torch.dtype,
                   device) -> torch.Tensor:
    """The masked image (already on ``device`` in ``dtype``) through the VAE encoder, sampled with one draw per
    generator, shifted and scaled as the transformer reads latents, packed."""
    sampled = vae.encode(masked_image).latent_dist.sample(generators)
    return pack(((sampled - vae.config.shift_factor) * vae.config.scaling_factor).to(device=device, dtype=dtype))


@dataclass
class FillParts:
    """What the hot path and the decode read of a ``FluxFillPipeline``, without importing its module (and so
    transformers): the three models, diffusers' image processors made as the pipeline makes them, and the
    execution device. It runs ``hotpath.denoise_hot`` only: it is not callable as a pipeline."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    device: str

    def __post_init__(self):
        from diffusers.image_processor import VaeImageProcessor

        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        latent_channels = self.vae.config.latent_channels
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2,
                                                 vae_latent_channels=latent_channels)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2,
                                                vae_latent_channels=latent_channels, do_normalize=False,
                                                do_binarize=True, do_convert_grayscale=True)
        self.joint_attention_kwargs = None

    @property
    def _execution_device(self) -> torch.device:  # the name the pipeline's callers read
        return torch.device(self.device)

    def maybe_free_model_hooks(self) -> None:
        """Nothing to free: no offload hooks on these parts (the pipeline's call ends with this)."""

    def set_progress_bar_config(self, **_) -> None:
        """The hot path has its own progress bar."""
