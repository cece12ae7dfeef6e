"""Input validation: every bad input gets a documented conversion or an error that names the fix."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_request_images
from tryon_lab.images import ImageInputError, load_image, load_mask, person_half, prepare_input


def test_diptych_layout_and_mask():
    person, garment, mask = make_request_images()
    p = prepare_input(person, garment, mask)
    assert p.diptych.size == (256, 192) and p.mask.size == (256, 192)
    assert np.asarray(p.mask)[:, :128].max() == 0  # the garment side is never repainted
    assert np.array_equal(np.asarray(p.diptych)[:, 128:], np.asarray(person))
    assert person_half(p.diptych, p).size == person.size


def test_odd_sizes_are_padded_and_cropped_back():
    person, garment, mask = make_request_images(w=121, h=187)
    p = prepare_input(person, garment, mask)
    assert p.fitted_size == (128, 192) and "padded" in p.notes[0]
    assert person_half(p.diptych, p).size == (121, 187)
    r = prepare_input(person, garment, mask, fit="resize")
    assert r.fitted_size[0] % 16 == 0 and r.fitted_size[1] % 16 == 0 and "resized" in r.notes[0]
    assert person_half(r.diptych, r).size == (121, 187)


def test_garment_of_other_size_is_fitted():
    person, _, mask = make_request_images()
    garment = Image.new("RGB", (300, 200), (255, 0, 0))
    p = prepare_input(person, garment, mask)
    assert any("garment 300x200" in n for n in p.notes)


def test_mode_conversions():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert load_image(cmyk).mode == "RGB"
    sixteen = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert load_image(sixteen).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.full((8, 8, 3), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    rgb_mask = Image.new("RGB", (8, 8), (255, 255, 255))
    rgb_mask.paste((0, 0, 0), (0, 0, 4, 8))
    assert load_mask(rgb_mask, (8, 8)).mode == "L"


@pytest.mark.parametrize("case, match", [
    ("mask_size", "does not match the person"),
    ("empty_mask", "empty"),
    ("full_mask", "whole person"),
    ("tiny", "too small"),
    ("bad_fit", "fit must be"),
])
def test_bad_requests(case, match):
    person, garment, mask = make_request_images()
    kwargs = {}
    if case == "mask_size":
        mask = mask.resize((64, 64))
    elif case == "empty_mask":
        mask = Image.new("L", person.size, 0)
    elif case == "full_mask":
        mask = Image.new("L", person.size, 255)
    elif case == "tiny":
        person, mask = person.resize((16, 16)), mask.resize((16, 16))
    elif case == "bad_fit":
        kwargs["fit"] = "stretch"
    with pytest.raises(ImageInputError, match=match):
        prepare_input(person, garment, mask, **kwargs)


def test_bad_files(tmp_path):
    with pytest.raises(ImageInputError, match="not found"):
        load_image(tmp_path / "missing.png", "person")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ImageInputError, match="not a readable image"):
        load_image(junk, "garment")
    with pytest.raises(ImageInputError, match="not an image"):
        load_image(np.zeros((4, 4, 7), np.uint8))
    with pytest.raises(ImageInputError, match=r"\[0, 1\]"):
        load_image(np.full((4, 4), 3.0))
