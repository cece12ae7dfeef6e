"""A denoise loop that allocates nothing per step, and an image copy to the host that does not block.

The stock ``FluxFillPipeline`` loop allocates a handful of tensors every step around the transformer
call (the ``cat`` of latents and mask latents, the expanded and cast timestep, ``timestep / 1000``, the
scheduler's ``dt``, the float32 copy of the latents, the product and the cast back). Here all of them are
computed once or written into buffers made before the loop:

    prepare_state   the stock pipeline's setup through ``fill_setup``'s plain functions, equal to it bit for bit:
                    latents, conditioning, timesteps, ids, guidance
    denoise_hot     the loop: transformer(input buffer) -> Euler step in place, the same arithmetic as
                    ``FlowMatchEulerDiscreteScheduler.step`` so the result is bit-identical
    pixels_to_host  the stock postprocess arithmetic on the device, then a uint8 copy into pinned memory on a
                    side stream; ``HostImages.images()`` waits only when the pixels are read

The transformer's own allocations (activations) are not this loop's to remove; ``count_step_allocations``
separates them from the loop's by reading the allocator's counter at the edges of each transformer call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import fill_setup


@dataclass
class DenoiseState:
    """Everything the loop reads, on the execution device; ``inputs[..., :latent_channels]`` is the latents."""

    inputs: torch.Tensor  # (batch, tokens, latent + conditioning channels): the transformer's hidden_states
    latent_channels: int
    latents32: torch.Tensor  # float32 scratch: the scheduler steps in float32 and casts back
    update: torch.Tensor  # model-dtype scratch for dt * noise_pred
    timesteps: torch.Tensor  # (steps, batch) already cast and divided by 1000, as the stock loop does per step
    dts: torch.Tensor  # (steps,) sigma_next - sigma, float32
    guidance: torch.Tensor | None
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    image_ids: torch.Tensor

    @property
    def latents(self) -> torch.Tensor:
        return self.inputs[..., : self.latent_channels]


@torch.no_grad()
def prepare_state(fill, images: list[Image.Image], masks: list[Image.Image], prompt_embeds: torch.Tensor,
                  pooled: torch.Tensor, height: int, width: int, steps: int, guidance_scale: float,
                  generators: list[torch.Generator]) -> DenoiseState:
    """The stock pipeline's setup (steps 1-6 of ``FluxFillPipeline.__call__``) through ``fill_setup``'s plain
    functions, equal to it bit for bit; ``fill`` is a ``FluxFillPipeline`` or a ``fill_setup.FillParts``."""
    device, dtype, vsf = fill._execution_device, prompt_embeds.dtype, fill.vae_scale_factor
    init_image = fill.image_processor.preprocess(images, height=height, width=width).to(dtype=torch.float32)
    batch = prompt_embeds.shape[0]
    text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=fill.transformer.dtype)
    timesteps = fill_setup.timesteps(fill.scheduler, steps, height, width, vsf, device)
    channels = fill.vae.config.latent_channels
    latents = fill_setup.noise_latents(fill.vae, fill.scheduler, init_image, generators, channels, vsf, dtype, device)
    image_ids = fill_setup.image_ids(height, width, vsf, dtype).to(device)
    mask_image = fill.mask_processor.preprocess(masks, height=height, width=width)
    masked = (init_image * (1 - mask_image)).to(device=device, dtype=dtype)
    masked_latents = fill_setup.masked_latents(fill.vae, masked, generators, dtype, device)
    mask = fill_setup.mask_latents(mask_image.to(device=device, dtype=dtype), vsf)
    inputs = torch.cat((latents, masked_latents, mask), dim=-1)  # the one cat, made once
    guidance = None
    if fill.transformer.config.guidance_embeds:
        guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(batch)
    sig = fill.scheduler.sigmas.to(device)
    return DenoiseState(
        inputs=inputs, latent_channels=latents.shape[-1],
        latents32=torch.empty(latents.shape, dtype=torch.float32, device=device),
        update=torch.empty_like(latents),
        timesteps=(timesteps[:, None].expand(-1, batch).to(latents.dtype) / 1000).contiguous(),
        dts=(sig[1:] - sig[:-1]).to(torch.float32), guidance=guidance, prompt_embeds=prompt_embeds,
        pooled=pooled, text_ids=text_ids, image_ids=image_ids)


@torch.no_grad()
def step(transformer, state: DenoiseState, i: int, attention_kwargs: dict | None = None) -> None:
    """One step: the transformer on the input buffer, then x += dt * v in float32, cast back, all in place."""
    noise_pred = transformer(hidden_states=state.inputs, timestep=state.timesteps[i], guidance=state.guidance,
                             pooled_projections=state.pooled, encoder_hidden_states=state.prompt_embeds,
                             txt_ids=state.text_ids, img_ids=state.image_ids,
                             joint_attention_kwargs=attention_kwargs, return_dict=False)[0]
    # FlowMatchEulerDiscreteScheduler.step: (sample.float() + dt * model_output).to(model_output.dtype)
    torch.mul(state.dts[i], noise_pred, out=state.update)  # this operand order: CPU kernels round differently
    state.latents32.copy_(state.latents)
    state.latents32.add_(state.update)
    state.latents.copy_(state.latents32)


@torch.no_grad()
def denoise_hot(fill, state: DenoiseState, progress: bool = False, on_step=None) -> torch.Tensor:
    """The loop: ``steps`` calls of ``step``; returns the final packed latents (a view into the input buffer)."""
    n = state.timesteps.shape[0]
    kwargs = getattr(fill, "joint_attention_kwargs", None)  # diffusers sets it in its call: unset before the first
    for i in tqdm(range(n), desc="denoise (hot path)", leave=False, disable=not progress):
        step(fill.transformer, state, i, kwargs)
        if on_step is not None:
            on_step(i)
    fill.maybe_free_model_hooks()  # what the stock call does last (offload modes)
    return state.latents


# ------------------------------------------------------------------------------------------ output copy
def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """The stock ``postprocess(output_type='pil')`` arithmetic on the device: (batch, H, W, 3) uint8.

    Stock: ``(x / 2 + 0.5).clamp(0, 1)`` in the VAE dtype, then on the host ``float()``, ``* 255``,
    ``round()``, ``astype(uint8)``; the same float32 operations here give the same bytes.
    """
    x = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
    return (x * 255).round().to(torch.uint8)


@dataclass
class HostImages:
    """Decoded pixels on their way to the host; ``images()`` waits for the copy and makes PIL images."""

    host: torch.Tensor  # uint8 (batch, H, W, 3), pinned on CUDA
    done: torch.cuda.Event | None = None
    source: torch.Tensor | None = None  # the device tensor, kept alive until the copy has finished

    def images(self) -> list[Image.Image]:
        if self.done is not None:
            self.done.synchronize()
            self.done, self.source = None, None
        return [Image.fromarray(a) for a in self.host.numpy()]


@torch.no_grad()
def pixels_to_host(image: torch.Tensor, asynchronous: bool = True, streams: dict | None = None) -> HostImages:
    """Decoded VAE output -> uint8 on the device -> a non-blocking copy into pinned host memory.

    On CUDA the copy runs on a side stream after the decode and the caller goes on (the next request's
    denoise overlaps it); elsewhere, or with ``asynchronous=False``, it is an ordinary copy. ``streams``
    (device -> stream) is the caller's, so one side stream per device is reused (the pipeline owns it).
    """
    pixels = to_uint8(image)
    if pixels.device.type != "cuda" or not asynchronous:
        return HostImages(pixels.cpu())
    streams = {} if streams is None else streams
    if pixels.device not in streams:
        streams[pixels.device] = torch.cuda.Stream(pixels.device)
    stream = streams[pixels.device]
    host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
    stream.wait_stream(torch.cuda.current_stream(pixels.device))
    with torch.cuda.stream(stream):
        host.copy_(pixels, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    return HostImages(host, done, pixels)


# ------------------------------------------------------------------------------------ allocation counts
def _allocations(device) -> int:
    return torch.cuda.memory_stats(device).get("allocation.all.allocated", 0)


class StepAllocations:
    """Counts CUDA allocations per denoise step, split into the transformer's own and the loop's.

    Forward hooks on the transformer read the caching allocator's cumulative allocation counter at the
    start and end of each call; a step is start-to-next-start. Use as a context manager around a run.
    """

    def __init__(self, transformer: torch.nn.Module, device="cuda"):
        self.transformer, self.device = transformer, device
        self.starts: list[int] = []
        self.ends: list[int] = []
        self._handles = []

    def __enter__(self):
        def pre(*_):
            self.starts.append(_allocations(self.device))

        def post(*_):
            self.ends.append(_allocations(self.device))

        self._handles = [self.transformer.register_forward_pre_hook(pre),
                         self.transformer.register_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def per_step(self) -> list[dict]:
        """For each step but the last: allocations in the transformer and outside it (the loop's)."""
        rows = []
        for i in range(len(self.starts) - 1):
            total = self.starts[i + 1] - self.starts[i]
            model = self.ends[i] - self.starts[i]
            rows.append({"step": i, "model": model, "loop": total - model})
        return rows
