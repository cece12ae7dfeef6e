"""FP8 weights for the FLUX transformer with torchao: a knob applied in place, nothing else.

Only the ``nn.Linear`` layers inside the transformer blocks become FP8 (``quantize_``'s ``filter_fn``);
embedders, norms and the output head stay in the model dtype (they are small, and precision matters most
there). LoRA adapter Linears are left alone.

``fp8_static_tensor`` fixes each Linear's activation scale once, from what torchao's observers record during a
calibration run (``quantize_transformer(..., calibrate=...)``), so no amax pass runs per call: the fastest
single-GPU step measured (``benchmarks/bench_gpu.md``).

An FP8 transformer can be saved already quantized (``save_fp8_transformer``: safetensors, torchao's own
flattening of its tensor subclasses, never pickle) and loaded back without the bf16 weights or any
quantization work (``load_fp8_transformer``; ``PipelineOptions.fp8_weights`` in ``configure``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

QUANT_MODES = ("none", "fp8_weight_only", "fp8_dynamic_row", "fp8_dynamic_tensor", "fp8_static_tensor")
STATIC = "fp8_static_tensor"  # FP8 activations with per-tensor scales calibrated once (torchao's observer flow)
_STATIC_TENSOR = "PrototypeFloat8Tensor"  # torchao's weight class of that flow
BLOCKS = ("transformer_blocks.*", "single_transformer_blocks.*")  # only Linears in here may become FP8
# fnmatch patterns on full module names kept in the model dtype ("*norm*": the AdaLN modulation Linears,
# which see one token per sample, so FP8 saves memory there but no time and costs precision)
DEFAULT_KEEP = ("x_embedder", "context_embedder", "time_text_embed.*", "norm_out.*", "proj_out", "*norm*")


FP8_FORMAT = "tryon_lab.fp8/2"  # 2: a fused-QKV folder holds no unused Q/K/V Linears
FP8_FILE = "fp8_transformer.safetensors"  # one file beside config.json: read in one pass, straight to the device


class SpeedConfigError(ValueError):
    """An unknown mode, or a mode this device cannot run; the message names the alternatives."""


class FP8WeightsError(ValueError):
    """A saved FP8 folder that does not fit the request (mode, model, dtype, layout); the message says what to do."""


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


def fp8_matmul_problem(mode: str, device: str | torch.device) -> str | None:
    """Why FP8 ``mode`` cannot run on ``device``, or None: dynamic FP8 needs an FP8 GPU; static FP8 runs on the
    CPU too (torch's CPU float8 matmul, indicative there) but on CUDA needs the same FP8 tensor cores."""
    if mode.startswith("fp8_dynamic") or (mode == STATIC and torch.device(device).type == "cuda"):
        return fp8_dynamic_problem(device)
    return None


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


def fp8_config(mode: str, inductor_tuning: bool = False):
    """The torchao config of an FP8 mode (not ``none``)."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        PerTensor,
    )

    check_mode(mode, QUANT_MODES[1:], "FP8")
    tune = dict(set_inductor_config=inductor_tuning)
    if mode == "fp8_weight_only":
        return Float8WeightOnlyConfig(**tune)
    if mode == STATIC:
        raise SpeedConfigError(f"{STATIC} is calibrated, not configured: quantize_transformer(..., calibrate=fn).")
    granularity = PerRow() if mode == "fp8_dynamic_row" else PerTensor()
    return Float8DynamicActivationFloat8WeightConfig(granularity=granularity, **tune)


def quantize_transformer(transformer: torch.nn.Module, mode: str = "none", keep: tuple[str, ...] = DEFAULT_KEEP,
                         inductor_tuning: bool = False, device: str | torch.device | None = None,
                         calibrate: Callable[[], str] | None = None) -> dict:
    """Quantize the block Linears in place with torchao; returns weight bytes before/after and the layer count.

    FP8 on a device without FP8 matmuls raises ``SpeedConfigError`` (never a silent fallback).
    Load LoRA adapters before calling this: adapter Linears are left alone, their base layers become FP8.
    ``inductor_tuning`` is torchao's ``set_inductor_config``: it turns on inductor's coordinate-descent
    autotuning for the whole process (every later compile too), which costs minutes of compile on a GPU.
    ``device``: quantize a model held on the CPU layer by layer on this device (torchao moves each Linear
    there first), so a card smaller than the bf16 model can still make the FP8 one.
    ``calibrate``: for ``fp8_static_tensor``, a call that runs the model once (a short try-on) while observers
    record each Linear's input range, and returns what it ran on (the report's ``calibration``).
    """
    check_mode(mode, QUANT_MODES, "quantization")
    before = weight_bytes(transformer)
    fn = fp8_filter(keep)
    layers = [n for n, m in transformer.named_modules() if fn(m, n)]
    report = {"quant": mode, "weight_bytes_before": before, "fp8_layers": len(layers) if mode != "none" else 0}
    if mode != "none":
        from torchao.quantization import quantize_

        if problem := fp8_matmul_problem(mode, device or _device_of(transformer)):
            raise SpeedConfigError(f"{mode}: {problem}")
        if mode == STATIC:
            report["calibration"] = _quantize_static(transformer, fn, calibrate)
        else:
            quantize_(transformer, fp8_config(mode, inductor_tuning), filter_fn=fn, device=device)
    return {**report, "weight_bytes": weight_bytes(transformer)}


def _quantize_static(transformer: torch.nn.Module, fn, calibrate: Callable[[], str] | None) -> str:
    """torchao's observer flow: observers in, ``calibrate()``, then FP8 weights with the observed input scales;
    returns what ``calibrate`` says it ran on."""
    from torchao.quantization import Float8StaticActivationFloat8WeightConfig, PerTensor, quantize_

    if calibrate is None:
        raise SpeedConfigError(f"{STATIC} needs calibrate=: a call that runs the model once (e.g. a 2-step try-on) "
                               "so each Linear's activation scale can be fixed; or load a saved static folder.")
    # set_inductor_config off: it would turn on coordinate-descent tuning for every later compile (minutes)
    cfg = dict(granularity=PerTensor(), set_inductor_config=False)
    quantize_(transformer, Float8StaticActivationFloat8WeightConfig(step="prepare", **cfg), filter_fn=fn)
    calibrated_on = calibrate()
    if unseen := [n for n, m in transformer.named_modules()
                  if getattr(getattr(m, "input_act_obs", None), "min_val", 0) is None]:
        raise SpeedConfigError(f"{STATIC}: the calibration run never called {len(unseen)} Linears ({unseen[:3]} ...), "
                               "so they have no activation scale; calibrate with a call that runs the whole model.")
    quantize_(transformer, Float8StaticActivationFloat8WeightConfig(step="convert", **cfg), filter_fn=fn)
    return calibrated_on


# ----------------------------------------------------------------------------- FP8 saved already quantized
def weights_signature(folder: str | Path) -> str:
    """Identity of a diffusers weights folder from its config.json, every safetensors header (names, dtypes,
    shapes, offsets) and every shard's size: kilobytes read, never the weights, so a cold start checks it at once.
    It tells another model or size apart, not a retrained copy with the very same layout."""
    folder = Path(folder)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for shard in sorted(folder.glob("*.safetensors")):
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(n))
        h.update(f"{shard.name}:{shard.stat().st_size}".encode())
    return h.hexdigest()


def _fp8_weights(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torchao.quantization import Float8Tensor

    return {n: p for n, p in transformer.named_parameters()
            if isinstance(p, Float8Tensor) or type(p).__name__ == _STATIC_TENSOR}


def _allow_static_tensors() -> None:
    """torchao's safetensors support (de)serialises the tensor subclasses it lists; its static-activation FP8
    weight (a prototype) follows the same protocol (tensor data + JSON attributes) but is not listed yet."""
    from torchao.prototype.quantization.float8_static_quant.prototype_float8_tensor import (
        PrototypeFloat8Tensor,
    )
    from torchao.prototype.safetensors import safetensors_utils

    if _STATIC_TENSOR not in safetensors_utils.ALLOWED_TENSORS_SUBCLASSES:
        safetensors_utils.ALLOWED_TENSORS_SUBCLASSES.append(_STATIC_TENSOR)
    safetensors_utils.ALLOWED_CLASSES.setdefault(_STATIC_TENSOR, PrototypeFloat8Tensor)


def _mode_of(weight) -> str:
    """The QUANT_MODES name of one torchao FP8 weight (weight-only, dynamic per row / per tensor, or static)."""
    if type(weight).__name__ == _STATIC_TENSOR:
        return STATIC
    if weight.act_quant_kwargs is None:
        return "fp8_weight_only"
    return "fp8_dynamic_row" if list(weight.block_size) == [1, weight.shape[-1]] else "fp8_dynamic_tensor"


def fused_qkv(transformer: torch.nn.Module) -> bool:
    """Whether diffusers' ``fuse_qkv_projections`` was applied (one QKV Linear per attention)."""
    return any(getattr(m, "fused_projections", False) for m in transformer.modules())


