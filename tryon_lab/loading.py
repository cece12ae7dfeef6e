"""Loading FLUX Fill + Redux from a local folder: the slim loader and the stock one beside it.

The slim loader reads only what inference needs (transformer, VAE, scheduler, Redux image encoder
and embedder), safetensors only, straight onto the target device, with SDPA attention. Text
encoders are replaced by the embedding cache (``embeddings.py``). The standard loader is the stock
diffusers way (every component, then ``.to(device)``), kept for side-by-side numbers.

Both take a folder holding ``FLUX.1-Fill-dev/`` and ``FLUX.1-Redux-dev/`` (the embedded default or
real snapshots) and never touch the network (``local_files_only``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import torch

from . import quant
from .bulk_read import prefetch
from .checkpoint import (
    FILL_SUBDIR,
    PICKLE_SUFFIXES,
    REDUX_SUBDIR,
    ModelFolderError,
    check_model_dir,
    describe_model,
)
from .embeddings import (
    encoder_fingerprint,
    ensure_embeddings,
    has_text_encoders,
    load_embeddings,
    metadata_notes,
    transformer_config,
)
from .fill_setup import FillParts
from .lora import LoraState
from .provenance import fingerprint
from .shards import CorruptCheckpointError, check_shards  # noqa: F401 (loading.CorruptCheckpointError)
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
FILL_PARTS, REDUX_PARTS = ("transformer", "vae", "scheduler"), ("image_encoder", "feature_extractor", "image_embedder")
SLIM_COMPONENTS = FILL_PARTS + REDUX_PARTS
WEIGHTED = ("transformer", "vae", "text_encoder", "text_encoder_2", "image_encoder", "image_embedder")


class PickleCheckpointError(ValueError):
    """A component stored as pickle; the message explains why it is refused and how to convert it."""


class ModelMismatchError(ModelFolderError):
    """Parts of the model folder that cannot work together (read from their configs, before loading)."""


def _config(model_dir: Path, name: str) -> dict:
    path = model_dir / COMPONENTS[name][0] / name / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{name}: cannot read {path} ({e}); the snapshot's config.json is missing or "
                               "corrupt. Download it again.") from e


def check_redux_widths(model_dir: Path) -> None:
    """The Redux image path must produce tokens of the transformer's text width (``joint_attention_dim``):
    SigLIP hidden size -> embedder ``redux_dim``, embedder ``txt_in_features`` -> ``joint_attention_dim``."""
    jad = _config(model_dir, "transformer").get("joint_attention_dim")
    emb = _config(model_dir, "image_embedder")
    enc = _config(model_dir, "image_encoder")
    hidden = enc.get("hidden_size", enc.get("vision_config", {}).get("hidden_size"))
    fix = (f"Use the {REDUX_SUBDIR} snapshot made for this {FILL_SUBDIR} (the FLUX.1 Redux for FLUX.1 Fill), or "
           "a model folder whose two snapshots come from the same model family.")
    if emb.get("txt_in_features") is not None and jad is not None and emb["txt_in_features"] != jad:
        raise ModelMismatchError(
            f"{REDUX_SUBDIR}/image_embedder outputs tokens {emb['txt_in_features']} wide (txt_in_features) but "
            f"{FILL_SUBDIR}/transformer expects {jad} (joint_attention_dim): the first try-on would fail with a "
            f"tensor-size error. {fix}")
    if hidden is not None and emb.get("redux_dim") is not None and hidden != emb["redux_dim"]:
        raise ModelMismatchError(
            f"{REDUX_SUBDIR}/image_encoder outputs features {hidden} wide (hidden_size) but "
            f"{REDUX_SUBDIR}/image_embedder takes {emb['redux_dim']} (redux_dim). {fix}")


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
        if any(p.suffix == ".safetensors" for p in files):
            check_shards(folder)
        else:
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
    _, lib, cls_name = COMPONENTS[name]
    return getattr(import_module(lib), cls_name)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if isinstance(module, torch.nn.Module) else 0


def n_bytes(module) -> int:
    return quant.weight_bytes(module) if isinstance(module, torch.nn.Module) else 0  # FP8 at its real size


def load_kwargs(name: str, dtype: torch.dtype, device: str, slim: bool) -> dict:
    """``from_pretrained`` arguments of one component. Slim on CUDA: ``device_map`` places each tensor of the
    memory-mapped shards on the GPU as it is read (never the whole model in host memory, no ``.to`` after)."""
    lib = COMPONENTS[name][1]
    kwargs: dict = {"local_files_only": True}
    if name in WEIGHTED:
        kwargs["torch_dtype"] = dtype
        if slim:
            kwargs["use_safetensors"] = True
            if lib.startswith("transformers"):
                kwargs["attn_implementation"] = "sdpa"
            if torch.device(device).type == "cuda":
                kwargs["device_map"] = device
    return kwargs


def load_fp8_component(folder: str | Path, mode: str, model_dir: Path, dtype: torch.dtype, device: str,
                       prefetched=None):
    """The transformer ``quant.save_fp8_transformer`` wrote, read onto ``device``; returns (object, report row).

    ``prefetched``: the read started earlier (``quant.prefetch_fp8_tensors``); ``load_s`` is then only what this
    call waited for, and ``read_s`` the read itself on its worker thread.
    """
    with measure(device) as m:
        obj = quant.load_fp8_transformer(folder, model_dir / FILL_SUBDIR / "transformer", mode, dtype, device,
                                         prefetched)
        obj.set_attention_backend("native")
    row = {"component": "transformer (saved FP8)", "params": n_params(obj), "bytes": n_bytes(obj),
           "load_s": m["seconds"], "memory_bytes": m["memory_bytes"], "memory_kind": m["memory_kind"],
           "read_s": obj.fp8_read["read_s"], "read_thread": obj.fp8_read["thread"]}
    return obj, row


def load_component(name: str, model_dir: Path, dtype: torch.dtype, device: str, slim: bool, prefetched=None):
    """Load one component; returns (object, report row). Slim: safetensors only, straight to device, SDPA.
    ``prefetched``: a transformers model's weights read already (``bulk_read.prefetch``, started before the
    imports); built from its config and those tensors (``from_pretrained(None, state_dict=...)``)."""
    folder, cls, kwargs = model_dir / COMPONENTS[name][0] / name, _cls(name), load_kwargs(name, dtype, device, slim)
    with measure(device) as m:
        if prefetched is None:
            obj = cls.from_pretrained(folder, **kwargs)
        else:  # named after its folder, as when loaded from it
            read, config = prefetched.result(), cls.config_class.from_pretrained(folder, local_files_only=True)
            kwargs = {k: v for k, v in kwargs.items() if k not in ("local_files_only", "use_safetensors")}
            obj = cls.from_pretrained(None, config=config, state_dict=read["tensors"], **kwargs)
            obj.name_or_path = obj.config.name_or_path = str(folder)
        if isinstance(obj, torch.nn.Module):
            obj.eval().requires_grad_(False)
            if slim and name == "transformer":
                obj.set_attention_backend("native")  # torch SDPA; picks flash/cuDNN kernels on a GPU
            if not slim or torch.device(device).type != "cuda":
                obj.to(device)
    row = {"component": name, "params": n_params(obj), "bytes": n_bytes(obj), "load_s": m["seconds"],
           "memory_bytes": m["memory_bytes"], "memory_kind": m["memory_kind"],
           **({"read_s": read["read_s"], "read_thread": read["thread"]} if prefetched is not None else {})}
    return obj, row


@dataclass
class SlimPipeline:
    """What inference needs, loaded once: Fill (no text encoders), Redux image path, cached embeddings."""

    fill: object  # diffusers FluxFillPipeline with text encoders/tokenizers set to None (or fill_setup.FillParts)
    redux: object  # diffusers FluxPriorReduxPipeline with only the image path (or redux_process.RemoteRedux)
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
    aot_blocks: dict = field(default_factory=dict)  # block class -> aot_blocks.AotBlocksState (compile_aot)
    notes: list[str] = field(default_factory=list)  # what the loader found worth saying (e.g. shape-only embeddings)
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
        text = self.model_description
        if text is None:
            text = describe_model(self.model_dir, self.fingerprint)
        if any("SHAPE-ONLY" in n for n in self.notes):
            text += " [SHAPE-ONLY text embeddings: smoke run, not a real try-on]"
        return text


def load_slim(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
              embeddings_file: str | Path | None = None, fp8_weights: tuple[str | Path, str] | None = None,
              fuse_qkv: bool | None = None, redux=None, reads: EarlyReads | None = None) -> SlimPipeline:
    """The slim pipeline: transformer + VAE + scheduler + Redux image encoder/embedder, nothing else.

    ``fp8_weights``: (folder, mode) of a transformer saved already quantized (``quant.save_fp8_transformer``),
    loaded instead of the bf16 one after checking it was made from this model, in this mode and dtype (and with
    ``fuse_qkv``'s QKV fusing, unless None). ``embeddings_file`` defaults to the cache for this model, dtype and
    device type, built once if missing. ``redux``: a ``redux_process.RemoteRedux`` encoding garments in a process
    of its own; Redux is then not loaded here, and the Fill parts are a ``fill_setup.FillParts``, not diffusers'
    pipeline class, so this process imports no transformers. ``reads``: the weight reads ``start_reads`` started
    earlier for this same load (else they start here). Everything that can be checked without loading weights is
    checked first (folder, shard headers, Redux widths, embeddings).
    """
    model_dir = check_folder(model_dir, SLIM_COMPONENTS)  # first: a bad path never reaches diffusers
    check_redux_widths(model_dir)
    if reads is not None and (problem := reads.problem(model_dir, device, fp8_weights and fp8_weights[0], redux)):
        raise ValueError(problem)
    prefetched = reads.fp8 if reads is not None else None
    if fp8_weights is not None:  # before anything loads: a mismatched folder fails at once
        quant.check_fp8_folder(fp8_weights[0], model_dir / FILL_SUBDIR / "transformer", fp8_weights[1], dtype,
                               fuse_qkv)
        # the biggest read starts now (unless started earlier), on a worker, while this thread imports diffusers
        prefetched = prefetched or quant.prefetch_fp8_tensors(fp8_weights[0], device)
    # SigLIP's too (0.26-0.46 s of the H200 serving start when read after the imports), on a worker of its own
    encoder = reads.siglip if reads is not None else prefetch_siglip(model_dir, device) if redux is None else None
    if embeddings_file is None:
        embeddings_file = ensure_embeddings(model_dir, dtype, device)
    with measure(device) as m:
        prompt_embeds, pooled, meta = load_embeddings(
            embeddings_file, transformer_config(model_dir), dtype, device,
            encoder_fp=encoder_fingerprint(model_dir) if has_text_encoders(model_dir) else None)
    notes = metadata_notes(embeddings_file, meta)
    parts, report = {}, []
    for name in FILL_PARTS:
        if name == "transformer" and fp8_weights is not None:
            parts[name], row = load_fp8_component(*fp8_weights, model_dir, dtype, device, prefetched)
        else:
            parts[name], row = load_component(name, model_dir, dtype, device, True)
        report.append(row)
    if redux is None:
        from diffusers import FluxFillPipeline

        fill = FluxFillPipeline(**{k: parts[k] for k in FILL_PARTS}, text_encoder=None, tokenizer=None,
                                text_encoder_2=None, tokenizer_2=None)
        fill.set_progress_bar_config(disable=True)  # (Redux's call has no progress bar)
        redux, rows = load_redux(model_dir, dtype, device, encoder)
        report += rows
    else:
        fill = FillParts(parts["transformer"], parts["vae"], parts["scheduler"], device)
    report.append({"component": "cached text embeddings", "params": 0,
                   "bytes": prompt_embeds.numel() * prompt_embeds.element_size() + pooled.numel() * pooled.element_size(),
                   "load_s": m["seconds"], "memory_bytes": m["memory_bytes"], "memory_kind": m["memory_kind"],
                   **({"notes": notes} if notes else {})})
    return SlimPipeline(fill, redux, prompt_embeds, pooled, model_dir, device, dtype, report, Path(embeddings_file),
                        notes=notes)


@dataclass
class EarlyReads:
    """The slim loader's largest reads, started by ``start_reads`` before the caller imports diffusers."""

    model_dir: Path
    device: str
    fp8_folder: Path | None = None
    fp8: object = None  # the future of quant.prefetch_fp8_tensors(fp8_folder, device)
    siglip: object = None  # the future of prefetch_siglip(model_dir, device)

    def problem(self, model_dir: Path, device: str, fp8_folder: str | Path | None, redux) -> str | None:
        """Why these reads cannot serve a load of ``model_dir`` on ``device`` (None when they can)."""
        wanted = (Path(model_dir).resolve(), str(device), fp8_folder and Path(fp8_folder).resolve(), redux is None)
        started = (self.model_dir.resolve(), self.device, self.fp8_folder and self.fp8_folder.resolve(), bool(self.siglip))
        return None if wanted == started else (
            f"the reads were started for (model, device, FP8 folder, SigLIP here) = {started}, but this load wants "
            f"{wanted}: start them with the options the pipeline is built with.")


def start_reads(model_dir: str | Path, device: str, fp8_folder: str | Path | None = None, siglip: bool = True,
                switch_ms: float | None = None) -> EarlyReads:
    """Start the saved FP8 transformer's read and SigLIP's, each on a worker thread, for ``load_slim(reads=...)``.

    Called right after ``import torch`` (``configure.start_reads``), the reads and the CUDA context they create
    run while the caller imports diffusers and torchao, instead of after (H200: the build waited 1.44 s of a 1.9 s
    read started in ``load_slim``). ``switch_ms``: the GIL switch interval meanwhile (``bulk_read.SWITCH_INTERVAL``).
    """
    model_dir = Path(model_dir)
    fp8 = quant.prefetch_fp8_tensors(fp8_folder, device, switch_ms) if fp8_folder else None
    return EarlyReads(model_dir, str(device), Path(fp8_folder) if fp8_folder else None, fp8,
                      prefetch_siglip(model_dir, device, switch_ms) if siglip else None)


def prefetch_siglip(model_dir: Path, device: str, switch_ms: float | None = None):
    """SigLIP's weights read on a worker thread from now on (``bulk_read.prefetch``), for ``load_redux``."""
    return prefetch(sorted((model_dir / REDUX_SUBDIR / "image_encoder").glob("*.safetensors")), device, "siglip-read",
                    switch_ms=switch_ms)


def load_redux(model_dir: Path, dtype: torch.dtype, device: str, encoder=None) -> tuple[object, list[dict]]:
    """SigLIP and the Redux embedder in a ``FluxPriorReduxPipeline`` with only the image path, and their report
    rows; ``encoder``: SigLIP's read started earlier (``prefetch_siglip``), else started here."""
    from diffusers import FluxPriorReduxPipeline

    encoder = encoder or prefetch_siglip(model_dir, device)
    parts, rows = {}, []
    for name in REDUX_PARTS:
        parts[name], row = load_component(name, model_dir, dtype, device, True, encoder if name == "image_encoder"
                                          else None)
        rows.append(row)
    return FluxPriorReduxPipeline(**parts), rows


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
    text = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    fill = FluxFillPipeline(**{k: parts[k] for k in FILL_PARTS + text})
    redux = FluxPriorReduxPipeline(**{k: parts[k] for k in REDUX_PARTS + text})
    for p in (fill, redux):
        p.set_progress_bar_config(disable=True)
    return StandardPipeline(fill, redux, model_dir, device, dtype, report)


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
