"""The interactive app driven without a browser: set widget values, click Run, read outputs and errors."""

from __future__ import annotations

import datetime as dt
import io

import numpy as np
import pytest
import torch
from PIL import Image

from tryon_lab import checkpoint, configure, samples, widgets


def _png(value: bytes) -> Image.Image:
    assert value[:4] == b"\x89PNG", "an empty W.Image shows a broken-image icon"
    return Image.open(io.BytesIO(value))


def _upload(content: bytes, name: str) -> tuple:
    return ({"name": name, "type": "", "size": len(content), "content": memoryview(content),
             "last_modified": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)},)


@pytest.fixture(scope="module")
def app(model_dir):
    from tryon_lab import lora

    loras = {"rank4": lora.make_default_loras(model_dir, ranks=(4,))[0]}
    return widgets.TryOnApp(model=model_dir, device="cpu", dtype="float32", person="s000", garment="s001", steps=2,
                            loras=loras)


def test_click_runs_and_shows_outputs_then_warm_cache_loads_nothing(app, model_dir):
    assert app.logo_boxes.value == "60,102,81,123"  # s001's manifest box
    before = [w.value for w in app.outputs]
    assert all(_png(v) for v in before)  # placeholders before the first run, never an empty image
    assert np.array_equal(np.asarray(_png(app.garment_preview.value)),
                          np.asarray(widgets.samples.load_sample("s001").garment.resize((256, 384), Image.NEAREST)))
    app.button.click()
    assert app.error.value == "", app.error.value
    res = app.last
    assert res is not None and res.tryon.size == res.person.size == (128, 192)
    assert all(_png(w.value) for w in app.outputs) and [w.value for w in app.outputs] != before
    for stage in ("redux", "denoise", "decode", "logo pass"):
        assert f"<td>{stage}</td>" in app.timing_table.value
    assert app.timing_table.value.index("timings (s)") < app.timing_table.value.index("<table>")
    assert app.match_table.value.index("logo matches") < app.match_table.value.index("<table>")
    assert app.progress.value == app.progress.max
    assert len(res.matches) == 1 and "<table>" in app.match_table.value
    loads = configure.warm_pipelines()
    app.seed.value = 1
    app.mask_mode.value = "ellipse"
    app.sliders["w"].value = 0.4
    app.teacache.value = 0.3
    app.lora.value = "rank4"
    app.logo_boxes.value = "60,102,81,123; 0,0,20,20"
    second = app.button.click() or app.last
    assert app.error.value == "" and second is not res and configure.warm_pipelines() == loads  # warm: nothing reloaded
    assert second.settings["teacache"] == 0.3 and second.settings["lora"] == "rank4"
    assert len(second.matches) == 2 and "not found (skipped)" in app.match_table.value
    app.teacache.value, app.lora.value = 0.0, "none"
    assert configure.get_pipeline(model_dir, device="cpu", dtype="float32") is app.pipeline()
    assert configure.warm_pipelines() == loads
    app.mask_mode.value = "manifest"


def test_bad_inputs_show_clear_errors_instead_of_raising(app):
    app.logo_boxes.value = "100,100,140,130"  # garment is 128x192
    assert app.run() is None and "outside the image of 128x192" in app.error.value and "logo box 0" in app.error.value
    app.logo_boxes.value = "10,10,10,20"
    assert app.run() is None and "zero size" in app.error.value
    app.logo_boxes.value = "1,2,3"
    assert app.run() is None and "needs 4 numbers" in app.error.value
    app.logo_boxes.value = ""
    app.garment.value = widgets.UPLOAD
    assert app.run() is None and "no file was uploaded" in app.error.value
    app.garment_upload.value = _upload(b"this is not an image", "notes.txt")
    assert app.run() is None and "'notes.txt' is not an image" in app.error.value
    buf = io.BytesIO()
    Image.new("RGB", (64, 96), (200, 30, 30)).save(buf, format="PNG")
    app.garment_upload.value = _upload(buf.getvalue(), "red.png")
    assert app.run() is not None and app.error.value == ""
    app.person.value = widgets.UPLOAD
    app.person_upload.value = _upload(buf.getvalue(), "red.png")
    assert "no manifest mask" in app.error.value  # shown by the preview as soon as the choice is made
    app.mask_mode.value = "box"
    assert app.run() is not None and app.last.tryon.size == (64, 96)


