"""Past one GPU: one image over several GPUs (context parallelism).

One image, several GPUs: diffusers' context parallelism (``ContextParallelConfig`` + ``enable_parallelism`` on
the transformer). Every rank holds the whole (slim, optionally FP8) model; the transformer's input tokens are
split over the ranks and attention exchanges them: Ulysses by all-to-all over heads, ring by passing K/V around.
Launch one process per GPU with ``torchrun`` (``scripts/run_context_parallel.py``); every rank computes the same
noise (CPU generators), the same Redux tokens and the same decoded image, rank 0 saves it.

Sweeps and TeaCache calibration over a Ray cluster live in ``jobs`` (Ray tasks) and
``experiments.ray_calibration`` (Ray actors).

diffusers places a rank on device ``rank % torch.accelerator.device_count()``, which has no CPU answer: context
parallelism needs an accelerator (the CPU/gloo tests count the CPU as one device themselves).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook

# attention backends whose kernel returns the log-sum-exp that ring attention merges partial results with
RING_BACKEND = "_native_cudnn"  # torch's cuDNN SDPA (bf16/fp16 on CUDA); "flash" / "_native_flash" also work


# ----------------------------------------------------------------------------- context parallelism
@dataclass
class ContextParallel:
    """How one image is split over ``ring_degree * ulysses_degree`` processes (one per GPU).

    Ulysses runs on diffusers' ``native`` backend (torch SDPA, any device); ring (and ring x Ulysses) needs a
    backend that returns the log-sum-exp, which torch's plain SDPA does not: ``_native_cudnn`` by default.
    ``anything``: diffusers' ``ulysses_anything`` / ``ring_anything``, so token counts need not divide by the
    degree (the try-on's 512 T5 + 729 Redux text tokens are odd); it needs one of the two degrees to be 1.
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    attention_backend: str | None = None
    anything: bool = True
    split_vae: bool = False  # each rank encodes and decodes a band of the image's rows (split_vae, below)
    # 0: diffusers' Ulysses (an all-to-all each for Q, K, V and the output); n >= 1: Q, K and V in one all-to-all,
    # the heads in n chunks, every chunk's exchange started before the first attends (``ChunkedUlysses``, below)
    ulysses_chunks: int = 0

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def backend(self) -> str:
        return self.attention_backend or ("native" if self.ring_degree == 1 else RING_BACKEND)

    def diffusers_config(self):
        from diffusers import ContextParallelConfig

        one_kind = self.ulysses_degree == 1 or self.ring_degree == 1
        return ContextParallelConfig(ring_degree=self.ring_degree, ulysses_degree=self.ulysses_degree,
                                     ulysses_anything=self.anything and one_kind and self.ulysses_degree > 1,
                                     ring_anything=self.anything and one_kind and self.ring_degree > 1)


def context_parallel_problem(transformer: torch.nn.Module, cp: ContextParallel, world_size: int) -> str | None:
    """Why ``cp`` cannot run on this transformer and process group, or None (checked before any hook is set)."""
    if cp.world_size != world_size:
        return (f"ring_degree x ulysses_degree = {cp.world_size}, but {world_size} processes were started; "
                f"launch with torchrun --nproc-per-node {cp.world_size}.")
    heads = transformer.config.num_attention_heads
    if heads % cp.ulysses_degree:
        return f"Ulysses splits the {heads} attention heads; ulysses_degree {cp.ulysses_degree} does not divide them."
    if cp.ring_degree > 1 and cp.backend == "native":
        return "ring attention needs a backend that returns the log-sum-exp (e.g. _native_cudnn, flash); native does not."
    if cp.ulysses_chunks:
        if cp.anything or cp.ring_degree > 1:
            return ("ulysses_chunks replaces the even Ulysses split only: use anything=False (text padded to the "
                    "degree) and ring_degree=1, or ulysses_chunks=0.")
        if (heads // cp.ulysses_degree) % cp.ulysses_chunks:
            return (f"ulysses_chunks {cp.ulysses_chunks} does not divide the {heads // cp.ulysses_degree} heads each "
                    "rank attends; choose a divisor.")
    return None


def init_distributed() -> tuple[int, int, str]:
    """Join the process group ``torchrun`` describes (NCCL on GPUs, gloo on CPU); returns (rank, world, device)."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if cuda:
        torch.cuda.set_device(local)
    return rank, dist.get_world_size(), f"cuda:{local}" if cuda else "cpu"


def enable_context_parallel(transformer: torch.nn.Module, cp: ContextParallel) -> torch.nn.Module:
    """Apply diffusers' context parallelism to a loaded (and, if wanted, FP8-quantized) transformer, in place.

    Call inside an initialised process group, after quantizing and before compiling: the hooks split the
    inputs and gather ``proj_out`` around whatever the blocks are.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("context parallelism needs a process group: launch with torchrun and call init_distributed().")
    if problem := context_parallel_problem(transformer, cp, dist.get_world_size()):
        raise ValueError(f"context parallelism: {problem}")
    if torch.accelerator.device_count() == 0:
        raise RuntimeError("diffusers places each rank on an accelerator (rank % device count); this machine has none.")
    transformer.set_attention_backend(cp.backend)
    transformer.enable_parallelism(config=cp.diffusers_config())
    use_chunked_ulysses(cp.ulysses_chunks)
    return transformer


# ----------------------------------------------------------------------------- Ulysses with one exchange for Q, K, V
_DIFFUSERS: dict = {}  # diffusers' own Ulysses class, kept the first time it is swapped


def _chunked_ulysses(query, key, value, scale, forward_op, parallel_config, chunks: int) -> torch.Tensor:
    """Ulysses attention (B, S_local, H, D) -> (B, S_local, H, D) with Q, K and V sent together, in ``chunks``
    groups of each rank's heads: every group's all-to-all is started first, then each group attends as soon as its
    own arrives and sends its output back while the next group attends."""
    from diffusers.models.attention_dispatch import _wait_tensor
    from torch.distributed import _functional_collectives as funcol

    cfg = parallel_config.context_parallel_config
    group, world = cfg._ulysses_mesh.get_group(), cfg.ulysses_degree
    b, s, h, d = query.shape
    per = h // world // chunks  # heads in one group of one rank
    qkv = torch.stack((query, key, value)).reshape(3, b, s, world, chunks, per, d)
    # chunk c for rank r: (r, my tokens, q/k/v, batch, its heads); received: every rank's tokens, rank-major
    arrived = [funcol.all_to_all_single(qkv[:, :, :, :, c].permute(3, 2, 0, 1, 4, 5).contiguous().flatten(),
                                        None, None, group) for c in range(chunks)]
    sent_back = []
    for x in arrived:
        x = _wait_tensor(x).reshape(world * s, 3, b, per, d)
        q, k, v = (x[:, i].permute(1, 0, 2, 3).contiguous() for i in range(3))  # (B, S, heads, D)
        out = forward_op(None, q, k, v, None, 0.0, False, scale, False, False, _save_ctx=False,
                         _parallel_config=parallel_config)
        sent_back.append(funcol.all_to_all_single(
            out.reshape(b, world, s, per, d).permute(1, 3, 0, 2, 4).contiguous().flatten(), None, None, group))
    out = torch.stack([_wait_tensor(o).reshape(world, per, b, s, d) for o in sent_back], dim=1)
    return out.flatten(0, 2).permute(1, 2, 0, 3).contiguous()  # heads back in order: rank, chunk, head


def use_chunked_ulysses(chunks: int) -> None:
    """Route diffusers' even Ulysses split through ``_chunked_ulysses`` (``chunks`` >= 1) or back to diffusers'
    own (0). Process-wide: diffusers looks its Ulysses class up in ``attention_dispatch`` at every call, and a
    context-parallel process runs one model. Masks, log-sum-exp merges and anything that needs gradients keep
    diffusers' path."""
    from diffusers.models import attention_dispatch as dispatch

    original = _DIFFUSERS.setdefault("ulysses", dispatch.TemplatedUlyssesAttention)
    if not chunks:
        dispatch.TemplatedUlyssesAttention = original
        return

    class ChunkedUlysses(original):
        @staticmethod
        def forward(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                    forward_op, backward_op, _parallel_config=None):
            if (attn_mask is not None or return_lse or dropout_p or is_causal or enable_gqa
                    or any(t.requires_grad for t in (query, key, value))):
                return original.forward(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                        return_lse, forward_op, backward_op, _parallel_config)
            return _chunked_ulysses(query, key, value, scale, forward_op, _parallel_config, chunks)

    dispatch.TemplatedUlyssesAttention = ChunkedUlysses


def compile_problem(cp: ContextParallel, compile: str) -> str | None:
    """Why ``compile`` cannot be combined with ``cp``, or None."""
    if compile != "none" and cp.anything:
        return ("torch.compile cannot trace diffusers' ulysses_anything / ring_anything attention (it exchanges "
                "token counts through the process group); compile needs anything=False, i.e. image and text "
                "token counts divisible by the degree (the try-on's 512 + 729 text tokens are not divisible by 2).")
    return None


# ----------------------------------------------------------------------------- the VAE over the ranks
VAE_HALO = 16  # latent rows each side of a band; on the FLUX VAE decoder 16 gives the unsplit output to 1.6e-6, 8 to 1e-4


class _Band:
    """The rows a rank's encoder or decoder call runs on (``lo:hi``, input units) and owns (``own_lo:own_hi``)."""

    active = False
    lo = hi = own_lo = own_hi = 0

    def own(self, x: torch.Tensor) -> tuple[int, int]:
        """This rank's own rows of ``x``, an activation of the band at any resolution inside the call."""
        scale = x.shape[-2] / (self.hi - self.lo)
        return round((self.own_lo - self.lo) * scale), round((self.own_hi - self.lo) * scale)


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=-2)


class SplitRowsHook(ModelHook):
    """The encoder or decoder on this rank's band of rows plus ``halo`` rows each side; every rank's own rows are
    gathered into the whole output. Inputs whose rows do not split into bands of whole ``unit`` rows run whole."""

    def __init__(self, band: _Band, halo: int, unit: int) -> None:
        super().__init__()
        self.band, self.halo, self.unit = band, halo, unit

    def new_forward(self, module: torch.nn.Module, sample: torch.Tensor, *args, **kwargs):
        import torch.distributed as dist

        forward, b = self.fn_ref.original_forward, self.band
        world, rank, rows = dist.get_world_size(), dist.get_rank(), sample.shape[-2]
        if rows % (world * self.unit) or b.active:
            return forward(sample, *args, **kwargs)
        size = rows // world
        b.own_lo, b.own_hi = rank * size, (rank + 1) * size
        b.lo, b.hi = max(0, b.own_lo - self.halo), min(rows, b.own_hi + self.halo)
        b.active = True
        try:
            out = forward(sample[..., b.lo:b.hi, :], *args, **kwargs)
        finally:
            b.active = False
        r0, r1 = b.own(out)
        return _gather_rows(out[..., r0:r1, :])


class BandGroupNormHook(ModelHook):
    """GroupNorm with the statistics of the whole image: sums over every rank's own rows, all-reduced."""

    def __init__(self, band: _Band) -> None:
        super().__init__()
        self.band = band

    def new_forward(self, module: torch.nn.GroupNorm, x: torch.Tensor):
        import torch.distributed as dist

        if not self.band.active:
            return self.fn_ref.original_forward(x)
        r0, r1 = self.band.own(x)
        n, c, groups = x.shape[0], x.shape[1], module.num_groups
        own = x[..., r0:r1, :].float().reshape(n, groups, -1)
        sums = torch.stack([own.sum(-1), own.square().sum(-1)])
        dist.all_reduce(sums)
        count = own.shape[-1] * dist.get_world_size()
        mean = sums[0] / count
        var = sums[1] / count - mean.square()
        y = ((x.float().reshape(n, groups, -1) - mean[..., None]) * torch.rsqrt(var[..., None] + module.eps))
        y = y.reshape(x.shape)
        if module.affine:
            y = y * module.weight.view(1, c, 1, 1) + module.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


class BandAttentionHook(ModelHook):
    """The mid-block's self-attention over the whole image: every rank's own rows gathered, the whole input
    attended (the latent grid is small), this rank's band rows returned."""

    def __init__(self, band: _Band) -> None:
        super().__init__()
        self.band = band

    def new_forward(self, module: torch.nn.Module, x: torch.Tensor, *args, **kwargs):
        b, forward = self.band, self.fn_ref.original_forward
        if not b.active:
            return forward(x, *args, **kwargs)
        r0, r1 = b.own(x)
        whole = _gather_rows(x[..., r0:r1, :])
        b.active = False  # inside: plain GroupNorm on the whole input
        try:
            y = forward(whole, *args, **kwargs)
        finally:
            b.active = True
        start = round(b.lo * x.shape[-2] / (b.hi - b.lo))
        return y[..., start:start + x.shape[-2], :]


def split_vae(vae: torch.nn.Module, halo: int = VAE_HALO) -> torch.nn.Module:
    """Encode and decode over the process group, a band of rows per rank (DistVAE's patch parallelism, by rows):
    each rank runs its band plus ``halo`` latent rows each side; GroupNorm statistics and the mid-block's attention
    span the whole image through collectives, so a rank's own rows equal the unsplit output once the halo covers
    the receptive field."""
    from diffusers.models.attention_processor import Attention

    down = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent row
    for part, part_halo, unit in ((vae.encoder, halo * down, down), (vae.decoder, halo, 1)):
        band = _Band()
        for m in part.modules():
            if isinstance(m, torch.nn.GroupNorm):
                HookRegistry.check_if_exists_or_initialize(m).register_hook(BandGroupNormHook(band), "band_norm")
            elif isinstance(m, Attention):
                HookRegistry.check_if_exists_or_initialize(m).register_hook(BandAttentionHook(band), "band_attention")
        HookRegistry.check_if_exists_or_initialize(part).register_hook(SplitRowsHook(band, part_halo, unit),
                                                                       "split_rows")
    return vae

