"""LoRA adapters for the Fill transformer through diffusers + peft, with hotswapping for compiled models.

Hotswapping (peft, exposed by diffusers as ``enable_lora_hotswap`` + ``load_lora_weights(hotswap=True)``)
copies a new adapter's weights into the already loaded adapter's tensors: no new modules, same shapes
(ranks padded up to ``target_rank``), scales kept as tensors; so a compiled transformer keeps its graphs
and a swap costs a file read and a copy instead of unload + load + recompile.

``make_lora`` writes small random adapters (non-zero B, so they change outputs) in the diffusers Flux LoRA
format, for tests and notebooks that have no trained adapter. A model folder's trained adapters live beside it
(``<model>-logo-lora``, ``<model>-tryon-lora``, each with a card naming the weights it was trained on):
``adapter_for`` finds them.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import FILL_SUBDIR
from .provenance import CARD_FILE, cache_dir, fingerprint

# attention projections of both block kinds (single-stream blocks have no add_* / to_add_out)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# a trained model's adapters live beside it: checkpoints/toy-tryon -> checkpoints/toy-tryon-logo-lora
ADAPTER_SUFFIXES = {"logo": "-logo-lora", "tryon": "-tryon-lora"}
PASS_ADAPTER = "pass"  # the one slot the try-on and logo passes load their LoRA into (hotswapped when prepared)


@dataclass
class LoraState:
    """What a pipeline knows about its adapters: the hotswap rank (fixed before compiling) and what is loaded."""

    target_rank: int | None = None
    loaded: dict[str, str] = field(default_factory=dict)  # adapter name -> path


class LoraRankError(ValueError):
    """A LoRA whose rank exceeds the hotswap target rank set before compiling."""


def make_lora(transformer: torch.nn.Module, rank: int, seed: int, path: str | Path, alpha: float | None = None,
              target_modules: tuple[str, ...] = DEFAULT_TARGETS, b_std: float = 0.05) -> Path:
    """Write a random LoRA for ``transformer`` to folder ``path`` (``pytorch_lora_weights.safetensors``).

    peft builds the adapter (A: peft's default init, B: seeded normal with ``b_std``), then
    ``get_peft_model_state_dict`` + ``FluxFillPipeline.save_lora_weights`` write it with its config as
    metadata, exactly as a trained adapter is saved. The transformer is left without adapters.
    """
    from diffusers import FluxFillPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    if getattr(transformer, "peft_config", None):
        raise ValueError("make_lora needs a transformer without adapters (it removes its temporary one with "
                         "unload_lora, which would remove yours too); load a fresh transformer.")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(target_modules))
    torch.manual_seed(seed)
    transformer.add_adapter(config, adapter_name="make_lora")
    try:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in transformer.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * b_std)
        state = get_peft_model_state_dict(transformer, adapter_name="make_lora")
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}  # model dtype
    finally:
        transformer.unload_lora()
    FluxFillPipeline.save_lora_weights(Path(path), transformer_lora_layers=state,
                                       transformer_lora_adapter_metadata=config.to_dict(), weight_name=WEIGHT_NAME)
    return Path(path)


def make_default_loras(model_dir: str | Path, ranks: tuple[int, ...] = (4, 8), seed: int = 0) -> list[Path]:
    """Random LoRAs of the given ranks for the checkpoint in ``model_dir``, built once into the cache folder."""
    from diffusers import FluxTransformer2DModel

    model_dir = Path(model_dir)
    root = cache_dir() / "loras" / fingerprint(model_dir, (FILL_SUBDIR,))[:12]
    paths, transformer = [], None
    for i, rank in enumerate(ranks):
        path = root / f"rank{rank}-seed{seed + i}"
        if not (path / WEIGHT_NAME).exists():
            if transformer is None:
                transformer = FluxTransformer2DModel.from_pretrained(
                    model_dir / FILL_SUBDIR / "transformer", torch_dtype=torch.float32, local_files_only=True)
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
            make_lora(transformer, rank, seed + i, tmp)
            try:
                tmp.rename(path)
            except OSError:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
        paths.append(path)
    return paths


def lora_rank(path: str | Path) -> int:
    """Largest rank in a LoRA file or folder, read from tensor shapes only (no weights loaded)."""
    from safetensors import safe_open

    path = Path(path)
    file = path / WEIGHT_NAME if path.is_dir() else path
    with safe_open(str(file), framework="pt") as f:
        return max(f.get_slice(k).get_shape()[0] for k in f.keys() if "lora_A" in k)


def prepare_hotswap(fill_pipe, target_rank: int, state: LoraState) -> None:
    """Call before loading the first adapter and before compiling: adapters are padded to ``target_rank``."""
    fill_pipe.enable_lora_hotswap(target_rank=target_rank)
    state.target_rank = target_rank


@contextmanager
def quiet_diffusers():
    """The Fill pipeline has no text encoders here; diffusers warns about that at every load."""
    log = logging.getLogger("diffusers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def load_lora(fill_pipe, path: str | Path, adapter_name: str = "default", hotswap: bool = False,
              state: LoraState | None = None) -> dict:
    """Load (or, with ``hotswap``, swap into ``adapter_name``) a LoRA; returns its rank and the seconds it took.

    Checks the rank against ``prepare_hotswap``'s target first, so the error says what to do.
    """
    from .aot_blocks import installed

    if installed(fill_pipe.transformer):
        raise ValueError(f"LoRA {path}: this transformer runs AOT-compiled blocks (compile_aot), whose code holds the "
                         "weights' layout as built and would leave the adapter out; build it with compile='regional' "
                         "and compile_aot=None to use LoRA.")
    rank = lora_rank(path)
    target = state.target_rank if state is not None else None
    if target is not None and rank > target:
        raise LoraRankError(f"LoRA {path} has rank {rank}, above the hotswap target rank {target}. Call "
                            f"prepare_hotswap(pipe, target_rank>={rank}) before loading the first adapter and "
                            f"compiling (changing it later recompiles), or use an adapter of rank <= {target}.")
    start = time.perf_counter()
    with quiet_diffusers():
        fill_pipe.load_lora_weights(str(path), weight_name=WEIGHT_NAME, adapter_name=adapter_name, hotswap=hotswap)
    if state is not None:
        state.loaded[adapter_name] = str(path)
    return {"rank": rank, "seconds": time.perf_counter() - start}


def pass_slot(paths: list) -> dict:
    """``PipelineOptions`` changes for passes that swap ``paths`` under compile: the slot holds the first adapter
    before compiling (so the graphs include its modules) and is padded to the largest rank."""
    return {"hotswap_rank": max(lora_rank(p) for p in paths), "loras": ((PASS_ADAPTER, str(paths[0])),)}


def use_adapter(pipe, path: str | Path | None) -> str | None:
    """Load ``path`` into the pass slot and enable it: hotswapped into the loaded adapter's tensors when
    ``prepare_hotswap`` ran (a compiled model keeps its graphs), else unloaded and loaded; kept loaded, so passes
    that share an adapter load it once. None: nothing (the caller runs the plain model)."""
    if path is None:
        return None
    fill, state, path = pipe.fill, pipe.lora, str(Path(path))
    loaded = state.loaded.get(PASS_ADAPTER)
    if loaded != path:
        hotswap = loaded is not None and state.target_rank is not None
        if loaded is not None and not hotswap:
            with quiet_diffusers():
                fill.unload_lora_weights()
            state.loaded.pop(PASS_ADAPTER)
        load_lora(fill, path, PASS_ADAPTER, hotswap=hotswap, state=state)
    fill.enable_lora()
    return path


@contextmanager
def adapter_enabled(pipe, path: str | Path | None):
    """``use_adapter`` for the block, disabled after it (the LoRA stays loaded for the next pass that wants it)."""
    used = use_adapter(pipe, path)
    try:
        yield used
    finally:
        if used:
            pipe.fill.disable_lora()


def adapter_dir(model_dir: str | Path, kind: str = "logo") -> Path:
    """Where a model's trained ``kind`` adapter ("logo" or "tryon") lives: beside it, ``<model_dir>-<kind>-lora``."""
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + ADAPTER_SUFFIXES[kind])