def test_shape_mask_and_overlay():
    m = widgets.shape_mask((100, 50), "box", 0.5, 0.5, 0.5, 0.5)
    assert m.getbbox() == (25, 12, 75, 38)
    e = widgets.shape_mask((100, 50), "ellipse", 0.5, 0.5, 0.5, 0.5)
    assert e.getpixel((25, 12)) == 0 and e.getpixel((50, 25)) == 255
    person = Image.new("RGB", (100, 50), (10, 120, 30))
    shown = widgets.overlay(person, m, color=(255, 0, 255))
    assert shown.getpixel((25, 12)) == shown.getpixel((74, 37)) == (255, 0, 255)  # the outline
    assert shown.getpixel((50, 25)) == (10, 120, 30)  # inside, off the hatching: the clothes keep their colour
    assert shown.getpixel((5, 5)) == (10, 120, 30)  # outside the mask: untouched
    inside = np.asarray(shown)[16:34, 29:71].reshape(-1, 3)  # the interior, away from the outline
    kept = (inside == (10, 120, 30)).all(axis=1).mean()
    assert 0.8 < kept < 1.0  # sparse hatching: most of the region shows the person's own pixels
    left = widgets.shape_mask((100, 50), "box", 0.25, 0.5, 0.5, 1.0)  # touches the image's left, top and bottom
    assert widgets.overlay(person, left, color=(255, 255, 0)).getpixel((0, 25)) == (255, 255, 0)  # border outlined


def _reset(app):
    """The module's app back on samples (earlier tests leave uploads and a box mask chosen)."""
    app.person_upload.value = app.garment_upload.value = ()
    app.person.value, app.garment.value, app.mask_mode.value = "s000", "s001", "manifest"
    assert app.error.value == "", app.error.value


def test_placeholders_instead_of_empty_images_and_finer_sliders(app):
    _reset(app)
    assert app.sliders["cx"].step == 0.005 and app.sliders["cx"].readout_format == ".3f"
    assert all(abs(s.value * 1000 - round(s.value * 1000)) < 1e-6 for s in app.sliders.values())
    assert any(abs(s.value * 100 - round(s.value * 100)) > 1e-6 for s in app.sliders.values())  # not cut to 0.01
    app.garment.value = widgets.UPLOAD  # nothing uploaded yet: a placeholder and no error
    try:
        assert app.garment_upload.value == () and _png(app.garment_preview.value) and app.error.value == ""
        assert app.garment_preview.value == widgets.placeholder("upload a garment image", scale=app.scale)
    finally:
        app.garment.value = "s001"
    assert app.garment_preview.value != widgets.placeholder("upload a garment image", scale=app.scale)


def test_a_failed_run_clears_the_previous_result_and_the_progress(app):
    _reset(app)
    assert app.run() is not None and app.progress.value == app.progress.max > 0
    app.logo_boxes.value = "1,2,3"
    try:
        assert app.run() is None and "needs 4 numbers" in app.error.value and app.last is None
        assert app.progress.value == 0 and "<table>" not in app.timing_table.value + app.match_table.value
        failed = widgets.placeholder("try-on: failed (see the error above)", scale=app.scale)
        assert app.outputs[1].value == failed
    finally:
        app.logo_boxes.value = "60,102,81,123"


def test_sample_ids_and_settings_are_checked_before_anything_loads(monkeypatch):
    def no_model(model):
        raise AssertionError("the model was resolved before the inputs were checked")

    monkeypatch.setattr(checkpoint, "resolve_model_dir", no_model)
    with pytest.raises(samples.UnknownSampleError, match="person: sample 's999'.*s000, s001"):
        widgets.TryOnApp(person="s999")
    with pytest.raises(KeyError, match="garment: sample 'shirt'"):
        widgets.TryOnApp(garment="shirt")
    with pytest.raises(ValueError, match="steps must be between 1 and 50"):
        widgets.TryOnApp(steps=0)
    with pytest.raises(ValueError, match="needs 4 numbers"):
        widgets.TryOnApp(logos_text="1,2,3")
    with pytest.raises(ValueError, match="'style' is not one of the try-on LoRAs given \\(none, a\\)"):
        widgets.TryOnApp(tryon_loras={"a": "x"}, tryon_lora="style")


def test_a_missing_model_folder_fails_when_the_app_is_made(tmp_path):
    with pytest.raises(checkpoint.ModelFolderError, match=f"{tmp_path / 'nope'} does not exist.*'random'"):
        widgets.TryOnApp(model=tmp_path / "nope")
    with pytest.raises(checkpoint.ModelFolderError, match=f"{tmp_path} has no FLUX.1-Fill-dev/ or FLUX.1-Redux-dev/"):
        widgets.TryOnApp(model=tmp_path)  # a folder, but not a model folder


def test_out_of_memory_recovery_is_shown_in_the_widget(app, monkeypatch):
    from tryon_lab import pipeline

    real, calls = pipeline.decode, []

    def flaky(*a, **k):  # the first decode runs out of memory, as a small card would
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "decode", flaky)
    vae = app.pipeline().fill.vae
    try:
        res = app.run()
        assert res is not None and app.error.value == ""
        assert res.recoveries == ["decode: out of memory; retried with VAE tiling (left on for later requests)"]
        assert "recovered: decode: out of memory" in app.timing_table.value
    finally:
        vae.disable_tiling()
