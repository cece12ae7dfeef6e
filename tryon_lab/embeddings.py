"""Text-embedding cache: encode the fixed task prompt once, run without T5/CLIP forever after.

A cache file is a safetensors file holding ``prompt_embeds`` (1, seq, joint_attention_dim) and
``pooled_prompt_embeds`` (1, pooled_projection_dim), with metadata: prompt, encoder fingerprint,
dtype, shapes, date and ``kind``. Loading checks it against the transformer that will consume it.

Kinds (``scripts/compute_embeddings.py``):
- ``encoded``: the model's own T5 + CLIP ran on the prompt (the default; needs the text encoders on disk);
- ``user-tensors`` (``--from-tensors FILE``): a user's own encoder outputs for a model folder without text
  encoders, checked for shape and noted on every result;
- ``shape-only`` (``--shape-only``): zeros of the right shapes, for smoke runs of a folder without text
  encoders; the pipeline's description says so, so no result passes for a real try-on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import FILL_SUBDIR, FLUX_TEXT_TOKENS, TRAINED_DIR, TRYON_PROMPT, text_tokens
from .provenance import REPO_ROOT, cache_dir, fingerprint

ENCODER_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
EMBEDDINGS_DIR = REPO_ROOT / "embeddings"


KIND_ENCODED, KIND_USER, KIND_SHAPE_ONLY = "encoded", "user-tensors", "shape-only"
NO_ENCODER_FIX = (
    "Make embeddings that fit without them: `python scripts/compute_embeddings.py --model {model} "
    "--from-tensors FILE` (FILE: a .safetensors of your own encoder outputs, prompt_embeds (1, seq, "
    "{jad}) and pooled_prompt_embeds (1, {ppd})), or `--shape-only` (zeros of those shapes, for smoke runs "
    "only: results are labelled shape-only), or pass `embeddings_file=` to the loader.")


class EmbeddingMismatchError(ValueError):
    """Cached embeddings that do not fit the model; the message says how to recompute them."""


class NoTextEncodersError(EmbeddingMismatchError):
    """Embeddings are needed, but the model folder has no text encoders to make them; the message gives the ways."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encoder_fingerprint(model_dir: str | Path) -> str:
    fill = Path(model_dir) / FILL_SUBDIR
    return fingerprint(fill, ENCODER_PARTS)


def has_text_encoders(model_dir: str | Path) -> bool:
    """Whether ``FLUX.1-Fill-dev/`` holds what live prompt encoding loads: model_index.json and T5/CLIP parts."""
    fill = Path(model_dir) / FILL_SUBDIR
    return (fill / "model_index.json").is_file() and all((fill / part).is_dir() for part in ENCODER_PARTS)


def transformer_config(model_dir: str | Path) -> dict:
    """The transformer's config.json (read, nothing loaded)."""
    path = Path(model_dir) / FILL_SUBDIR / "transformer" / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EmbeddingMismatchError(f"cannot read the transformer config {path} ({e}); the model folder must hold "
                                     f"{FILL_SUBDIR}/transformer/config.json.") from e


def no_encoder_error(model_dir: str | Path, what: str) -> NoTextEncodersError:
    fill = Path(model_dir) / FILL_SUBDIR
    missing = [p for p in ("model_index.json", *ENCODER_PARTS) if not (fill / p).exists()]
    try:
        cfg = transformer_config(model_dir)
        jad, ppd = cfg.get("joint_attention_dim", "joint_attention_dim"), cfg.get("pooled_projection_dim", "pooled")
    except EmbeddingMismatchError:
        jad, ppd = "joint_attention_dim", "pooled_projection_dim"
    return NoTextEncodersError(
        f"{what}: {fill} has no text encoders to encode the prompt with (missing: {', '.join(missing)}). "
        + NO_ENCODER_FIX.format(model=model_dir, jad=jad, ppd=ppd))


