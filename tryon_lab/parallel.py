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
    return transformer


def compile_problem(cp: ContextParallel, compile: str) -> str | None:
    """Why ``compile`` cannot be combined with ``cp``, or None."""
    if compile != "none" and cp.anything:
        return ("torch.compile cannot trace diffusers' ulysses_anything / ring_anything attention (it exchanges "
                "token counts through the process group); compile needs anything=False, i.e. image and text "
                "token counts divisible by the degree (the try-on's 512 + 729 text tokens are not divisible by 2).")
    return None
