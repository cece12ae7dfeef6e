"""FP8 weights for the FLUX transformer with torchao: a knob applied in place, nothing else.

Only the ``nn.Linear`` layers inside the transformer blocks become FP8 (``quantize_``'s ``filter_fn``);
embedders, norms and the output head stay in the model dtype (they are small, and precision matters most
there). LoRA adapter Linears are left alone.
"""

from __future__ import annotations

import fnmatch

import torch

QUANT_MODES = ("none", "fp8_weight_only", "fp8_dynamic_row", "fp8_dynamic_tensor")
BLOCKS = ("transformer_blocks.*", "single_transformer_blocks.*")  # only Linears in here may become FP8
# fnmatch patterns on full module names kept in the model dtype ("*norm*": the AdaLN modulation Linears,
# which see one token per sample, so FP8 saves memory there but no time and costs precision)
DEFAULT_KEEP = ("x_embedder", "context_embedder", "time_text_embed.*", "norm_out.*", "proj_out", "*norm*")


class SpeedConfigError(ValueError):
    """An unknown mode, or a mode this device cannot run; the message names the alternatives."""


def check_mode(mode: str, allowed: tuple[str, ...], what: str) -> None:
    if mode not in allowed:
        raise SpeedConfigError(f"unknown {what} mode {mode!r}; choose one of {', '.join(allowed)}.")


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
    check_mode(mode, QUANT_MODES, "quantization")
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