def embeddings_path(model_dir: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> Path:
    """Where the cache for this model, dtype and device type lives: ``embeddings/`` for the committed model, else
    the cache (keyed by the text encoders' fingerprint and the text length, or for a folder without encoders by its
    transformer config).
    Encoder outputs round differently on a GPU than on the CPU (other GEMM kernels), so what the encoders made on a
    GPU is kept apart (``-cuda``): the slim path then reproduces live encoding bit for bit on either. A folder
    without encoders has one cache whatever the device: its tensors came from elsewhere."""
    import hashlib

    model_dir = Path(model_dir)
    kind = torch.device(device).type
    on = "" if kind == "cpu" else f"-{kind}"
    if model_dir.resolve() == TRAINED_DIR.resolve():
        return EMBEDDINGS_DIR / f"toy-tryon-{dtype_name(dtype)}{on}.safetensors"
    if has_text_encoders(model_dir):  # the same encoders padding to another length make other embeddings
        n = text_tokens(model_dir)
        key = encoder_fingerprint(model_dir)[:16] + ("" if n == FLUX_TEXT_TOKENS else f"-{n}tok") + on
    else:
        cfg = Path(model_dir) / FILL_SUBDIR / "transformer" / "config.json"
        text = cfg.read_bytes() if cfg.is_file() else str(model_dir.resolve()).encode()
        key = "noenc-" + hashlib.sha256(text).hexdigest()[:16]
    return cache_dir() / "embeddings" / f"{key}-{dtype_name(dtype)}.safetensors"


@torch.no_grad()
def encode_prompt(model_dir: str | Path, prompt: str = TRYON_PROMPT, dtype: torch.dtype = torch.bfloat16,
                  device: str = "cpu", max_sequence_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run CLIP + T5 once, exactly as the stock pipelines do (their own ``encode_prompt``), padded to the model's
    ``checkpoint.text_tokens`` unless ``max_sequence_length`` says otherwise."""
    from diffusers import FluxFillPipeline

    if not has_text_encoders(model_dir):  # before diffusers: its OSError about model_index.json names no way out
        raise no_encoder_error(model_dir, "encoding the prompt")

    pipe = FluxFillPipeline.from_pretrained(
        Path(model_dir) / FILL_SUBDIR, transformer=None, vae=None, torch_dtype=dtype,
        local_files_only=True, use_safetensors=True,
    ).to(device)
    prompt_embeds, pooled, _ = pipe.encode_prompt(
        prompt=prompt, prompt_2=None, device=torch.device(device),
        max_sequence_length=max_sequence_length or text_tokens(model_dir),
    )
    return prompt_embeds, pooled


def save_embeddings(path: str | Path, prompt_embeds: torch.Tensor, pooled: torch.Tensor, prompt: str,
                    encoder_fp: str | None, kind: str = KIND_ENCODED, extra: dict | None = None) -> Path:
    """Write a cache file. ``encoder_fp=None``: no encoder fingerprint is recorded (the loader then notes that it
    cannot check the encoders); ``kind``: encoded / user-tensors / shape-only (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "prompt": prompt,
        "kind": kind,
        "dtype": dtype_name(prompt_embeds.dtype),
        "prompt_embeds_shape": json.dumps(list(prompt_embeds.shape)),
        "pooled_prompt_embeds_shape": json.dumps(list(pooled.shape)),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "format": "tryon_lab.embeddings/1",
    }
    if encoder_fp is not None:  # safetensors metadata must be str -> str
        meta["encoder_fingerprint"] = str(encoder_fp)
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per process: sweep points may build the same cache at once
    save_file({"prompt_embeds": prompt_embeds.contiguous().cpu(), "pooled_prompt_embeds": pooled.contiguous().cpu()},
              str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def build_embeddings(model_dir: str | Path, dtype: torch.dtype, device: str = "cpu", path: str | Path | None = None,
                     prompt: str = TRYON_PROMPT, max_sequence_length: int | None = None) -> Path:
    """Encode the prompt with the model's own text encoders (``encode_prompt``) and save the cache file."""
    prompt_embeds, pooled = encode_prompt(model_dir, prompt, dtype, device, max_sequence_length)
    path = path or embeddings_path(model_dir, dtype, device)
    return save_embeddings(path, prompt_embeds, pooled, prompt, encoder_fingerprint(model_dir),
                           extra={"device": torch.device(device).type})


def embeddings_from_tensors(model_dir: str | Path, source: str | Path, dtype: torch.dtype,
                            path: str | Path | None = None, prompt: str = TRYON_PROMPT) -> Path:
    """A cache file from a user's own encoder outputs (a .safetensors with ``prompt_embeds`` and
    ``pooled_prompt_embeds``), for a model folder without text encoders; checked against the transformer config,
    cast to ``dtype`` (noted in the metadata) and saved as kind ``user-tensors``."""
    import hashlib

    source = Path(source)
    if source.suffix != ".safetensors" or not source.is_file():
        raise EmbeddingMismatchError(f"--from-tensors {source}: give an existing .safetensors file holding "
                                     "prompt_embeds and pooled_prompt_embeds (pickle files are refused).")
    with safe_open(str(source), framework="pt", device="cpu") as f:
        missing = {"prompt_embeds", "pooled_prompt_embeds"} - set(f.keys())
        if missing:
            raise EmbeddingMismatchError(f"--from-tensors {source}: missing tensors {sorted(missing)}; it must hold "
                                         "prompt_embeds (1, seq, joint_attention_dim) and pooled_prompt_embeds.")
        pe, pooled = f.get_tensor("prompt_embeds"), f.get_tensor("pooled_prompt_embeds")
    check_shapes(source, pe, pooled, transformer_config(model_dir), "Save your encoder outputs with these shapes.")
    extra = {"source": source.name, "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    if pe.dtype != dtype:
        extra["cast_from"] = dtype_name(pe.dtype)
    path = path or embeddings_path(model_dir, dtype)
    return save_embeddings(path, pe.to(dtype), pooled.to(dtype), prompt, None, KIND_USER, extra)


def shape_only_embeddings(model_dir: str | Path, dtype: torch.dtype, path: str | Path | None = None,
                          seq: int | None = None) -> Path:
    """Zeros of the shapes the transformer expects, kind ``shape-only``: for smoke runs of a folder without text
    encoders (the code paths run; the images mean nothing, and every result's model description says so)."""
    cfg = transformer_config(model_dir)
    pe = torch.zeros(1, seq or text_tokens(model_dir), cfg["joint_attention_dim"], dtype=dtype)
    pooled = torch.zeros(1, cfg["pooled_projection_dim"], dtype=dtype)
    path = path or embeddings_path(model_dir, dtype)
    return save_embeddings(path, pe, pooled, "", None, KIND_SHAPE_ONLY,
                           {"warning": "shape-only placeholder (zeros), not an encoded prompt: smoke runs only"})


def ensure_embeddings(model_dir: str | Path, dtype: torch.dtype, device: str = "cpu") -> Path:
    """The cache file for this model, dtype and device type, built once if missing (the only time text encoders load).
    A folder without text encoders and no cache file: ``NoTextEncodersError`` naming the ways to make one."""
    path = embeddings_path(model_dir, dtype, device)
    if not path.exists():
        if not has_text_encoders(model_dir):
            raise no_encoder_error(model_dir, f"no text-embedding cache at {path}")
        build_embeddings(model_dir, dtype, device, path)
    return path


def check_shapes(path: Path, prompt_embeds: torch.Tensor, pooled: torch.Tensor, transformer_config: dict,
                 fix: str) -> None:
    """Widths against the transformer config, and a batch of exactly one prompt."""
    jad, ppd = transformer_config["joint_attention_dim"], transformer_config["pooled_projection_dim"]
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != jad:
        raise EmbeddingMismatchError(
            f"{path}: prompt_embeds has shape {tuple(prompt_embeds.shape)} but the transformer expects "
            f"(1, seq, {jad}) (joint_attention_dim). These embeddings were made for another model. {fix}")
    if pooled.ndim != 2 or pooled.shape[-1] != ppd:
        raise EmbeddingMismatchError(
            f"{path}: pooled_prompt_embeds has shape {tuple(pooled.shape)} but the transformer expects "
            f"(1, {ppd}) (pooled_projection_dim). {fix}")
    if prompt_embeds.shape[0] != 1 or pooled.shape[0] != 1:
        raise EmbeddingMismatchError(
            f"{path}: holds a batch of {prompt_embeds.shape[0]} prompt_embeds / {pooled.shape[0]} pooled; the cache "
            "holds one prompt (batch 1), which the pipeline repeats for every request. Keep the first row "
            f"(prompt_embeds[:1], pooled_prompt_embeds[:1]) or {fix[0].lower()}{fix[1:]}")


def read_metadata(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_embeddings(path: str | Path, transformer_config: dict, dtype: torch.dtype, device: str = "cpu",
                    encoder_fp: str | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Load a cache file and check it fits the transformer (widths and dtype) and, if given, the encoders."""
    path = Path(path)
    fix = ("Recompute it for this model with `python scripts/compute_embeddings.py --model <model folder> "
           f"--dtype {dtype_name(dtype)}`.")
    if not path.exists():
        raise FileNotFoundError(f"embeddings file not found: {path}. {fix}")
    if path.suffix != ".safetensors":
        raise EmbeddingMismatchError(f"{path}: embeddings must be a .safetensors file (pickle files are refused). {fix}")
    meta = read_metadata(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing = {"prompt_embeds", "pooled_prompt_embeds"} - keys
        if missing:
            raise EmbeddingMismatchError(f"{path}: missing tensors {sorted(missing)}. {fix}")
        prompt_embeds, pooled = f.get_tensor("prompt_embeds"), f.get_tensor("pooled_prompt_embeds")
    check_shapes(path, prompt_embeds, pooled, transformer_config, fix)
    if prompt_embeds.dtype != dtype:
        raise EmbeddingMismatchError(
            f"{path}: embeddings are {dtype_name(prompt_embeds.dtype)} but the pipeline runs in {dtype_name(dtype)}; "
            f"casting would not reproduce live encoding. {fix}")
    if encoder_fp is not None and meta.get("encoder_fingerprint") not in (None, encoder_fp):
        raise EmbeddingMismatchError(
            f"{path}: made by text encoders {meta.get('encoder_fingerprint', '?')[:16]} but this model's encoders are "
            f"{encoder_fp[:16]}. {fix}")
    return prompt_embeds.to(device), pooled.to(device), meta


def metadata_notes(path: str | Path, meta: dict) -> list[str]:
    """What a loaded cache file's metadata says that every result should carry: shape-only or user tensors, or
    no encoder metadata at all (then nothing ties the file to this model's text encoders)."""
    kind = meta.get("kind")
    if kind == KIND_SHAPE_ONLY:
        return [f"text embeddings {Path(path).name} are SHAPE-ONLY placeholders (zeros, compute_embeddings.py "
                "--shape-only): a smoke run, not a real try-on"]
    if kind == KIND_USER:
        cast = f", cast from {meta['cast_from']}" if meta.get("cast_from") else ""
        return [f"text embeddings {Path(path).name} are the user's own encoder outputs (from {meta.get('source', '?')}"
                f"{cast}); not checked against any text encoders"]
    if "encoder_fingerprint" not in meta:
        return [f"text embeddings {path} carry no encoder metadata (encoder_fingerprint): nothing checks they were "
                "made by this model's text encoders. Recompute them with `python scripts/compute_embeddings.py "
                "--model <model folder>` to make the check possible"]
    return []