UNFUSED = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")  # what fusing leaves unused


def fuse_qkv(transformer: torch.nn.Module) -> int:
    """diffusers' ``fuse_qkv_projections``, then the separate Q/K/V Linears it keeps for unfusing removed: once
    fused nothing calls them (about 2.2 B of the FLUX transformer's 12 B parameters: memory, FP8 file size and read
    time for nothing). Returns how many Linears went."""
    transformer.fuse_qkv_projections()
    gone = 0
    for attn in [m for m in transformer.modules() if getattr(m, "fused_projections", False)]:
        for name in UNFUSED:
            if isinstance(getattr(attn, name, None), torch.nn.Module):
                delattr(attn, name)
                gone += 1
    return gone


def save_fp8_transformer(transformer: torch.nn.Module, folder: str | Path, source: str | Path | None = None,
                         keep: tuple[str, ...] = DEFAULT_KEEP, calibration: str | None = None) -> dict:
    """Write a transformer quantized by ``quantize_transformer`` to ``folder``: config.json + one safetensors file.

    torchao's ``flatten_tensor_state_dict`` stores each FP8 weight as its qdata + scale tensors with the subclass
    attributes as JSON metadata; beside them the mode, ``keep``, dtype and ``source``'s ``weights_signature``
    (default: the folder the transformer was loaded from), so loading refuses another mode or model;
    ``calibration``: what the static mode's scales were observed on, recorded with them.
    """
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    fp8 = _fp8_weights(transformer)
    modes = {_mode_of(w) for w in fp8.values()}
    expected = sum(fp8_filter(keep)(m, n) for n, m in transformer.named_modules())
    if len(modes) != 1 or len(fp8) != expected:
        raise FP8WeightsError(f"the transformer holds {len(fp8)} FP8 weights of modes {sorted(modes)}; FP8 with "
                              f"keep={keep} makes {expected} of one mode. Quantize it with "
                              "quant.quantize_transformer(transformer, mode, keep) first, then save.")
    if getattr(transformer, "peft_config", None):
        raise FP8WeightsError("the transformer holds LoRA adapters; save the FP8 transformer without them (adapters "
                              "are loaded before FP8 from their own files, never stored in the FP8 folder).")
    source = Path(source or dict(transformer.config).get("_name_or_path") or "")
    if not (source / "config.json").is_file():
        raise FP8WeightsError(f"no config.json in source={str(source)!r}: pass source= the bf16 transformer folder "
                              "this transformer was loaded from (it identifies the model at load time).")
    _allow_static_tensors()
    tensors, metadata = flatten_tensor_state_dict(transformer.state_dict())
    dtype = next(iter(fp8.values())).dtype
    metadata["tryon_lab"] = json.dumps({
        "format": FP8_FORMAT, "mode": modes.pop(), "keep": list(keep), "dtype": str(dtype).removeprefix("torch."),
        "fp8_layers": len(fp8), "fused_qkv": fused_qkv(transformer), "source": str(source),
        "source_signature": weights_signature(source), **({"calibration": calibration} if calibration else {})})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    transformer.save_config(folder)
    tmp = folder / f".{FP8_FILE}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(folder / FP8_FILE)
    return {"folder": str(folder), "bytes": (folder / FP8_FILE).stat().st_size, **json.loads(metadata["tryon_lab"])}


