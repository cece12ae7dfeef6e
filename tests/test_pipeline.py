"""Try-on calls: determinism, output size, batches, the slim path reproducing the stock one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_request_images
from tryon_lab import loading, metrics, pipeline
from tryon_lab.images import ImageInputError

FAST = pipeline.TryOnSettings(steps=2, progress=False)


def _req(seed=0, **kw):
    person, garment, mask = make_request_images(**kw)
    return pipeline.TryOnRequest(person, garment, mask, seed=seed)


def test_same_seed_same_output_and_size(slim):
    a = pipeline.tryon(slim, _req(seed=5), FAST)
    b = pipeline.tryon(slim, _req(seed=5), FAST)
    c = pipeline.tryon(slim, _req(seed=6), FAST)
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)
    assert a.images[0].size == (128, 192)
    assert set(a.timings) >= {"redux", "denoise", "decode", "total"}
    assert b.redux_cache_hits == 1  # same garment: Redux tokens reused


def test_odd_size_output_matches_input(slim):
    r = pipeline.tryon(slim, _req(w=100, h=150), FAST)
    assert r.images[0].size == (100, 150) and r.notes[0]


def test_batch_equals_single_runs(slim):
    reqs = [_req(seed=1), _req(seed=2)]
    batch = pipeline.tryon(slim, reqs, FAST)
    singles = [pipeline.tryon(slim, r, FAST) for r in reqs]
    for i, s in enumerate(singles):
        assert metrics.rel_l2(batch.latents[i], s.latents[0]) < 1e-5


def test_batch_sizes_must_match(slim):
    with pytest.raises(ImageInputError, match="one image size"):
        pipeline.tryon(slim, [_req(), _req(w=64, h=96)], FAST)


def test_slim_reproduces_standard(model_dir, slim):
    std = loading.load_standard(model_dir, torch.float32, "cpu")
    a = pipeline.tryon(slim, _req(seed=3), FAST)
    b = pipeline.tryon_standard(std, _req(seed=3), FAST)
    assert metrics.max_abs(a.latents, b.latents) == 0.0
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_paste_back_keeps_pixels_outside_the_mask(slim):
    req = _req(seed=4)
    out = pipeline.tryon(slim, req, FAST)
    keep = np.asarray(req.mask) < 128
    assert np.array_equal(np.asarray(out.images[0])[keep], np.asarray(req.person)[keep])
    raw = pipeline.tryon(slim, req, pipeline.TryOnSettings(steps=2, progress=False, paste_back=False))
    assert not np.array_equal(np.asarray(raw.images[0])[keep], np.asarray(req.person)[keep])
