"""Loading FLUX Fill + Redux from a local folder: the slim loader and the stock one beside it.

The slim loader reads only what inference needs (transformer, VAE, scheduler, Redux image encoder
and embedder), safetensors only, straight onto the target device, with SDPA attention. Text
encoders are replaced by the embedding cache (``embeddings.py``). The standard loader is the stock
diffusers way (every component, then ``.to(device)``), kept for side-by-side numbers.

Both take a folder holding ``FLUX.1-Fill-dev/`` and ``FLUX.1-Redux-dev/`` (the embedded default or
real snapshots) and never touch the network (``local_files_only``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import (
    FILL_SUBDIR,
    PICKLE_SUFFIXES,
    REDUX_SUBDIR,
    ModelFolderError,
    check_model_dir,
    describe_model,
)
from .embeddings import encoder_fingerprint, ensure_embeddings, load_embeddings
from .lora import LoraState
from .provenance import fingerprint
from .timers import measure

# component -> (snapshot subfolder, library, class name)
COMPONENTS = {
    "transformer": (FILL_SUBDIR, "diffusers", "FluxTransformer2DModel"),
    "vae": (FILL_SUBDIR, "diffusers", "AutoencoderKL"),
    "scheduler": (FILL_SUBDIR, "diffusers", "FlowMatchEulerDiscreteScheduler"),
    "text_encoder": (FILL_SUBDIR, "transformers", "CLIPTextModel"),
    "tokenizer": (FILL_SUBDIR, "transformers", "CLIPTokenizer"),
    "text_encoder_2": (FILL_SUBDIR, "transformers", "T5EncoderModel"),
    "tokenizer_2": (FILL_SUBDIR, "transformers", "T5TokenizerFast"),
    "image_encoder": (REDUX_SUBDIR, "transformers", "SiglipVisionModel"),
    "feature_extractor": (REDUX_SUBDIR, "transformers", "SiglipImageProcessor"),
    "image_embedder": (REDUX_SUBDIR, "diffusers.pipelines.flux.modeling_flux", "ReduxImageEncoder"),
}
SLIM_COMPONENTS = ("transformer", "vae", "scheduler", "image_encoder", "feature_extractor", "image_embedder")
WEIGHTED = ("transformer", "vae", "text_encoder", "text_encoder_2", "image_encoder", "image_embedder")


class PickleCheckpointError(ValueError):
    """A component stored as pickle; the message explains why it is refused and how to convert it."""


def check_folder(model_dir: str | Path, names: tuple[str, ...]) -> Path:
    """Fail early and clearly: a missing folder, missing snapshot parts, pickle weights where safetensors are
    required (``ModelFolderError`` / ``PickleCheckpointError`` naming the path and the fix); returns the folder."""
    model_dir = check_model_dir(model_dir)
    for name in names:
        sub, _, _ = COMPONENTS[name]
        folder = model_dir / sub / name
        if not folder.is_dir():
            raise ModelFolderError(
                f"{name}: {folder} does not exist. The model folder must hold {FILL_SUBDIR}/ and {REDUX_SUBDIR}/ "
                "in the diffusers layout (as downloaded snapshots are); set TRYON_LAB_MODELS or the notebook's "
                "`model` parameter to such a folder.")
        if name not in WEIGHTED:
            continue
        files = [p for p in folder.iterdir() if p.is_file()]
        if not any(p.suffix == ".safetensors" for p in files):
            pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise PickleCheckpointError(
                    f"{name}: {folder} holds only pickle weights ({', '.join(pickles)}). Pickle files can run "
                    "arbitrary code when loaded and cannot be memory-mapped, so tryon_lab refuses them. Convert "
                    f"once with `python scripts/convert_to_safetensors.py {folder}` and load again.")
            raise ModelFolderError(f"{name}: no .safetensors weights in {folder}; the model folder must hold the "
                                   "snapshot's safetensors files (as downloaded).")
    return model_dir


def _cls(name: str):
    import importlib

    _, lib, cls_name = COMPONENTS[name]
    return getattr(importlib.import_module(lib), cls_name)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if isinstance(module, torch.nn.Module) else 0


def n_bytes(module) -> int:
    if not isinstance(module, torch.nn.Module):
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers())


def load_component(name: str, model_dir: Path, dtype: torch.dtype, device: str, slim: bool):
    """Load one component; returns (object, report row). Slim: safetensors only, straight to device, SDPA."""
    sub, lib, _ = COMPONENTS[name]
    folder = model_dir / sub / name
    cls = _cls(name)
    kwargs: dict = {"local_files_only": True}
    if name in WEIGHTED:
        kwargs["torch_dtype"] = dtype
        if slim:
            kwargs["use_safetensors"] = True
            if lib.startswith("transformers"):
                kwargs["attn_implementation"] = "sdpa"
            if torch.device(device).type == "cuda":
                kwargs["device_map"] = device
    with measure(device) as m:
        obj = cls.from_pretrained(folder, **kwargs)
        if isinstance(obj, torch.nn.Module):
            obj.eval().requires_grad_(False)
            if slim and name == "transformer":
                obj.set_attention_backend("native")  # torch SDPA; picks flash/cuDNN kernels on a GPU
            if not slim or torch.device(device).type != "cuda":
                obj.to(device)
    row = {"component": name, "params": n_params(obj), "bytes": n_bytes(obj), "load_s": m["seconds"],
           "memory_bytes": m["memory_bytes"], "memory_kind": m["memory_kind"]}
    return obj, row


@dataclass
class SlimPipeline:
    """What inference needs, loaded once: Fill (no text encoders), Redux image path, cached embeddings."""

    fill: object  # diffusers FluxFillPipeline with text encoders/tokenizers set to None
    redux: object  # diffusers FluxPriorReduxPipeline with only the image path
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    model_dir: Path
    device: str
    dtype: torch.dtype
    load_report: list[dict] = field(default_factory=list)
    embeddings_file: Path | None = None
    redux_cache: dict = field(default_factory=dict)  # garment image hash -> Redux tokens
    lora: LoraState = field(default_factory=LoraState)  # hotswap rank and loaded adapters
    copy_streams: dict = field(default_factory=dict)  # device -> CUDA stream for the pinned output copy
    hot_path: bool = False  # default for TryOnSettings.hot_path (configure sets it from the options)
    text_multiple: int = 1  # pad the text tokens to a multiple of this (an even split under context parallelism)
    options: object = None  # the configure.PipelineOptions this pipeline was built with
    model_description: str | None = None  # for models built in memory (no folder to fingerprint)
    build_report: dict = field(default_factory=dict)  # what configure applied (e.g. FP8 layer count and bytes)
    _fingerprint: str | None = None

    @property
    def transformer(self):
        return self.fill.transformer

    @property
    def fingerprint(self) -> str:
        """The model folder's fingerprint, as ``describe_model`` and the card give it (computed on first use:
        hashing 24 GB of real weights takes a while, then per-file hashes are cached)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model_dir)
        return self._fingerprint

    @property
    def description(self) -> str:
        """Which model this is, for every result it produces (hashed once, not per call)."""
        if self.model_description is not None:
            return self.model_description
        return describe_model(self.model_dir, self.fingerprint)


