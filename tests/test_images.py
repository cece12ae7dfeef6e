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


def test_more_modes_convert_and_prepare_input_reports_each_conversion():
    assert load_image(Image.fromarray(np.full((8, 8), 0.5, np.float32))).getpixel((0, 0)) == (128, 128, 128)
    assert load_image(Image.fromarray(np.full((8, 8), 200.0, np.float32))).getpixel((0, 0)) == (200, 200, 200)
    assert load_image(Image.new("La", (8, 8), (0, 0))).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert load_image(Image.new("PA", (8, 8))).mode == "RGB"
    person, garment, mask = make_request_images()
    p = prepare_input(person, garment.convert("RGBA"), np.asarray(mask) > 0)
    assert p.notes == ["garment: RGBA converted to 8-bit RGB (transparency composited over white)"]
    soft = Image.fromarray((np.asarray(mask) * 0.8).astype(np.uint8))  # grey levels 0 and 204
    assert "mask: grey levels binarised at 128" in " ".join(prepare_input(person, garment, soft).notes)


def test_exif_orientation_is_applied_and_reported(tmp_path):
    person, garment, mask = make_request_images()  # 128x192 upright
    sideways = person.transpose(Image.Transpose.ROTATE_90)  # stored 192x128, shown upright by its EXIF tag
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    sideways.save(path, exif=exif, quality=95)
    p = prepare_input(path, garment, mask)
    assert p.person_size == (128, 192) and any("EXIF orientation 6" in n for n in p.notes)


def test_masks_with_transparency_other_sizes_and_bad_files(tmp_path):
    person, _, mask = make_request_images()
    strokes = Image.new("RGBA", person.size, (255, 255, 255, 0))  # white strokes on a transparent background
    strokes.paste((255, 255, 255, 255), (20, 40, 100, 150))
    m = load_mask(strokes, person.size)
    assert m.getpixel((0, 0)) == 0 and m.getpixel((50, 100)) == 255  # transparent = keep, not "whole image"
    half = mask.resize((64, 96), Image.NEAREST)  # the person's aspect at half size: resized, and said so
    p = prepare_input(person, person, half)
    assert np.array_equal(np.asarray(p.mask)[:, 128:], np.asarray(half.resize(person.size, Image.NEAREST)))
    assert any("64x96 resized to the person's 128x192" in n for n in p.notes)
    with pytest.raises(ImageInputError, match="turned 90 degrees"):
        load_mask(mask.transpose(Image.Transpose.ROTATE_90), person.size)
    junk = tmp_path / "mask.png"
    junk.write_text("a text file named like an image")
    with pytest.raises(ImageInputError, match="mask: .*mask.png is not a readable image"):
        prepare_input(person, person, junk)
    with pytest.raises(ImageInputError, match="mask: file not found"):
        load_mask(tmp_path / "nope.png", person.size)


@pytest.mark.parametrize("source, match", [
    (np.full((4, 4), np.nan), "NaN"),
    (np.zeros((0, 4), np.uint8), "empty"),
    (np.zeros((4, 4), np.int64), "unsupported array dtype"),
    (Image.new("RGB", (0, 5)), "empty"),
    (Image.fromarray(np.full((4, 4), 300.0, np.float32)), r"\[0, 1\] or \[0, 255\]"),
    (3.5, "expected a path, PIL image or numpy array"),
])
def test_bad_arrays_and_objects(source, match):
    with pytest.raises(ImageInputError, match=match):
        load_image(source, "garment")


def test_folders_and_huge_files_are_named(tmp_path, monkeypatch):
    with pytest.raises(ImageInputError, match="is a folder, not an image file"):
        load_image(tmp_path, "person")
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 is > 2x the limit: PIL refuses to decode it
    with pytest.raises(ImageInputError, match="too large to open safely"):
        load_image(big, "person")


def test_cmyk_16_bit_and_alpha_conversions_are_noted(tmp_path):
    import struct
    import zlib

    from tryon_lab.images import read_image

    cmyk = read_image(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "garment")
    assert cmyk[0].mode == "RGB" and cmyk[1] == [
        "garment: CMYK converted to 8-bit RGB (CMYK inks to RGB by PIL's plain formula, no colour profile: colours may shift)"]
    grey16 = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(grey16)
    img, notes = read_image(grey16, "person")
    assert img.getpixel((0, 0)) == (156, 156, 156) and "I;16" in notes[0] and "16/32-bit values scaled" in notes[0]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rgb16 = tmp_path / "rgb16.png"  # a 16-bit RGB PNG (PIL reads it as 8-bit RGB without a word)
    rows = b"".join(b"\x00" + np.full((8, 3), 0xFFFF, ">u2").tobytes() for _ in range(8))
    rgb16.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0))
                      + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    img, notes = read_image(rgb16, "person")
    assert img.getpixel((0, 0)) == (255, 255, 255) and notes == ["person: 16-bit RGB PNG reduced to 8 bits per channel"]
    assert read_image(np.full((8, 8, 3), 65535, np.uint16), "person")[1] == ["person: uint16 array (16-bit) scaled to 8 bits"]
    assert read_image(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "garment")[1] == [
        "garment: RGBA converted to 8-bit RGB (transparency composited over white)"]


def test_resize_paste_back_keeps_every_pixel_outside_the_mask_at_the_input_size():
    from tryon_lab.images import paste_back

    rng = np.random.default_rng(0)
    person = Image.fromarray(rng.integers(0, 255, (750, 1000, 3), dtype=np.uint8))
    mask = np.zeros((750, 1000), np.uint8)
    mask[200:500, 300:700] = 255
    p = prepare_input(person, person, Image.fromarray(mask, "L"), fit="resize")
    assert p.fitted_size != p.person_size and "pasted into the original 1000x750 person" in p.notes[0]
    generated = Image.fromarray(rng.integers(0, 255, p.diptych.size[::-1] + (3,), dtype=np.uint8))
    out = np.asarray(paste_back(generated, p))
    keep = mask < 128
    assert out.shape == (750, 1000, 3) and np.array_equal(out[keep], np.asarray(person)[keep])
    assert np.array_equal(out[~keep], np.asarray(person_half(generated, p))[~keep])  # inside: the generated pixels