def read_fp8_info(folder: str | Path) -> tuple[dict, dict]:
    """(what ``save_fp8_transformer`` recorded, torchao's tensor metadata), from the file header only."""
    from safetensors import safe_open

    path = Path(folder) / FP8_FILE
    if not path.is_file():
        raise FP8WeightsError(f"no {FP8_FILE} in {folder}: fp8_weights must be a folder written by "
                              "quant.save_fp8_transformer (scripts/save_fp8.py makes one from a model folder).")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    try:
        info = json.loads(metadata["tryon_lab"])
        assert info["format"] == FP8_FORMAT
    except (KeyError, ValueError, AssertionError):
        raise FP8WeightsError(f"{path} was not written by quant.save_fp8_transformer (format {FP8_FORMAT}); save "
                              "it again with that function.") from None
    return info, metadata


def check_fp8_folder(folder: str | Path, source: str | Path, mode: str, dtype: torch.dtype,
                     fuse_qkv: bool | None = None) -> dict:
    """Refuse a saved FP8 folder of another mode, dtype, model or QKV fusing (``FP8WeightsError`` saying what to
    do); ``fuse_qkv=None`` takes the folder's."""
    info, _ = read_fp8_info(folder)
    if fuse_qkv is not None and bool(info.get("fused_qkv")) != fuse_qkv:
        raise FP8WeightsError(f"{folder} was saved {'with' if info.get('fused_qkv') else 'without'} fused QKV "
                              f"projections but fuse_qkv={fuse_qkv} was asked for; ask for "
                              f"fuse_qkv={bool(info.get('fused_qkv'))}, or save it again from a transformer "
                              f"{'with' if fuse_qkv else 'without'} fused QKV.")
    redo = (f"Save it again from this model: quantize_transformer(transformer, {mode!r}) then "
            f"save_fp8_transformer(transformer, {str(folder)!r}), or point fp8_weights at the matching folder.")
    if info["mode"] != mode:
        raise FP8WeightsError(f"{folder} holds {info['mode']} weights but FP8 mode {mode!r} was asked for; ask for "
                              f"fp8={info['mode']!r}, or: {redo}")
    if info["dtype"] != str(dtype).removeprefix("torch."):
        raise FP8WeightsError(f"{folder} was saved from a {info['dtype']} model but dtype {dtype} was asked for; "
                              f"use dtype={info['dtype']!r}, or: {redo}")
    if info["source_signature"] != weights_signature(source):
        raise FP8WeightsError(f"{folder} was saved from another model ({info['source']}), not from {source}. {redo}")
    return info