def load_slim(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
              embeddings_file: str | Path | None = None) -> SlimPipeline:
    """The slim pipeline: transformer + VAE + scheduler + Redux image encoder/embedder, nothing else.

    ``embeddings_file`` defaults to the cache for this model and dtype, built once if missing.
    """
    model_dir = check_folder(model_dir, SLIM_COMPONENTS)  # first: a bad path never reaches diffusers
    from diffusers import FluxFillPipeline, FluxPriorReduxPipeline

    parts, report = {}, []
    for name in SLIM_COMPONENTS:
        parts[name], row = load_component(name, model_dir, dtype, device, slim=True)
        report.append(row)
    if embeddings_file is None:
        embeddings_file = ensure_embeddings(model_dir, dtype)
    with measure(device) as m:
        prompt_embeds, pooled, _ = load_embeddings(
            embeddings_file, dict(parts["transformer"].config), dtype, device,
            encoder_fp=encoder_fingerprint(model_dir) if (model_dir / FILL_SUBDIR / "text_encoder").exists() else None)
    report.append({"component": "cached text embeddings", "params": 0,
                   "bytes": prompt_embeds.numel() * prompt_embeds.element_size() + pooled.numel() * pooled.element_size(),
                   "load_s": m["seconds"], "memory_bytes": m["memory_bytes"], "memory_kind": m["memory_kind"]})
    fill = FluxFillPipeline(scheduler=parts["scheduler"], vae=parts["vae"], transformer=parts["transformer"],
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    redux = FluxPriorReduxPipeline(image_encoder=parts["image_encoder"], feature_extractor=parts["feature_extractor"],
                                   image_embedder=parts["image_embedder"])
    for p in (fill, redux):
        p.set_progress_bar_config(disable=True)
    return SlimPipeline(fill, redux, prompt_embeds, pooled, model_dir, device, dtype, report, Path(embeddings_file))


@dataclass
class StandardPipeline:
    """The stock way: every component of both snapshots, prompts encoded live at every call."""

    fill: object
    redux: object
    model_dir: Path
    device: str
    dtype: torch.dtype
    load_report: list[dict] = field(default_factory=list)


def load_standard(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> StandardPipeline:
    """Stock diffusers loading, one component at a time only so each can be measured."""
    model_dir = check_folder(model_dir, tuple(COMPONENTS))  # first: a bad path never reaches diffusers
    from diffusers import FluxFillPipeline, FluxPriorReduxPipeline

    parts, report = {}, []
    for name in COMPONENTS:
        parts[name], row = load_component(name, model_dir, dtype, device, slim=False)
        report.append(row)
    fill_names = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    fill = FluxFillPipeline(**{k: parts[k] for k in fill_names})
    redux = FluxPriorReduxPipeline(
        image_encoder=parts["image_encoder"], feature_extractor=parts["feature_extractor"],
        image_embedder=parts["image_embedder"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
        text_encoder_2=parts["text_encoder_2"], tokenizer_2=parts["tokenizer_2"])
    for p in (fill, redux):
        p.set_progress_bar_config(disable=True)
    return StandardPipeline(fill, redux, model_dir, device, dtype, report)


def pickle_vs_safetensors(model_dir: str | Path, component: str = "transformer", tmp_dir: str | Path | None = None) -> dict:
    """Load time of the same weights from safetensors (memory-mapped) and from a pickle written for the test."""
    import tempfile
    import time

    from safetensors.torch import load_file

    folder = Path(model_dir) / COMPONENTS[component][0] / component
    shards = sorted(folder.glob("*.safetensors"))
    start = time.perf_counter()
    state = {}
    for s in shards:
        state.update(load_file(str(s)))
    st_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=tmp_dir) as d:
        pkl = Path(d) / "weights.pt"
        torch.save(state, pkl)
        start = time.perf_counter()
        torch.load(pkl, weights_only=True)
        pk_s = time.perf_counter() - start
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    return {"component": component, "bytes": nbytes, "safetensors_s": st_s, "pickle_s": pk_s}


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """``auto``: CUDA with bf16 where there is a GPU, else CPU with fp32 (bf16 matmuls are slow on most CPUs)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA GPU; use device='cpu' or 'auto'.")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    try:
        torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} not supported; use 'auto', 'bfloat16', 'float16' or 'float32'.") from None
    return device, torch_dtype
