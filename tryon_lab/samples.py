"""The committed sample set (``data/``): persons, garments, masks, targets and logo boxes from its manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .checkpoint import REPO_ROOT

DATA_DIR = REPO_ROOT / "data"


@dataclass
class Sample:
    id: str
    person: Image.Image
    garment: Image.Image
    mask: Image.Image
    target: Image.Image | None
    garment_logo_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    target_logo_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)


def load_manifest(data_dir: str | Path = DATA_DIR) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: remake the sample set with `python scripts/make_sample_data.py`.")
    return json.loads(path.read_text())


def _open(path: Path, mode: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert(mode)


def load_sample(sample_id: str | int = 0, data_dir: str | Path = DATA_DIR, height: int | None = None) -> Sample:
    """One sample by id (``"s000"``) or position; ``height`` rescales it (aspect kept) for other resolutions."""
    data_dir = Path(data_dir)
    samples = load_manifest(data_dir)["samples"]
    entry = samples[sample_id] if isinstance(sample_id, int) else next((s for s in samples if s["id"] == sample_id), None)
    if entry is None:
        raise KeyError(f"sample {sample_id!r} not in {data_dir / 'manifest.json'}; ids: {[s['id'] for s in samples]}")
    paths = {k: data_dir / entry[k] for k in ("person", "garment", "mask", "target") if entry.get(k)}
    imgs = {k: _open(p, "L" if k == "mask" else "RGB") for k, p in paths.items()}
    gboxes = [tuple(b) for b in entry.get("garment_logo_boxes", [])]
    tboxes = [tuple(b) for b in entry.get("target_logo_boxes", [])]
    if height and height != imgs["person"].height:
        s = height / imgs["person"].height
        size = (max(1, round(imgs["person"].width * s)), height)
        imgs = {k: v.resize(size, Image.NEAREST if k == "mask" else Image.BICUBIC) for k, v in imgs.items()}
        gboxes = [tuple(round(c * s) for c in b) for b in gboxes]
        tboxes = [tuple(round(c * s) for c in b) for b in tboxes]
    return Sample(entry["id"], imgs["person"], imgs["garment"], imgs["mask"], imgs.get("target"), gboxes, tboxes, paths)


def sample_ids(data_dir: str | Path = DATA_DIR) -> list[str]:
    return [s["id"] for s in load_manifest(data_dir)["samples"]]
