"""The committed sample set (``data/``): persons, garments, masks, targets and logo boxes from its manifest."""

from __future__ import annotations

import json
import numbers
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


class UnknownSampleError(KeyError, ValueError):
    """A sample id (or position) that is not in the manifest; the message lists the valid ids."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


def _entry(samples: list[dict], sample_id: str | int, data_dir: Path) -> dict:
    ids = [s["id"] for s in samples]
    if isinstance(sample_id, int) and not isinstance(sample_id, bool) and -len(samples) <= sample_id < len(samples):
        return samples[sample_id]
    entry = next((s for s in samples if s["id"] == sample_id), None)
    if entry is None:
        what = f"position {sample_id}" if isinstance(sample_id, int) else f"{sample_id!r}"
        raise UnknownSampleError(f"sample {what} is not in {data_dir / 'manifest.json'}; valid ids: {', '.join(ids)} "
                                 f"(or a position 0..{len(ids) - 1}).")
    return entry


def check_sample_id(sample_id: str | int, data_dir: str | Path = DATA_DIR) -> str:
    """The sample's id if the manifest has it (reads only the manifest: call it before anything loads).

    Anything else is an ``UnknownSampleError`` (a ``KeyError`` and a ``ValueError``) listing the valid ids.
    """
    data_dir = Path(data_dir)
    return _entry(load_manifest(data_dir)["samples"], sample_id, data_dir)["id"]


def load_sample(sample_id: str | int = 0, data_dir: str | Path = DATA_DIR, height: int | None = None) -> Sample:
    """One sample by id (``"s000"``) or position; ``height`` rescales it (aspect kept) for other resolutions.

    An unknown id is an ``UnknownSampleError`` listing the valid ids (``check_sample_id`` checks without loading).
    """
    data_dir = Path(data_dir)
    if height is not None and not (isinstance(height, numbers.Integral) and height >= 1):
        raise ValueError(f"height must be a positive whole number of pixels (or None for the stored size), "
                         f"got {height!r}.")
    entry = _entry(load_manifest(data_dir)["samples"], sample_id, data_dir)
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
