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


def test_conditioning_pads_text_with_its_last_position_to_a_multiple():
    import torch

    from tryon_lab.pipeline import conditioning

    text, pooled, redux = torch.randn(1, 5, 4), torch.randn(1, 3), torch.randn(2, 2, 4)
    same, _ = conditioning(text, pooled, redux)
    assert same.shape == (2, 7, 4)
    padded, pooled2 = conditioning(text, pooled, redux, multiple=4)
    assert padded.shape == (2, 8, 4) and pooled2.shape == (2, 3)
    assert torch.equal(padded[:, :5], same[:, :5]) and torch.equal(padded[:, 5], text[:, -1].expand(2, -1))
    assert torch.equal(padded[:, 6:], redux)  # the Redux tokens follow the padded text unchanged


def test_result_notes_report_input_conversions(slim):
    person, garment, mask = make_request_images()
    r = pipeline.tryon(slim, pipeline.TryOnRequest(person, garment.convert("RGBA"), mask), FAST)
    assert r.notes == [["garment: RGBA converted to 8-bit RGB (transparency composited over white)"]]


def test_build_pipeline_checks_the_model_folder_before_anything_starts(tmp_path, monkeypatch):
    from tryon_lab import checkpoint, configure, parallel

    def never(*a, **k):
        raise AssertionError("started loading (or a process group) for a folder that does not exist")

    monkeypatch.setattr(configure, "load_slim", never)
    monkeypatch.setattr(parallel, "init_distributed", never)
    missing = tmp_path / "models"
    for build in (configure.build_pipeline, configure.get_pipeline):
        with pytest.raises(checkpoint.ModelFolderError, match=f"model folder {missing} does not exist.*TRYON_LAB_MODELS"):
            build(missing, device="cpu", context_parallel=parallel.ContextParallel(ulysses_degree=2))
    assert not any(str(missing) in key[0] for key in configure._WARM)  # nothing was cached for it


def test_build_pipeline_takes_the_model_names_its_errors_offer(monkeypatch):
    """``build_pipeline("trained")`` / ``("default")``: the names ``MODEL_CHOICES`` tells a user to pass."""
    from tryon_lab import checkpoint, configure

    seen = []
    monkeypatch.setattr(configure, "load_slim", lambda model_dir, *a, **k: seen.append(model_dir) or 1 / 0)
    for name in ("trained", "default"):
        with pytest.raises(ZeroDivisionError):
            configure.build_pipeline(name, device="cpu")
    assert seen == [checkpoint.TRAINED_DIR, checkpoint.default_model_dir()]
    assert "model='default', 'trained', 'random'" in checkpoint.MODEL_CHOICES


def test_sample_ids_are_checked_from_the_manifest_alone(monkeypatch):
    from tryon_lab import samples

    assert samples.check_sample_id("s003") == "s003" and samples.check_sample_id(0) == "s000"
    monkeypatch.setattr(samples, "_open", lambda *a: (_ for _ in ()).throw(AssertionError("opened an image")))
    for bad in ("s999", "S000", 99):
        with pytest.raises(samples.UnknownSampleError) as info:
            samples.check_sample_id(bad)
        assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
        assert "valid ids: s000, s001" in str(info.value) and not str(info.value).startswith("'")
    monkeypatch.undo()
    with pytest.raises(KeyError, match="valid ids: s000"):
        samples.load_sample("s999")
    with pytest.raises(ValueError, match="height must be a positive whole number"):
        samples.load_sample("s000", height=-5)


def test_resize_paste_back_keeps_pixels_outside_the_mask(slim):
    req = _req(seed=4, w=100, h=150)
    out = pipeline.tryon(slim, req, pipeline.TryOnSettings(steps=2, progress=False, fit="resize"))
    keep = np.asarray(req.mask) < 128
    assert out.images[0].size == (100, 150) and "resized" in out.notes[0][0]
    assert np.array_equal(np.asarray(out.images[0])[keep], np.asarray(req.person)[keep])


def test_sigmoid_gelu_option_gives_the_same_tryon(model_dir):
    """``PipelineOptions(sigmoid_gelu=True)``: every tanh GELU computed as x * sigmoid(2z), the same function; the
    try-on's latents stay within fp32 rounding of the default build's."""
    from tryon_lab import compiling, configure

    plain = configure.build_pipeline(model_dir, device="cpu", dtype="float32")
    swapped = configure.build_pipeline(model_dir, device="cpu", dtype="float32", sigmoid_gelu=True)
    singles = plain.transformer.config.num_single_layers  # each single block's act_mlp (the double blocks' GELU
    assert sum(isinstance(m, compiling.SigmoidGELU) for m in swapped.transformer.modules()) == singles  # kept)
    assert not any(isinstance(m, compiling.SigmoidGELU) for m in plain.transformer.modules())
    a, b = pipeline.tryon(plain, _req(seed=3), FAST), pipeline.tryon(swapped, _req(seed=3), FAST)
    assert (a.latents - b.latents).norm() / a.latents.norm() < 1e-4
