"""One-off assets the workbench needs, made by scripts: the text-embedding cache, safetensors from pickles, the
procedural sample set.

    compute_embeddings     encode the fixed try-on prompt once with a model's own T5 + CLIP and save the cache
    convert_to_safetensors rewrite a component folder's pickle weights as safetensors (``weights_only`` load)
    write_sample_data      the procedural sample set (PNGs + manifest.json + README.md), byte-identical on re-runs
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from .. import checkpoint, embeddings
from ..loading import resolve_device_dtype
from ..synthetic import SyntheticConfig, write_sample_set

NAMES = {"diffusion_pytorch_model": "diffusion_pytorch_model.safetensors", "pytorch_model": "model.safetensors"}


def compute_embeddings(model: str = "default", dtype: str = "auto", device: str = "auto",
                       prompt: str = checkpoint.TRYON_PROMPT, out: str | Path | None = None,
                       from_tensors: str | Path | None = None, shape_only: bool = False) -> Path:
    """The embedding cache of ``model`` ('default', 'random', 'trained' or a folder holding FLUX.1-Fill-dev/),
    at ``out`` or the path the loaders look in. For a folder without text encoders: ``from_tensors`` (a user's
    own encoder outputs, a .safetensors) or ``shape_only`` (zeros of the right shapes, smoke runs only)."""
    if from_tensors and shape_only:
        raise ValueError("give --from-tensors FILE or --shape-only, not both.")
    device, torch_dtype = resolve_device_dtype(device, dtype)
    model_dir = checkpoint.resolve_model_dir(model)
    if from_tensors:
        path = embeddings.embeddings_from_tensors(model_dir, from_tensors, torch_dtype, out, prompt=prompt)
    elif shape_only:
        path = embeddings.shape_only_embeddings(model_dir, torch_dtype, out)
    else:
        path = embeddings.build_embeddings(model_dir, torch_dtype, device, out, prompt=prompt)
    meta = embeddings.read_metadata(path)
    source = {"shape-only": "SHAPE-ONLY zeros (smoke runs only)",
              "user-tensors": f"your tensors from {meta.get('source')}"}.get(
        meta.get("kind"), f"encoders {meta.get('encoder_fingerprint', '?')[:16]}")
    print(f"wrote {path}: prompt_embeds {meta['prompt_embeds_shape']}, pooled {meta['pooled_prompt_embeds_shape']}, "
          f"{meta['dtype']}, {source}")
    return path


def convert_to_safetensors(folder: str | Path) -> list[Path]:
    """Each pickle (.bin/.pt/.pth/.ckpt) in ``folder`` opened with ``weights_only=True`` (plain tensors only: a
    pickle can run code when loaded), written as safetensors beside it; the pickle is renamed ``*.pickle-backup``."""
    from safetensors.torch import save_file

    folder, written = Path(folder), []
    for src in sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")):
        state = torch.load(src, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        dst = folder / NAMES.get(src.stem, src.stem + ".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(dst))
        src.rename(src.with_suffix(src.suffix + ".pickle-backup"))
        written.append(dst)
        print(f"{src.name} -> {dst.name} ({len(state)} tensors)")
    if not written:
        print(f"no pickle weights in {folder}")
    return written


def write_sample_data(out: str | Path = "data", seed: int = 1234, count: int = 8,
                      cfg: SyntheticConfig | None = None) -> Path:
    """``synthetic.write_sample_set`` plus a README that says how to remake the set (byte-identical)."""
    cfg, defaults = cfg or SyntheticConfig(), SyntheticConfig()
    out = write_sample_set(Path(out), seed, count, cfg)
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if v != getattr(defaults, k))
    (out / "README.md").write_text(
        "# Synthetic try-on sample set\n\n"
        f"{count} procedural try-on pairs (seed {seed}, {cfg.height}x{cfg.width}) from "
        "`tryon_lab.synthetic`: a flat garment,\na person wearing another garment, the repaint mask "
        "(255 = repaint) and the ground-truth target,\nwith logo boxes (x0, y0, x1, y1; x1/y1 exclusive) "
        "and logo ids in `manifest.json`.\n\nGenerated, do not edit. Remake (byte-identical) with\n\n"
        f"    python scripts/make_sample_data.py --out {out.name} --seed {seed} --count {count}{flags}\n")
    print(f"wrote {count} samples to {out}")
    return out
