"""Compilation of the FLUX transformer: regional or full ``torch.compile``, the artefact cache, the recompile guard.

- Regional: diffusers ``compile_repeated_blocks`` (one double- and one single-stream block compiled and
  reused by their siblings, so compile time stays small); full: ``module.compile``.
- Compile-artefact cache: ``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``, so a fresh
  process skips most compile work.
- Recompile guard: dynamo's graph counter and ``set_stance("fail_on_recompile")`` prove steady state.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from .quant import check_mode

COMPILE_MODES = ("none", "regional", "full")

def check_compile_mode(mode: str) -> None:
    check_mode(mode, COMPILE_MODES, "compile")


def compile_transformer(transformer: torch.nn.Module, how: str = "none", backend: str = "inductor",
                        fullgraph: bool = True, exact_casts: bool = True, **compile_kwargs) -> torch.nn.Module:
    """Compile in place: ``regional`` = diffusers ``compile_repeated_blocks``, ``full`` = ``module.compile``.

    Both keep the module object, so the pipeline that holds it needs no change. Compilation is lazy:
    the first call pays for it (measure it as first call minus a steady call).

    ``exact_casts`` (whole-model inductor compile): round to the model dtype wherever eager does (inductor's
    ``emulate_precision_casts``). By default inductor keeps such intermediates in fp32. Regional compile leaves the
    top level (embeddings, norms around the blocks) eager; whole-model compile does not, and its full-size output
    moved by rel-L2 0.08 against eager on the H200, against 0.008 for regional compile (on the CPU toy model
    0.0135, and 0.0053 with exact casts).
    """
    check_mode(how, COMPILE_MODES, "compile")
    kwargs = dict(fullgraph=fullgraph, backend=backend, **compile_kwargs)  # may hold torch.compile's own ``mode``
    if how == "full" and exact_casts and backend == "inductor":  # torch.compile takes a mode or options, not both
        mode = kwargs.pop("mode", None)
        mode_options = torch._inductor.list_mode_options(mode) if mode else {}
        kwargs["options"] = {**mode_options, **kwargs.get("options", {}), "emulate_precision_casts": True}
    if how == "regional":
        transformer.compile_repeated_blocks(**kwargs)
    elif how == "full":
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


# ----------------------------------------------------------------------------- GELU as a sigmoid
_SQRT_8_OVER_PI = 1.5957691216057308  # 2 * sqrt(2 / pi)


def gelu_tanh_as_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh form, x/2 * (1 + tanh(z)) with z = sqrt(2/pi) (x + 0.044715 x^3), written as x * sigmoid(2z):
    the same function (1 + tanh(z) = 2 sigmoid(2z)), in fp32 as eager GELU computes it. Compiled, the sigmoid is
    one fast exponential where inductor's tanh is libdevice's accurate one, the heaviest part of the fused
    GELU + FP8-quantize kernels, which are bound by arithmetic, not memory, on the H200."""
    g = x.float()
    return (g * torch.sigmoid(_SQRT_8_OVER_PI * (g + 0.044715 * g * g * g))).to(x.dtype)


class SigmoidGELU(torch.nn.Module):
    """``nn.GELU(approximate="tanh")`` computed by ``gelu_tanh_as_sigmoid``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh_as_sigmoid(x)


def sigmoid_gelu(transformer: torch.nn.Module) -> int:
    """Compute every tanh-form GELU of ``transformer`` as ``gelu_tanh_as_sigmoid``, in place; returns how many.
    diffusers' ``GELU`` (the double blocks' feed-forward) keeps its projection and takes the new activation; a
    bare ``nn.GELU(approximate="tanh")`` (the single blocks' ``act_mlp``) is replaced by ``SigmoidGELU``."""
    from diffusers.models.activations import GELU

    changed = 0
    for parent in list(transformer.modules()):
        if isinstance(parent, GELU) and parent.approximate == "tanh":
            parent.gelu = gelu_tanh_as_sigmoid
            changed += 1
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.GELU) and child.approximate == "tanh":
                setattr(parent, name, SigmoidGELU())
                changed += 1
    return changed
