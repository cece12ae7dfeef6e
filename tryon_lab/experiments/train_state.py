"""What a training run leaves behind so the next call can continue it: weights, EMA, counters, AdamW.

    state dir (small enough to come back from a device call and be carried into the next one)
        state.json                      stage counters, LR-schedule position, losses, data positions, config
        weights-NNNNN.safetensors       shards of at most ``MAX_SHARD_BYTES``: ``ema.<part>.<key>`` (the
                                        weights that ship: fp32, or bf16 when even the fp32 EMA would not fit
                                        ``max_state_bytes``), ``raw.<part>.<key>`` (the optimiser's weights: fp32
                                        when they fit, else a bf16 offset from the EMA, else left out) and
                                        ``frozen.<part>.<key>`` as they ship (parts no stage trains now: model
                                        parts bf16, finished adapters fp32)
    optimiser dir (optional, separate: it is twice the weights and rarely fits a return limit)
        optim-NNNNN.safetensors         ``raw.*`` fp32 weights and the AdamW moments, for an exact continuation

The EMA is diffusers' ``EMAModel``; shards are plain safetensors files with their key lists in ``state.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

MAX_SHARD_BYTES = 15 * 2**20  # one shard must come back through a 16 MiB-per-file limit
STATE_FILE = "state.json"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_shards(tensors: dict[str, torch.Tensor], folder: Path, prefix: str,
                max_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """``tensors`` as ``prefix-NNNNN.safetensors`` files of at most ``max_bytes`` of tensor data each.

    Old shards with the same prefix are removed first, so a smaller state never mixes with a larger one.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{prefix}-*.safetensors"):
        old.unlink()
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        if _nbytes(v) > max_bytes:
            raise ValueError(f"tensor {k} has {_nbytes(v)} bytes, above the shard limit of {max_bytes}; raise "
                             "max_bytes or split the parameter.")
        if groups[-1] and size + _nbytes(v) > max_bytes:
            groups.append({})
            size = 0
        groups[-1][k] = v.detach().contiguous().cpu()
        size += _nbytes(v)
    paths = []
    for i, group in enumerate(groups):
        paths.append(folder / f"{prefix}-{i:05d}.safetensors")
        tmp = paths[-1].with_suffix(".tmp")
        save_file(group, str(tmp))
        os.replace(tmp, paths[-1])  # a call killed mid-save leaves the previous shard, never half a file
    return paths


def load_shards(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for p in sorted(Path(folder).glob(f"{prefix}-*.safetensors")):
        out.update(load_file(str(p)))
    return out


def make_ema(params: list[torch.nn.Parameter], decay: float):
    """diffusers' EMA with its default warm-up, decay ``min(decay, (1 + n) / (10 + n))`` after update ``n``."""
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay, foreach=True)


def named_trainable(models: dict[str, torch.nn.Module], parts: tuple[str, ...]) -> dict[str, torch.nn.Parameter]:
    """``part.key`` -> parameter for every parameter that requires grad, in a fixed order."""
    return {f"{part}.{k}": p for part in parts for k, p in models[part].named_parameters() if p.requires_grad}


def optimizer_tensors(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """AdamW moments and step counts by parameter name (safetensors holds tensors only, no pickles)."""
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            out[f"adam.{names[i]}.{key}"] = torch.as_tensor(value).float()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor]) -> bool:
    """Restore what ``optimizer_tensors`` saved (parameters that never had a gradient have no state);
    False, optimiser untouched, when the saved moments do not belong to these parameters."""
    sd = opt.state_dict()
    if any(k.split(".", 1)[1].rsplit(".", 1)[0] not in names for k in tensors if k.startswith("adam.")):
        return False
    state = {}
    for i, name in enumerate(names):
        keys = [k for k in ("step", "exp_avg", "exp_avg_sq") if f"adam.{name}.{k}" in tensors]
        if keys:
            state[i] = {k: tensors[f"adam.{name}.{k}"].clone() for k in keys}
    sd["state"] = state
    opt.load_state_dict(sd)  # moves the moments to each parameter's device and dtype
    return True


def save_state(folder: Path, record: dict, ema: dict[str, torch.Tensor], raw: dict[str, torch.Tensor],
               frozen: dict[str, torch.Tensor], max_state_bytes: int) -> dict:
    """Write ``state.json`` and the weight shards; returns what was kept of the raw weights and the sizes.

    The EMA goes in fp32. The raw (optimiser) weights follow in fp32 when the whole state stays under
    ``max_state_bytes``, else as a bf16 offset from the EMA (error <= 2^-9 of the offset) when that fits,
    else they are left out and a resume restarts from the EMA. When even the fp32 EMA would not fit (a Fill
    transformer in training), the EMA goes in bf16, as the weights ship: a resume continues from the rounded
    EMA, which costs a little exactness and keeps the run going in a later session. A state still over the
    budget is written all the same (``over_budget`` in the record): a call's result is never dropped.
    """
    frozen_t = {f"frozen.{k}": v for k, v in frozen.items()}  # as they ship: a resume writes the same LoRA
    frozen_bytes = sum(_nbytes(v) for v in frozen_t.values())
    ema_dtype = torch.float32 if frozen_bytes + 4 * sum(v.numel() for v in ema.values()) <= max_state_bytes \
        else torch.bfloat16
    tensors = {f"ema.{k}": v.to(ema_dtype) for k, v in ema.items()}
    tensors.update(frozen_t)
    base = sum(_nbytes(v) for v in tensors.values())
    raw_bytes = sum(v.numel() for v in raw.values())
    room = max_state_bytes - base if ema_dtype == torch.float32 else -1  # a rounded EMA: no raw weights beside it
    if 4 * raw_bytes <= room:
        kept = "fp32"
        tensors.update({f"raw.{k}": v.float() for k, v in raw.items()})
    elif 2 * raw_bytes <= room:
        kept = "bf16-offset-from-ema"
        tensors.update({f"rawoff.{k}": (v.float() - ema[k].float()).to(torch.bfloat16) for k, v in raw.items()})
    else:
        kept = "none"
    paths = save_shards(tensors, Path(folder), "weights")
    size = sum(p.stat().st_size for p in paths)
    record = {**record, "raw_weights": kept, "ema_weights": str(ema_dtype).removeprefix("torch."),
              "state_bytes": size, "over_budget": size > max_state_bytes, "shards": [p.name for p in paths]}
    tmp = Path(folder) / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, default=str))
    os.replace(tmp, Path(folder) / STATE_FILE)
    return record


def load_record(folder: Path) -> dict:
    """A state folder's record (``state.json``: config, stage counters, losses, calls) without its weights."""
    folder = Path(folder)
    if not (folder / STATE_FILE).exists():
        raise FileNotFoundError(f"no {STATE_FILE} in {folder}: give the folder a previous `train` wrote (its --out), "
                                "with every weights-*.safetensors shard next to it.")
    return json.loads((folder / STATE_FILE).read_text())


def load_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(record, ema, raw, frozen) from a state folder; raw is empty when it was left out."""
    folder = Path(folder)
    record = load_record(folder)
    shards = load_shards(folder, "weights")
    missing = [s for s in record.get("shards", []) if not (folder / s).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks shard(s) {missing} listed in {STATE_FILE}: copy every file the "
                                "previous call wrote.")

    def take(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) + 1:]: v for k, v in shards.items() if k.startswith(prefix + ".")}

    ema, frozen = {k: v.float() for k, v in take("ema").items()}, take("frozen")  # a bf16 EMA continues in fp32
    raw = take("raw") or {k: ema[k] + v.float() for k, v in take("rawoff").items()}
    return record, ema, raw, frozen
