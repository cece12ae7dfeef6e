"""Text-embedding cache: encode the fixed task prompt once, run without T5/CLIP forever after.

A cache file is a safetensors file holding ``prompt_embeds`` (1, seq, joint_attention_dim) and
``pooled_prompt_embeds`` (1, pooled_projection_dim), with metadata: prompt, encoder fingerprint,
dtype, shapes and date. Loading checks it against the transformer that will consume it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import FILL_SUBDIR, TRAINED_DIR, TRYON_PROMPT
from .provenance import REPO_ROOT, cache_dir, fingerprint

ENCODER_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
EMBEDDINGS_DIR = REPO_ROOT / "embeddings"


class EmbeddingMismatchError(ValueError):
    """Cached embeddings that do not fit the model; the message says how to recompute them."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encoder_fingerprint(model_dir: str | Path) -> str:
    fill = Path(model_dir) / FILL_SUBDIR
    return fingerprint(fill, ENCODER_PARTS)


def embeddings_path(model_dir: str | Path, dtype: torch.dtype) -> Path:
    """Where the cache for this model and dtype lives: ``embeddings/`` for the committed model, else the cache."""
    model_dir = Path(model_dir)
    if model_dir.resolve() == TRAINED_DIR.resolve():
        return EMBEDDINGS_DIR / f"toy-tryon-{dtype_name(dtype)}.safetensors"
    return cache_dir() / "embeddings" / f"{encoder_fingerprint(model_dir)[:16]}-{dtype_name(dtype)}.safetensors"


@torch.no_grad()
def encode_prompt(model_dir: str | Path, prompt: str = TRYON_PROMPT, dtype: torch.dtype = torch.bfloat16,
                  device: str = "cpu", max_sequence_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Run CLIP + T5 once, exactly as the stock pipelines do (their own ``encode_prompt``)."""
    from diffusers import FluxFillPipeline

    pipe = FluxFillPipeline.from_pretrained(
        Path(model_dir) / FILL_SUBDIR, transformer=None, vae=None, torch_dtype=dtype,
        local_files_only=True, use_safetensors=True,
    ).to(device)
    prompt_embeds, pooled, _ = pipe.encode_prompt(
        prompt=prompt, prompt_2=None, device=torch.device(device), max_sequence_length=max_sequence_length
    )
    return prompt_embeds, pooled


def save_embeddings(path: str | Path, prompt_embeds: torch.Tensor, pooled: torch.Tensor, prompt: str,
                    encoder_fp: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "prompt": prompt,
        "encoder_fingerprint": encoder_fp,
        "dtype": dtype_name(prompt_embeds.dtype),
        "prompt_embeds_shape": json.dumps(list(prompt_embeds.shape)),
        "pooled_prompt_embeds_shape": json.dumps(list(pooled.shape)),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "format": "tryon_lab.embeddings/1",
    }
    tmp = path.with_suffix(".tmp")
    save_file({"prompt_embeds": prompt_embeds.contiguous().cpu(), "pooled_prompt_embeds": pooled.contiguous().cpu()},
              str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def build_embeddings(model_dir: str | Path, dtype: torch.dtype, device: str = "cpu", path: str | Path | None = None,
                     prompt: str = TRYON_PROMPT) -> Path:
    """Encode the prompt with the model's own text encoders and save the cache file."""
    prompt_embeds, pooled = encode_prompt(model_dir, prompt, dtype, device)
    path = path or embeddings_path(model_dir, dtype)
    return save_embeddings(path, prompt_embeds, pooled, prompt, encoder_fingerprint(model_dir))


def ensure_embeddings(model_dir: str | Path, dtype: torch.dtype, device: str = "cpu") -> Path:
    """The cache file for this model and dtype, built once if missing (the only time text encoders load)."""
    path = embeddings_path(model_dir, dtype)
    if not path.exists():
        build_embeddings(model_dir, dtype, device, path)
    return path


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
    jad, ppd = transformer_config["joint_attention_dim"], transformer_config["pooled_projection_dim"]
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != jad:
        raise EmbeddingMismatchError(
            f"{path}: prompt_embeds has shape {tuple(prompt_embeds.shape)} but the transformer expects "
            f"(1, seq, {jad}) (joint_attention_dim). These embeddings were made for another model. {fix}")
    if pooled.ndim != 2 or pooled.shape[-1] != ppd:
        raise EmbeddingMismatchError(
            f"{path}: pooled_prompt_embeds has shape {tuple(pooled.shape)} but the transformer expects "
            f"(1, {ppd}) (pooled_projection_dim). {fix}")
    if prompt_embeds.dtype != dtype:
        raise EmbeddingMismatchError(
            f"{path}: embeddings are {dtype_name(prompt_embeds.dtype)} but the pipeline runs in {dtype_name(dtype)}; "
            f"casting would not reproduce live encoding. {fix}")
    if encoder_fp is not None and meta.get("encoder_fingerprint") not in (None, encoder_fp):
        raise EmbeddingMismatchError(
            f"{path}: made by text encoders {meta.get('encoder_fingerprint', '?')[:16]} but this model's encoders are "
            f"{encoder_fp[:16]}. {fix}")
    return prompt_embeds.to(device), pooled.to(device), meta
