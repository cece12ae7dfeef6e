"""The interactive app driven without a browser: set widget values, click Run, read outputs and errors."""

from __future__ import annotations

import datetime as dt
import io

import pytest
import torch
from PIL import Image

from tryon_lab import widgets


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
    assert app.outputs[1].value == b"" and app.logo_boxes.value == "60,102,81,123"  # s001's manifest box
    app.button.click()
    assert app.error.value == "", app.error.value
    res = app.last
    assert res is not None and res.tryon.size == res.person.size == (128, 192)
    assert all(w.value[:4] == b"\x89PNG" for w in app.outputs)
    for stage in ("redux", "denoise", "decode", "logo pass"):
        assert f"<td>{stage}</td>" in app.timing_table.value
    assert app.progress.value == app.progress.max
    assert len(res.matches) == 1 and "<table>" in app.match_table.value
    loads = widgets.load_count()
    app.seed.value = 1
    app.mask_mode.value = "ellipse"
    app.sliders["w"].value = 0.4
    app.teacache.value = 0.3
    app.lora.value = "rank4"
    app.logo_boxes.value = "60,102,81,123; 0,0,20,20"
    second = app.button.click() or app.last
    assert app.error.value == "" and second is not res and widgets.load_count() == loads  # warm: nothing reloaded
    assert second.settings["teacache"] == 0.3 and second.settings["lora"] == "rank4"
    assert len(second.matches) == 2 and "not found (skipped)" in app.match_table.value
    app.teacache.value, app.lora.value = 0.0, "none"
    assert widgets.get_pipeline(model_dir, torch.float32, "cpu") is widgets.get_pipeline(model_dir, torch.float32, "cpu")
    assert widgets.load_count() == loads
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
    assert widgets.overlay(Image.new("RGB", (100, 50)), m).getpixel((50, 25))[0] > 100


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
