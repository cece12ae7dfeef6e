"""Convert a component folder's pickle weights (.bin/.pt/.ckpt) to safetensors, once.

Pickle files can run code when loaded, so they are opened here with ``weights_only=True`` (plain
tensors only) and rewritten as safetensors beside them; the pickle is renamed ``*.pickle-backup``.

    python scripts/convert_to_safetensors.py /data/flux/FLUX.1-Fill-dev/vae
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

NAMES = {"diffusion_pytorch_model": "diffusion_pytorch_model.safetensors", "pytorch_model": "model.safetensors"}


def convert(folder: Path) -> list[Path]:
    written = []
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path)
    args = p.parse_args(argv)
    for f in args.folders:
        convert(f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
