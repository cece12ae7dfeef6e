"""The procedural try-on set: determinism, exact ground truth, sample-set files and the batch stream."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tryon_lab.synthetic import (
    LOGO_NAMES,
    SyntheticConfig,
    iter_batches,
    make_batch,
    make_logo,
    make_sample,
    write_sample_set,
)

SMALL = SyntheticConfig(height=128, width=96)


def _arrays(s):
    return [np.asarray(getattr(s, k)) for k in ("garment", "person", "mask", "target")]


def _off_pattern(pixels: np.ndarray, a, b) -> np.ndarray:
    """Distance of each pixel to the colour segment base..pattern colour (patterns only blend those two)."""
    a, b = np.float32(a), np.float32(b)
    t = np.clip(((pixels - a) @ (b - a)) / max(float((b - a) @ (b - a)), 1e-6), 0, 1)
    return np.linalg.norm(pixels - (a + t[..., None] * (b - a)), axis=-1)


@pytest.fixture(scope="module")
def samples():
    return [make_sample(7, i) for i in range(24)]


def test_same_seed_and_index_give_identical_pixels_other_index_differs():
    a, b, c = make_sample(3, 5), make_sample(3, 5), make_sample(3, 6)
    for x, y in zip(_arrays(a), _arrays(b), strict=True):
        assert np.array_equal(x, y)
    assert (a.garment_logo_boxes, a.target_logo_boxes, a.logo_ids, a.meta) == (
        b.garment_logo_boxes, b.target_logo_boxes, b.logo_ids, b.meta)
    assert not np.array_equal(_arrays(a)[0], _arrays(c)[0])
    assert not np.array_equal(_arrays(a)[3], _arrays(c)[3])


def test_shapes_modes_and_dtypes(samples):
    cfg = SyntheticConfig()
    for s in samples[:4]:
        assert [im.mode for im in (s.garment, s.person, s.mask, s.target)] == ["RGB", "RGB", "L", "RGB"]
        assert all(im.size == (cfg.width, cfg.height) for im in (s.garment, s.person, s.mask, s.target))
        assert set(np.unique(np.asarray(s.mask))) <= {0, 255}
    s = make_sample(0, 0, SMALL)
    assert s.person.size == (96, 128) and np.asarray(s.target).dtype == np.uint8


def test_mask_is_neither_empty_nor_full_and_target_equals_person_outside_it(samples):
    for s in samples:
        garment, person, mask, target = _arrays(s)
        assert 0.05 < (mask > 0).mean() < 0.7
        keep = mask == 0
        assert np.array_equal(target[keep], person[keep])
        assert np.abs(target[~keep].astype(int) - person[~keep]).max() > 0  # the garment really changed
        assert garment.std() > 5 and person.std() > 5


def test_garment_logo_boxes_lie_in_the_image_and_stand_out_from_the_fabric(samples):
    counts = set()
    for s in samples:
        cfg = SyntheticConfig()
        assert cfg.min_logos <= len(s.logo_ids) <= cfg.max_logos
        assert len(s.garment_logo_boxes) == len(s.target_logo_boxes) == len(s.logo_ids)
        assert all(0 <= i < len(LOGO_NAMES) for i in s.logo_ids)
        counts.add(len(s.logo_ids))
        g = np.asarray(s.garment).astype(np.float32)
        for x0, y0, x1, y1 in s.garment_logo_boxes:
            assert 0 <= x0 < x1 <= cfg.width and 0 <= y0 < y1 <= cfg.height
            off = _off_pattern(g[y0:y1, x0:x1], s.meta["base_color"], s.meta["pattern_color"])
            assert (off > 40).mean() > 0.2, (s.meta["index"], (x0, y0, x1, y1))
    assert counts == {1, 2, 3}


def test_target_logo_boxes_lie_inside_the_mask_and_show_the_logo(samples):
    for s in samples:
        mask, target = np.asarray(s.mask), np.asarray(s.target).astype(np.float32)
        ys, xs = np.nonzero(mask)
        for x0, y0, x1, y1 in s.target_logo_boxes:
            assert xs.min() <= x0 < x1 <= xs.max() + 1 and ys.min() <= y0 < y1 <= ys.max() + 1
            assert (mask[y0:y1, x0:x1] == 255).all()
            off = _off_pattern(target[y0:y1, x0:x1], s.meta["base_color"], s.meta["pattern_color"])
            assert (off > 40).mean() > 0.15


def test_make_logo_all_designs():
    for i in range(len(LOGO_NAMES)):
        a = np.asarray(make_logo(i, 32, ((200, 30, 30), (20, 20, 200))))
        assert a.shape == (32, 32, 4) and a[..., 3].max() == 255 and 0.2 < (a[..., 3] > 0).mean() < 1.0
    with pytest.raises(ValueError):
        make_logo(len(LOGO_NAMES), 32, ((0, 0, 0), (255, 255, 255)))
    with pytest.raises(ValueError):
        SyntheticConfig(height=100)


def test_write_sample_set_round_trip_and_byte_identical_rerun(tmp_path):
    cfg = SMALL
    out = write_sample_set(tmp_path / "a", seed=11, count=3, config=cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 11 and manifest["config"]["height"] == 128
    assert manifest["generator"] == "tryon_lab.synthetic" and len(manifest["samples"]) == 3
    for rec in manifest["samples"]:
        for key in ("person", "garment", "mask", "target"):
            with Image.open(out / rec[key]) as im:
                assert im.size == (cfg.width, cfg.height)
        assert len(rec["garment_logo_boxes"]) == len(rec["target_logo_boxes"]) == len(rec["logo_ids"])
        s = make_sample(11, int(rec["id"][1:]), cfg)
        assert rec["target_logo_boxes"] == [list(b) for b in s.target_logo_boxes]
        assert np.array_equal(np.asarray(Image.open(out / rec["target"])), np.asarray(s.target))
    assert [lg["id"] for lg in manifest["logos"]] == list(range(len(LOGO_NAMES)))
    assert all((out / lg["path"]).exists() for lg in manifest["logos"])
    again = write_sample_set(tmp_path / "b", seed=11, count=3, config=cfg)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_make_batch_and_iter_batches_match_across_workers():
    batch = make_batch(5, 4, 3, SMALL)
    assert batch["garment"].shape == (3, 128, 96, 3) and batch["mask"].shape == (3, 128, 96)
    assert all(v.dtype == np.uint8 for v in batch.values())
    serial = iter_batches(5, 2, SMALL, workers=0)
    first, second = next(serial), next(serial)
    assert np.array_equal(second["target"], make_batch(5, 2, 2, SMALL)["target"])  # the index advances
    pooled = iter_batches(5, 2, SMALL, workers=2)
    try:
        p_first, p_second = next(pooled), next(pooled)
    finally:
        pooled.close()
    for k in first:
        assert np.array_equal(first[k], p_first[k]) and np.array_equal(second[k], p_second[k])