def adapter_for(model_dir: str | Path, kind: str = "logo") -> Path | None:
    """The trained ``kind`` adapter beside ``model_dir`` (``adapter_dir``), or None when there is none.

    Its card records the fingerprint of the weights it was trained on; an adapter trained on other weights (the
    model was retrained since) is an error, not a silent mismatch.
    """
    model_dir, folder = Path(model_dir), adapter_dir(model_dir, kind)
    if not (folder / WEIGHT_NAME).is_file():
        return None
    card = folder / CARD_FILE
    base = json.loads(card.read_text()).get("base_fingerprint") if card.is_file() else None
    model = fingerprint(model_dir)
    if base != model:
        raise ValueError(f"the {kind} adapter {folder} was trained on other weights than {model_dir} (its card "
                         f"{'names ' + str(base)[:16] if base else 'is missing or names none'}, the model is "
                         f"{model[:16]}): retrain it (scripts/train_default_model.py train "
                         f"--init-from {model_dir} --stages {kind}, then assemble --adapters-only) or remove the "
                         "folder.")
    return folder


def resolve_adapter(choice: str | Path | None, model_dir: str | Path, kind: str = "logo") -> Path | None:
    """A notebook's or script's adapter parameter: "auto" (the model's trained ``kind`` adapter, None if it has
    none), "stand-in" (a random rank-8 adapter), "none", or a LoRA folder."""
    if choice is None or str(choice) == "none":
        return None
    if str(choice) == "auto":
        return adapter_for(model_dir, kind)
    if str(choice) == "stand-in":
        return make_default_loras(model_dir, ranks=(8,), seed=3)[0]
    if not (Path(choice) / WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"{str(choice)!r}: no {WEIGHT_NAME} in that folder; give a LoRA folder, 'auto', "
                                "'stand-in' or 'none'.")
    return Path(choice)


def resolve_pass_adapters(model_dir: str | Path, logo_choice, tryon_choice) -> tuple[Path | None, Path | None]:
    """Notebook 04's parameters -> (logo adapter, try-on adapter), as ``resolve_adapter``, except that a try-on
    "auto" falls back to the stand-in while no try-on adapter is trained."""
    tryon = resolve_adapter(tryon_choice, model_dir, "tryon")
    if tryon is None and str(tryon_choice) == "auto":
        tryon = resolve_adapter("stand-in", model_dir)
    return resolve_adapter(logo_choice, model_dir, "logo"), tryon


def adapter_label(path: str | Path | None) -> str:
    """What an adapter folder is, for a reader: trained (it has a card), a random stand-in (made by
    ``make_default_loras``), or just its path."""
    if path is None:
        return "none"
    path = Path(path)
    if (path / CARD_FILE).is_file():
        return f"trained ({path.name})"
    return f"random stand-in, rank {lora_rank(path)}" if path.is_relative_to(cache_dir() / "loras") else str(path)