def read_fp8_tensors(folder: str | Path, device: str | torch.device = "cpu") -> dict:
    """The saved FP8 file's flattened tensors on ``device`` (``bulk_read``: several chunked reads in flight, through
    pinned buffers to the GPU), with the seconds the read took and the thread that read them."""
    from .bulk_read import read_files

    return read_files([Path(folder) / FP8_FILE], device)


def prefetch_fp8_tensors(folder: str | Path, device: str | torch.device = "cpu", switch_ms: float | None = None):
    """``read_fp8_tensors`` started on a worker thread (``bulk_read.prefetch``, ``switch_ms`` passed on); returns
    its future."""
    from .bulk_read import prefetch

    return prefetch([Path(folder) / FP8_FILE], device, "fp8-read", switch_ms=switch_ms)


def load_fp8_transformer(folder: str | Path, source: str | Path, mode: str, dtype: torch.dtype,
                         device: str | torch.device = "cpu", prefetched=None) -> torch.nn.Module:
    """The transformer saved by ``save_fp8_transformer``, read straight onto ``device`` with no quantization work.

    The model is built on the meta device (no weight init) and takes the loaded tensors as they are
    (``load_state_dict(assign=True)``), so its FP8 weights are the saved qdata and scales, bit for bit.
    ``prefetched``: the future of ``prefetch_fp8_tensors`` for this folder, started earlier (else read here).
    Its read is recorded on the model as ``fp8_read`` (seconds and thread), the folder's record as ``fp8_info``.
    """
    import importlib

    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    info = check_fp8_folder(folder, source, mode, dtype)
    config = json.loads((Path(folder) / "config.json").read_text())
    cls = getattr(importlib.import_module("diffusers"), config["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(config)
        if info.get("fused_qkv"):  # the same modules as the saved model: fused QKV Linears only
            fuse_qkv(model)
    read = prefetched.result() if prefetched is not None else read_fp8_tensors(folder, device)
    _allow_static_tensors()
    state, leftover = unflatten_tensor_state_dict(read["tensors"], read["metadata"])  # torchao's, from the header
    if leftover:
        raise FP8WeightsError(f"{folder}: tensors {sorted(leftover)[:3]} do not belong to any weight; save it again.")
    model.load_state_dict(state, strict=True, assign=True)
    model.fp8_read = {"read_s": read["read_s"], "thread": read["thread"]}
    model.fp8_info = info  # what the folder records (mode, fusing, a static mode's calibration): no second read
    return model.eval().requires_grad_(False)
