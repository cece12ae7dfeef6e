"""Logo pass: box validation, template matching at a known place and scale, batched == sequential, LoRA."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tryon_lab import logos, pipeline


def _logo(size: int = 20, seed: int = 3) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.kron(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8), np.ones((size // 5, size // 5, 1), np.uint8))
    return Image.fromarray(arr)


def _scene(logo: Image.Image, at: tuple[int, int], scale: float, size=(128, 160)):
    """A smooth garment with the logo at (10, 20), and a try-on image with it at ``at``, resized by ``scale``."""
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([xx * 255 // size[0], yy * 255 // size[1], np.full_like(xx, 128)], -1).astype(np.uint8)
    garment = Image.fromarray(base.copy())
    garment.paste(logo, (10, 20))
    tryon = Image.fromarray(base[:, ::-1].copy())
    w = round(logo.width * scale)
    tryon.paste(logo.resize((w, w), Image.BICUBIC), at)
    return garment, tryon, (10, 20, 10 + logo.width, 20 + logo.height), (at[0], at[1], at[0] + w, at[1] + w)


def test_locate_finds_logo_at_known_place_and_scale_and_reports_missing():
    logo = _logo()
    garment, tryon, gbox, tbox = _scene(logo, (70, 90), 0.8)
    other = _logo(seed=11)  # on the garment, absent from the try-on
    garment.paste(other, (60, 20))
    matches = logos.locate_logos(garment, [gbox, (60, 20, 80, 40)], tryon)
    hit, miss = matches
    assert hit.found and hit.confidence > 0.9
    assert max(abs(a - b) for a, b in zip(hit.box, tbox, strict=True)) <= 1
    assert abs(hit.scale - 0.8) < 0.08
    assert not miss.found and miss.box is None and miss.confidence < 0.7
    # the search mask keeps the matcher away from the logo's true place -> not found, not guessed
    mask = Image.new("L", tryon.size, 0)
    mask.paste(255, (0, 0, 40, 40))
    assert not logos.locate_logos(garment, [gbox], tryon, search_mask=mask)[0].found
    drawn = logos.draw_boxes(tryon, matches)
    assert drawn.getpixel((hit.box[0], hit.box[1] + 2)) == (0, 255, 0)


@pytest.mark.parametrize("box, words", [((100, 10, 140, 30), "outside the image of 128x160"),
                                        ((-1, 0, 10, 10), "outside"),
                                        ((10, 10, 10, 30), "zero size"),
                                        ((10, 30, 20, 30), "zero size")])
def test_bad_boxes_are_named(box, words):
    garment, tryon, gbox, _ = _scene(_logo(), (70, 90), 1.0)
    with pytest.raises(ValueError, match=words) as e:
        logos.locate_logos(garment, [gbox, box], tryon)
    assert "garment logo box 1" in str(e.value) and "128x160" in str(e.value)


def test_parse_boxes():
    assert logos.parse_boxes("1,2,3,4; 5, 6, 7, 8;") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert logos.parse_boxes("") == []
    assert logos.format_boxes([(1, 2, 3, 4)]) == "1,2,3,4"
    with pytest.raises(ValueError, match="needs 4 numbers"):
        logos.parse_boxes("1,2,3")
    with pytest.raises(ValueError, match="not numbers"):
        logos.parse_boxes("a,b,c,d")


def test_batched_equals_sequential_and_skips_missing(slim):
    logo = _logo()
    garment, tryon, gbox, tbox = _scene(logo, (70, 90), 1.0)
    garment.paste(_logo(seed=11), (40, 60))
    matches = logos.locate_logos(garment, [gbox, (40, 60, 60, 80)], tryon)
    matches.append(logos.LogoMatch(2, gbox, (20, 30, 44, 54), 1.0, 1.0, True))
    settings = pipeline.TryOnSettings(steps=2, progress=False)
    a = logos.logo_pass(slim, tryon, garment, matches, settings, batched=True, size=32)
    b = logos.logo_pass(slim, tryon, garment, matches, settings, batched=False, size=32)
    assert a.calls == 1 and b.calls == 2 and a.skipped == b.skipped == [1]
    assert {"prepare", "generate", "paste", "total"} <= set(a.timings)
    for pa, pb in zip(a.patches, b.patches, strict=True):
        assert np.abs(np.asarray(pa, np.int16) - np.asarray(pb, np.int16)).max() <= 2
    assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() <= 2
    # pasted only inside the found boxes
    diff = np.abs(np.asarray(a.image, np.int16) - np.asarray(tryon, np.int16)).sum(-1)
    inside = np.zeros_like(diff, bool)
    for m in matches:
        if m.found:
            inside[m.box[1]:m.box[3], m.box[0]:m.box[2]] = True
    assert diff[~inside].max() == 0 and diff[inside].max() > 0


def test_logo_lora_loaded_once_kept_and_hotswapped(model_dir, monkeypatch):
    import torch

    from tryon_lab import loading, lora

    pipe = loading.load_slim(model_dir, torch.float32, "cpu")
    a, b = lora.make_default_loras(model_dir, ranks=(4, 8))
    lora.prepare_hotswap(pipe.fill, 8, pipe.lora)
    loads = []
    real = lora.load_lora
    monkeypatch.setattr(lora, "load_lora", lambda *args, **kw: loads.append(kw.get("hotswap")) or real(*args, **kw))
    garment, tryon, gbox, _ = _scene(_logo(), (70, 90), 1.0)
    matches = logos.locate_logos(garment, [gbox], tryon)
    settings = pipeline.TryOnSettings(steps=1, progress=False)
    request = pipeline.TryOnRequest(*_scene(_logo(), (70, 90), 1.0)[:2], Image.new("L", (128, 160), 0), seed=0)
    request.mask.paste(255, (20, 20, 100, 140))
    main_plain = pipeline.tryon(pipe, request, settings).images[0]
    plain = logos.logo_pass(pipe, tryon, garment, matches, settings, size=32)
    with_a = logos.logo_pass(pipe, tryon, garment, matches, settings, lora=a, size=32)
    logos.logo_pass(pipe, tryon, garment, matches, settings, lora=a, size=32)
    assert loads == [False] and with_a.lora == str(a)  # loaded once, kept
    assert list(pipe.fill.get_list_adapters()["transformer"]) == [lora.PASS_ADAPTER]
    with_b = logos.logo_pass(pipe, tryon, garment, matches, settings, lora=b, size=32)
    assert loads == [False, True] and list(pipe.fill.get_list_adapters()["transformer"]) == [lora.PASS_ADAPTER]
    again_plain = logos.logo_pass(pipe, tryon, garment, matches, settings, size=32)
    assert np.array_equal(np.asarray(plain.image), np.asarray(again_plain.image))
    assert not np.array_equal(np.asarray(plain.patches[0]), np.asarray(with_a.patches[0]))
    assert not np.array_equal(np.asarray(with_a.patches[0]), np.asarray(with_b.patches[0]))
    # the LoRA is off outside the pass: the main try-on is unchanged
    assert np.array_equal(np.asarray(main_plain), np.asarray(pipeline.tryon(pipe, request, settings).images[0]))
