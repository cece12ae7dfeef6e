"""Procedural virtual try-on pairs (garment, person, mask, target), deterministic from ``(seed, index)``.

Why procedural: training and scoring a try-on model needs exact ground truth. The target is rendered from
the very flat garment image through known homographies (``cv2.warpPerspective``, one per part: torso and
each sleeve), so target logo boxes, the repaint mask and "target == person outside the mask" hold by
construction instead of being estimated. Logos are placed only where they stay fully visible on the body.

Per sample: sample a body, a new garment and a different old garment; draw each garment flat (pattern,
seams, logos); person = body + old garment, target = body + new garment (arms and head are layers drawn
over both); mask = the union of both garment alphas, dilated by ~H/96 px.

Speed (192x128, ``make_batch``, one core, cv2.setNumThreads(1)): 2.9-3.5 ms per sample on a 16-core Xeon
GPU host, ~2.2 ms on a desktop core; ``iter_batches(workers=15)`` on that host: ~2,300-3,400 samples/s.
"""

from __future__ import annotations

import colorsys
import itertools
import json
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

KINDS = ("shirt", "tshirt", "dress", "jacket")
PATTERNS = ("solid", "stripes_h", "stripes_v", "checks", "dots", "print")
LOGO_NAMES = ("badge", "star", "triangle", "chevron", "ring", "diamond", "bars", "cross")
LOGO_PALETTE = ((20, 20, 20), (245, 245, 245), (220, 30, 40), (250, 200, 20), (30, 90, 220),
                (20, 160, 80), (240, 120, 20), (150, 40, 180), (0, 180, 200), (255, 105, 180))
GARMENT_BG = (246, 245, 242)  # plain light product-shot background
_SHIFT, _ONE = 4, 16  # cv2 fixed-point drawing: 1/16 px vertex precision gives smooth anti-aliased edges
Color = tuple[int, int, int]
Box = tuple[int, int, int, int]
Patch = tuple[int, int, np.ndarray, np.ndarray]  # x, y, RGB crop, alpha crop: a layer touches only its box


@dataclass
class SyntheticConfig:
    height: int = 192  # person/garment image height (pixels), multiple of 16
    width: int = 128  # person/garment image width, multiple of 16
    min_logos: int = 1
    max_logos: int = 3

    def __post_init__(self) -> None:
        if self.height % 16 or self.width % 16 or min(self.height, self.width) < 64:
            raise ValueError(f"height/width must be multiples of 16 and >= 64, got {self.height}x{self.width}")
        if not 1 <= self.min_logos <= self.max_logos <= 4:
            raise ValueError(f"need 1 <= min_logos <= max_logos <= 4, got {self.min_logos}..{self.max_logos}")


@dataclass
class TryOnSample:
    garment: Image.Image  # RGB flat garment on a light background
    person: Image.Image  # RGB person wearing another garment
    mask: Image.Image  # L, 255 = repaint, 0 = keep
    target: Image.Image  # RGB person wearing `garment` (ground truth)
    garment_logo_boxes: list[Box]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive
    target_logo_boxes: list[Box]  # same logos, through the torso homography
    logo_ids: list[int]  # index into LOGO_NAMES, one per box
    meta: dict = field(default_factory=dict)  # garment kind, colours, pattern, seed, index, ...


# ------------------------------------------------------------------------------------------ drawing helpers
def _u(rng: np.random.Generator, a: float, b: float) -> float:
    return a + (b - a) * rng.random()


def _solid(h: int, w: int, color: Any) -> np.ndarray:
    """(h, w, 3) uint8 filled with `color`; ~15x faster than `img[:] = color` (numpy's 3-wide broadcast)."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = np.tile(np.uint8(color), (w, 1))
    return img


def _fp(p: Any) -> np.ndarray:
    return (np.asarray(p, np.float64) * _ONE).round().astype(np.int32).reshape(-1, 2)


def _fill(img: np.ndarray, polys: list, color: Any, line: float = 0) -> None:
    """Anti-aliased filled polygons, or with `line` > 0 open polylines of that width."""
    if line:
        cv2.polylines(img, [_fp(p) for p in polys], False, color, max(1, round(line)), cv2.LINE_AA, _SHIFT)
    else:
        cv2.fillPoly(img, [_fp(p) for p in polys], color, cv2.LINE_AA, _SHIFT)


def _circle(img: np.ndarray, c: Any, r: float, color: Any, axes: Any = None, arc: tuple = (0, 360)) -> None:
    """Filled circle, or with `axes` a filled ellipse (arc in degrees, 180..360 = upper half)."""
    ax = tuple(round(v * _ONE) for v in (axes or (r, r)))
    cv2.ellipse(img, tuple(_fp(c)[0].tolist()), ax, 0, arc[0], arc[1], color, -1, cv2.LINE_AA, _SHIFT)


def _shade(c: Color, f: float) -> Color:
    """Darken (f < 1) or lighten towards white (f > 1): seams, collars, buttons."""
    return tuple(int(v * f) if f < 1 else int(v + (255 - v) * (f - 1)) for v in c)  # type: ignore[return-value]


def _color(rng: np.random.Generator, s: tuple, v: tuple, far_from: tuple = (), dist: float = 0) -> Color:
    """Random HSV colour, re-drawn until it is at least `dist` (RGB) from every colour in `far_from`."""
    while True:
        c = tuple(int(x * 255) for x in colorsys.hsv_to_rgb(_u(rng, 0, 1), _u(rng, *s), _u(rng, *v)))
        if all(math.dist(c, o) > dist for o in far_from):
            return c  # type: ignore[return-value]


def _limb(a: Any, ang: float, side: int, back: float, length: float, w0: float, w1: float) -> np.ndarray:
    """Quad along an axis from `a` tilted `ang` rad outwards: outer-top, outer-bot., inner-bot., inner-top."""
    dx, dy, nx, ny = side * math.sin(ang), math.cos(ang), side * math.cos(ang), -math.sin(ang)  # n: outwards
    sx, sy, ex, ey = a[0] - dx * back, a[1] - dy * back, a[0] + dx * length, a[1] + dy * length
    return np.array([[sx + nx * w0, sy + ny * w0], [ex + nx * w1, ey + ny * w1], [ex - nx * w1, ey - ny * w1],
                     [sx - nx * w0, sy - ny * w0]])


# -------------------------------------------------------------------------------------------------- logos
_STAR = [v for i in range(10) for v in (0.5 + (0.5, 0.2)[i % 2] * math.cos(i * math.pi / 5 - math.pi / 2),
                                        0.5 + (0.5, 0.2)[i % 2] * math.sin(i * math.pi / 5 - math.pi / 2))]
# per logo: (shape layer, detail layer), each a list of ("c", cx, cy, r) circles, ("h", ...) holes and polygons
_LOGOS: tuple = (
    ([("c", .5, .5, .48)], [(.3, .26, .72, .26, .72, .36, .3, .36), (.3, .45, .62, .45, .62, .55, .3, .55),
                            (.3, .64, .72, .64, .72, .74, .3, .74), (.3, .26, .4, .26, .4, .74, .3, .74)]),
    ([_STAR], [("c", .5, .5, .11)]),
    ([(.5, .03, .98, .95, .02, .95)], [(.3, .52, .7, .52, .5, .86)]),
    ([(0, .02, .5, .37, 1, .02, 1, .26, .5, .61, 0, .26)],
     [(0, .38, .5, .73, 1, .38, 1, .62, .5, .97, 0, .62)]),
    ([("c", .5, .5, .49), ("h", .5, .5, .3)], [("c", .5, .5, .17)]),
    ([(.5, 0, 1, .5, .5, 1, 0, .5)], [(.5, .27, .73, .5, .5, .73, .27, .5)]),
    ([(0, .04, 1, .04, 1, .3, 0, .3), (.2, .7, .8, .7, .8, .96, .2, .96)],
     [(.08, .37, .92, .37, .92, .63, .08, .63)]),
    ([(.34, 0, .66, 0, .66, 1, .34, 1), (0, .34, 1, .34, 1, .66, 0, .66)], [("c", .5, .5, .12)]),
)


@lru_cache(maxsize=512)
def _logo_layers(logo_id: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(shape, detail) alpha layers in [0, 1], drawn at 4x then area-downsampled; cached per (id, size)."""
    if not 0 <= logo_id < len(_LOGOS):
        raise ValueError(f"logo_id must be in 0..{len(_LOGOS) - 1}, got {logo_id}")
    s, out = size * 4, []
    for layer in _LOGOS[logo_id]:
        m = np.zeros((s, s), np.uint8)
        for item in layer:
            if item[0] in ("c", "h"):
                _circle(m, (item[1] * s, item[2] * s), item[3] * s, 255 if item[0] == "c" else 0)
            else:
                _fill(m, [np.reshape(item, (-1, 2)) * s], 255)
        out.append(cv2.resize(m, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255)
    return out[0], out[1]


def _logo_rgba(logo_id: int, size: int, colors: tuple[Color, Color]) -> tuple[np.ndarray, np.ndarray]:
    la, lb = _logo_layers(logo_id, size)
    alpha = la + lb * (1 - la)
    pre = np.float32(colors[0]) * (la * (1 - lb))[..., None] + np.float32(colors[1]) * lb[..., None]
    return pre / np.maximum(alpha, 1e-6)[..., None], alpha


def make_logo(logo_id: int, size: int, colors: tuple[Color, Color]) -> Image.Image:
    """RGBA logo `logo_id` (0..7, names in LOGO_NAMES): shape in colors[0], inner detail in colors[1]."""
    rgb, alpha = _logo_rgba(logo_id, size, colors)
    return Image.fromarray(np.dstack([rgb, alpha * 255]).round().clip(0, 255).astype(np.uint8), "RGBA")


# ------------------------------------------------------------------------------------------- random specs
def _sample_body(rng: np.random.Generator, h: int, w: int) -> dict[str, Any]:
    """Body sizes in pixels, all scaled from the height so any aspect ratio keeps a human figure."""
    sw, aw, arm = h * _u(rng, 0.1, 0.135), h * _u(rng, 0.046, 0.058), h * _u(rng, 0.3, 0.34)
    b = dict(cx=w / 2 + h * _u(rng, -0.025, 0.025), head_r=h * _u(rng, 0.054, 0.064), sw=sw, aw=aw, arm=arm,
             th=h * _u(rng, 0.27, 0.31), waist=sw * _u(rng, 0.7, 0.88), hip=sw * _u(rng, 0.8, 0.96),
             foot=h * _u(rng, 0.93, 0.97), head_y=h * _u(rng, 0.095, 0.115), hair_style=int(rng.integers(4)))
    b["sy"] = b["head_y"] + b["head_r"] + h * _u(rng, 0.035, 0.05)  # shoulder line
    b["twist"] = rng.uniform(-0.012, 0.012, (4, 2)) * h  # torso corner jitter: true perspective, not affine
    room = (b["cx"] - sw - 3, w - b["cx"] - sw - 3)  # arm angles keep the hands inside the frame
    b["arm_ang"] = [min(math.radians(_u(rng, 5, 32)), math.asin(min(1.0, max(0.05, r / (arm + aw)))))
                    for r in room]
    skin = ((255, 219, 190), (240, 190, 150), (214, 160, 120), (176, 120, 82), (128, 84, 56), (90, 58, 40))
    b["skin"] = tuple(int(np.clip(v + rng.integers(-8, 9), 0, 255)) for v in skin[int(rng.integers(6))])
    hair = ((25, 20, 18), (70, 45, 30), (120, 80, 45), (200, 165, 100), (150, 60, 30), (150, 150, 150))
    b["hair"] = hair[int(rng.integers(len(hair)))]
    b["trousers"], b["shoes"] = _color(rng, (0.1, 0.6), (0.15, 0.6)), _color(rng, (0, 0.5), (0.05, 0.3))
    b["bg_kind"] = ("flat", "gradient", "shapes")[int(rng.integers(3))]
    b["bg"] = [_color(rng, (0.05, 0.35), (0.55, 0.95)) for _ in range(2)]
    return b


def _sample_garment(rng: np.random.Generator, avoid: dict | None = None) -> dict[str, Any]:
    """Cut, colours and pattern (sizes in shoulder half-widths); with `avoid`, colour and pattern differ."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    sleeve = {"shirt": _u(rng, .85, 1.0), "tshirt": _u(rng, .28, .45), "jacket": _u(rng, .9, 1.02),
              "dress": _u(rng, .22, .35) if rng.random() < 0.5 else 0.0}[kind]
    length = {"shirt": (1.0, 1.15), "tshirt": (0.95, 1.08), "jacket": (1.0, 1.2), "dress": (1.75, 2.05)}[kind]
    neck = "collar" if kind in ("shirt", "jacket") else ("crew", "vneck")[int(rng.integers(2))]
    g = dict(kind=kind, sleeve=sleeve, length=_u(rng, *length), neckline=neck,
             loose=_u(rng, 1.03, 1.16) + (0.06 if kind == "jacket" else 0.0),
             flare=_u(rng, 1.25, 1.65) if kind == "dress" else _u(rng, 1.0, 1.06),
             shoulder=_u(rng, 1.0, 1.06) if sleeve > 0 else _u(rng, 0.7, 0.8),
             flat_ang=math.radians(_u(rng, 10, 22) if sleeve > 0.6 else _u(rng, 42, 58)),
             neck_w=_u(rng, 0.3, 0.42))
    depth = {"crew": (.18, .3), "vneck": (.5, .85), "collar": (.35, .8 if kind == "jacket" else .45)}
    g["neck_d"] = _u(rng, *depth[neck])
    g["base"] = _color(rng, (0.15, 0.9), (0.25, 0.9), (avoid["base"],) if avoid else (), 90)
    g["second"] = _color(rng, (0.0, 0.9), (0.1, 1.0), (g["base"],), 80)
    patterns = [p for p in PATTERNS if avoid is None or p != avoid["pattern"]]
    g["pattern"], g["period"] = patterns[int(rng.integers(len(patterns)))], _u(rng, 0.05, 0.1)
    return g


# ---------------------------------------------------------------------------------- garment and body maps
def _geometry(g: dict, b: dict, h: int, w: int) -> dict[str, Any]:
    """Flat-lay polygons (garment px) and matching quads on the body (person px), part by part.

    Nominal units: shoulder half-width = 1. Part 0 = torso, parts 1/2 = sleeves; each part's homography maps
    its flat quad onto its body quad, so pattern and logos follow the body exactly.
    """
    top, hem, L, sl, aw = g["shoulder"], 0.88 * g["loose"] * g["flare"], 2.4 * g["length"], 0.12, 0.42
    nw, nd = g["neck_w"], g["neck_d"]
    t = np.linspace(math.pi, 0, 9)
    neck = [[-nw, 0], [0, nd], [nw, 0]]  # vneck / collar: a V; crew: half an ellipse
    neck = np.stack([nw * np.cos(t), nd * np.sin(t)], 1) if g["neckline"] == "crew" else neck
    torso = np.vstack([[[-top, sl]], neck, [[top, sl], [hem, L], [-hem, L]]])
    quads = [np.array([[-top, 0], [top, 0], [hem, L], [-hem, L]])]
    quads += [_limb((s * (top - aw / 2), sl + aw / 2), g["flat_ang"], s, 0.3 * aw, g["sleeve"] * 2.8,
                    aw * 0.62 * g["loose"], aw * 0.55 * g["loose"]) for s in (-1, 1) if g["sleeve"] > 0]
    pts = np.vstack([torso, *quads])
    lo, hi = pts.min(0), pts.max(0)
    k = min(0.9 * w / (hi - lo)[0], 0.9 * h / (hi - lo)[1])  # fit the flat lay into 90% of the frame
    off = np.array([w / 2, h / 2]) - k * (lo + hi) / 2

    def px(p: Any) -> np.ndarray:
        return np.asarray(p, float) * k + off

    cx, sw, aw_p, th, y0 = b["cx"], b["sw"], b["aw"], b["th"], b["sy"] - 0.1 * b["th"] / 2.4
    hem_p, y1 = b["hip"] * g["loose"] * g["flare"], y0 + th * g["length"]
    body = [np.array([[cx - top * sw, y0], [cx + top * sw, y0], [cx + hem_p, y1], [cx - hem_p, y1]])
            + b["twist"]]
    body += [_limb((cx + s * (top * sw - aw_p / 2), b["sy"] + aw_p / 2), b["arm_ang"][i], s, 0.3 * aw_p,
                   g["sleeve"] * b["arm"], aw_p * 0.62 * g["loose"], aw_p * 0.55 * g["loose"])
             for i, s in enumerate((-1, 1)) if g["sleeve"] > 0]
    homs = [cv2.getPerspectiveTransform(np.float32(px(q)), np.float32(p))
            for q, p in zip(quads, body, strict=True)]
    return dict(torso=px(torso), flat=[px(q) for q in quads], body=body, H=homs, k=k, px=px, neck=px(neck),
                nominal=dict(hem=hem, L=L, nd=nd, nw=nw))


def _render_flat(g: dict, geo: dict, rng: np.random.Generator, h: int, w: int) -> dict[str, Any]:
    """Fabric (pattern + seams over the whole frame; parts are cut from it by their alphas) and part alphas."""
    p = max(4, round(g["period"] * w))  # integer period: coverage is computed on one (2p, p) tile, then tiled
    kind, o = g["pattern"], int(rng.integers(p))
    ys, xs = np.arange(2 * p, dtype=np.float32)[:, None] + o, np.arange(p, dtype=np.float32)[None, :] + o

    def band(v: np.ndarray, f: float) -> np.ndarray:  # anti-aliased periodic band of duty cycle f
        return np.clip(p * f / 2 - np.abs((v + p / 2) % p - p / 2) + 0.5, 0, 1)

    t = None
    if kind in ("stripes_h", "stripes_v"):
        duty = _u(rng, 0.3, 0.5)
        t = band(ys, duty) + 0 * xs if kind == "stripes_h" else band(xs, duty) + 0 * ys
    elif kind == "checks":
        t = 0.5 * (band(ys, 0.5) + band(xs, 0.5))
    elif kind == "dots":  # staggered rows
        dist = np.hypot((xs + (np.floor(ys / p) % 2) * (p // 2)) % p - p / 2, ys % p - p / 2)
        t = np.clip(p * _u(rng, 0.2, 0.32) + 0.5 - dist, 0, 1)
    if t is not None:  # tile the coverage, then map it to colours through a 256-entry lookup table
        cov = np.tile((t * 255 + 0.5).astype(np.uint8), (h // (2 * p) + 1, w // p + 1))[:h, :w]
        ramp = np.arange(256, dtype=np.float32)[:, None] / 255
        lut = np.float32(g["base"]) * (1 - ramp) + np.float32(g["second"]) * ramp + 0.5
        fabric = cv2.LUT(cv2.merge((cov, cov, cov)), lut.astype(np.uint8)[:, None])
    else:
        fabric = _solid(h, w, g["base"])
    if kind == "print":  # small rotated diamonds on a jittered grid (jitter too small for them to overlap)
        s = 1.6 * p
        gy, gx = np.meshgrid(np.arange(o % s - s, h + s, s), np.arange(o % s - s, w + s, s), indexing="ij")
        cen = np.stack([gx.ravel(), gy.ravel()], 1) + rng.uniform(-0.2, 0.2, (gx.size, 2)) * s
        ang = rng.uniform(0, math.pi, (gx.size, 1)) + np.arange(4) * math.pi / 2
        rad = 0.35 * p * rng.uniform(0.7, 1.2, (gx.size, 1)) * np.array([1.0, 0.45, 1.0, 0.45])
        polys = np.round((cen[:, None] + np.stack([np.cos(ang) * rad, np.sin(ang) * rad], 2)) * _ONE)
        cv2.fillPoly(fabric, list(polys.astype(np.int32)), g["second"], cv2.LINE_AA, _SHIFT)
    k, nom, px, dark = geo["k"], geo["nominal"], geo["px"], _shade(g["base"], 0.7)
    seams = [(geo["neck"], dark, 0.07), (px([[-nom["hem"], nom["L"]], [nom["hem"], nom["L"]]]), dark, 0.08)]
    seams += [(q[1:3], dark, 0.1) for q in geo["flat"][1:]]  # cuffs
    if g["kind"] in ("shirt", "jacket"):  # placket / zipper and collar flaps
        jacket, nw, nd = g["kind"] == "jacket", nom["nw"], nom["nd"]
        seams.append((px([[0, nd], [0, nom["L"]]]), (40, 40, 40) if jacket else dark, 0.09 if jacket else 0.05))
        flaps = [px([[s * (nw + .06), -.02], [0, nd], [s * .25 * nw, nd + .3], [s * (nw + .18), .32]])
                 for s in (-1, 1)]
        _fill(fabric, flaps, _shade(g["base"], 0.8 if jacket else 1.35))
        seams += [(f, dark, 0.03) for f in flaps]
        for yb in np.arange(nd + 0.35, nom["L"] - 0.1, 0.45) if not jacket else ():
            _circle(fabric, px([0.0, yb]), 0.045 * k, _shade(g["base"], 1.5))
    for pts, col, thick in seams:
        _fill(fabric, [pts], col, thick * k)
    parts = [np.zeros((h, w), np.uint8) for _ in geo["flat"]]
    for m, poly in zip(parts, [geo["torso"], *geo["flat"][1:]], strict=True):
        _fill(m, [poly], 255)
    return dict(fabric=fabric, parts=parts)


def _render_body(b: dict, rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[Patch]]:
    """Base image (background, long hair, legs, torso skin) and the layers drawn over garments: [arms, head].

    Arms have straight alpha (one skin colour); the head, drawn on black, has premultiplied alpha.
    """
    (c0, c1), img = b["bg"], _solid(h, w, b["bg"][0])
    if b["bg_kind"] == "gradient":  # one column, stretched sideways
        col = np.linspace(c0, c1, h).round().astype(np.uint8).reshape(h, 1, 3)
        img = cv2.resize(col, (w, h), interpolation=cv2.INTER_NEAREST)
    for _ in range(int(rng.integers(3, 7)) if b["bg_kind"] == "shapes" else 0):
        col, x, y, r = _shade(c1, _u(rng, 0.75, 1.25)), _u(rng, 0, w), _u(rng, 0, h), _u(rng, 0.06, 0.2) * h
        if rng.random() < 0.5:
            _circle(img, (x, y), r, col)
        else:
            _fill(img, [[(x - r, y - r), (x + r, y - r), (x + r, y + r * 0.6), (x - r, y + r * 0.6)]], col)
    cx, sy, sw, th, skin, hr, hy = b["cx"], b["sy"], b["sw"], b["th"], b["skin"], b["head_r"], b["head_y"]
    hip_y, waist_y, hip, waist, aw = sy + th, sy + 0.8 * th, b["hip"], b["waist"], b["aw"]
    if b["hair_style"] == 2:  # long hair, behind the body
        _fill(img, [[(cx - hr * 1.15, hy), (cx + hr * 1.15, hy), (cx + hr * 1.3, sy + th / 4),
                     (cx - hr * 1.3, sy + th / 4)]], b["hair"])
    for s in (-1, 1):  # legs (trousers) and shoes
        lx = cx + s * hip * 0.5
        _fill(img, [[(cx + s * 0.04 * sw, hip_y), (cx + s * hip, hip_y - 2), (lx + s * 0.42 * hip, b["foot"]),
                     (lx - s * 0.42 * hip, b["foot"])]], b["trousers"])
        _circle(img, (lx + s * 0.1 * sw, b["foot"]), 0, b["shoes"], (0.5 * hip, 0.025 * h), (180, 360))
    _fill(img, [[(cx - waist, waist_y), (cx + waist, waist_y), (cx + hip, hip_y + 1), (cx - hip, hip_y + 1)]],
          b["trousers"])
    _fill(img, [[(cx - hr * .45, hy), (cx + hr * .45, hy), (cx + hr * .5, sy + 4), (cx - hr * .5, sy + 4)]],
          _shade(skin, 0.9))  # neck
    _fill(img, [[(cx - sw / 2, sy - 1), (cx + sw / 2, sy - 1), (cx + sw, sy + 0.06 * th),
                 (cx + waist, sy + 0.6 * th), (cx + waist, waist_y + 1), (cx - waist, waist_y + 1),
                 (cx - waist, sy + 0.6 * th), (cx - sw, sy + 0.06 * th)]], skin)  # torso skin
    arm_a, head, head_a = np.zeros((h, w), np.uint8), np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.uint8)
    for i, s in enumerate((-1, 1)):
        a = (cx + s * (sw - aw / 2), sy + aw / 2)
        q = _limb(a, b["arm_ang"][i], s, 0, b["arm"], aw / 2, aw * 0.38)
        _fill(arm_a, [q], 255)
        _circle(arm_a, (q[1] + q[2]) / 2 + (q[1] - q[0]) * 0.15, aw * 0.5, 255)  # hand
        _circle(img, a, aw * 0.52, skin)  # shoulder caps lie under the garment, so sleeve tops hide them
    for lay, hc, sc, ec in ((head, b["hair"], skin, (40, 30, 30)), (head_a, 255, 255, 255)):
        _circle(lay, (cx, hy), hr, sc)
        if b["hair_style"] != 3:  # 3 = shaved, 1 = bun
            _circle(lay, (cx, hy - hr * 0.15), 0, hc, (hr * 1.06, hr * 0.95), (180, 360))
        if b["hair_style"] == 1:
            _circle(lay, (cx, hy - hr * 1.05), hr * 0.42, hc)
        for s in (-1, 1):
            _circle(lay, (cx + s * hr * 0.38, hy + hr * 0.12), max(0.8, hr * 0.11), ec)
    return img, [_crop(_solid(h, w, skin), arm_a), _crop(head, head_a)]


# ------------------------------------------------------------------------------------ warping, compositing
def _crop(rgb: np.ndarray, a: np.ndarray) -> Patch:
    x, y, pw, ph = cv2.boundingRect(a)
    return x, y, rgb[y:y + ph, x:x + pw].copy(), a[y:y + ph, x:x + pw].copy()


def _full(p: Patch, h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w), np.uint8)
    out[p[1]:p[1] + p[3].shape[0], p[0]:p[0] + p[3].shape[1]] = p[3]
    return out


def _over(canvas: np.ndarray, p: Patch, premultiplied: bool = False) -> None:
    """Alpha-composite a patch onto a uint8 canvas in place (OpenCV fixed point: ~5x cheaper than float)."""
    x, y, rgb, a = p
    c = canvas[y:y + a.shape[0], x:x + a.shape[1]]
    a3 = cv2.merge((a, a, a))
    fg = rgb if premultiplied else cv2.multiply(rgb, a3, scale=1 / 255)
    cv2.add(cv2.multiply(c, cv2.bitwise_not(a3), scale=1 / 255), fg, dst=c)


def _dress(base: np.ndarray, layers: list[Patch], parts: list[Patch]) -> np.ndarray:
    """Body, garment torso, arms over it, sleeves over the arms, head on top."""
    canvas = base.copy()
    for p in (parts[0], layers[0], *parts[1:]):
        _over(canvas, p)
    _over(canvas, layers[1], premultiplied=True)
    return canvas


def _warp_parts(fl: dict, geo: dict, h: int, w: int, n: int = 3) -> list[Patch]:
    """Warp each part only into the box around its body quad (+2 px), with the correspondingly shifted map."""
    out = []
    for m, hm, q in list(zip(fl["parts"], geo["H"], geo["body"], strict=True))[:n]:
        (qx0, qy0), (qx1, qy1) = q.min(0), q.max(0)
        x0, y0 = min(w - 1, max(0, math.floor(qx0) - 2)), min(h - 1, max(0, math.floor(qy0) - 2))
        x1, y1 = max(x0 + 1, min(w, math.ceil(qx1) + 3)), max(y0 + 1, min(h, math.ceil(qy1) + 3))
        shifted = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64) @ hm
        size = (x1 - x0, y1 - y0)
        out.append((x0, y0, cv2.warpPerspective(fl["fabric"], shifted, size, flags=cv2.INTER_LINEAR),
                    cv2.warpPerspective(m, shifted, size, flags=cv2.INTER_LINEAR)))
    return out


def _warp_box(hm: np.ndarray, box: Box, h: int, w: int) -> Box:
    """Smallest box holding every target pixel whose bilinear source (pixel centres, as OpenCV samples)
    touches a box pixel: centres mapping into the open range (x0 - 1, x1) x (y0 - 1, y1)."""
    x0, y0, x1, y1 = box
    q = cv2.perspectiveTransform(np.float64([[[x0 - 1, y0 - 1], [x1, y0 - 1], [x1, y1], [x0 - 1, y1]]]), hm)[0]
    lo, hi = np.floor(q.min(0)) + 1, np.ceil(q.max(0))
    return int(max(0, lo[0])), int(max(0, lo[1])), int(min(w, hi[0])), int(min(h, hi[1]))


def _blocked(ii: np.ndarray, x0: Any, y0: Any, x1: Any, y1: Any) -> Any:
    """Sum of a blocking mask over box(es) from its integral image (scalars or arrays of boxes)."""
    return ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]


def _place_logos(rng: np.random.Generator, cfg: SyntheticConfig, g: dict, geo: dict, fl: dict,
                 layers: list[Patch], warped: list[Patch]) -> tuple[list[Box], list[Box], list[int]]:
    """Draw 1..n logos onto the flat torso where they avoid seams and sleeves and, once warped, sleeves, arms
    and head: 300 random tries with shrinking size, then (rarely needed) an exhaustive scan."""
    h, w = cfg.height, cfg.width
    bv = cv2.bitwise_not(_full(warped[0], h, w))  # > 0 where a logo pixel would not be fully visible
    for x, y, _, a in (*warped[1:], *layers):
        roi = bv[y:y + a.shape[0], x:x + a.shape[1]]
        np.maximum(roi, a, out=roi)
    bf = cv2.bitwise_not(fl["parts"][0])  # > 0 where the flat torso cannot take a logo pixel
    for m in fl["parts"][1:]:  # 2 px clear of flat sleeves: the sleeve warp samples their edge pixels
        np.maximum(bf, cv2.dilate(m, np.ones((5, 5), np.uint8)), out=bf)
    px, nom = geo["px"], geo["nominal"]  # and clear of neckline/collar, hem seam and placket
    (_, ya), (_, yb) = px([0, max(nom["nd"], 0.32) + 0.1]), px([0, nom["L"] - 0.15])
    bf[:max(0, int(ya))] = bf[int(yb):] = 255
    if g["kind"] in ("shirt", "jacket"):
        bf[:, int(px([-0.1, 0])[0]):int(px([0.1, 0])[0]) + 1] = 255
    fx, fy, fw, fh = cv2.boundingRect(cv2.bitwise_not(bf))
    nf, nv = cv2.integral(bf), cv2.integral(bv)  # O(1) "is this box clear" tests
    n = int(rng.integers(cfg.min_logos, cfg.max_logos + 1))
    size = max(6, int(geo["k"] * 2 * g["shoulder"] * _u(rng, 0.22, 0.34)))  # 22-34% of the shoulder width
    m = 300 if fw else 0
    sz = np.maximum(3, size * 0.8 ** (np.arange(m) // 50)).astype(int)
    x0, y0 = fx + rng.integers(max(fw, 1), size=m) - sz // 2, fy + rng.integers(max(fh, 1), size=m) - sz // 2
    ok = (x0 >= 0) & (y0 >= 0) & (x0 + sz <= w) & (y0 + sz <= h)
    x0, y0, sz = x0[ok], y0[ok], sz[ok]
    ok = _blocked(nf, x0, y0, x0 + sz, y0 + sz) == 0
    cand = list(zip(sz[ok].tolist(), x0[ok].tolist(), y0[ok].tolist(), strict=True))
    scan = ((s, x, y) for s in range(size, 2, -1) for y in range(fy, fy + fh - s + 1)
            for x in range(fx, fx + fw - s + 1) if _blocked(nf, x, y, x + s, y + s) == 0)
    cols = [c for c in LOGO_PALETTE if min(math.dist(c, g["base"]), math.dist(c, g["second"])) > 110]
    cols = cols or [(0, 0, 0)]  # logos must stand out from both garment colours
    placed: list[tuple[Box, Box, int]] = []
    for k, (s, x, y) in enumerate(itertools.chain(cand, scan)):
        if len(placed) == n or (k >= len(cand) and len(placed) >= cfg.min_logos):
            break
        gb = (x, y, x + s, y + s)
        if any(x < b[2] + 2 and b[0] < x + s + 2 and y < b[3] + 2 and b[1] < y + s + 2 for b, _, _ in placed):
            continue
        tb = _warp_box(geo["H"][0], gb, h, w)
        if tb[2] - tb[0] < 3 or tb[3] - tb[1] < 3 or _blocked(nv, *tb) != 0:
            continue
        lid, c0 = int(rng.integers(len(LOGO_NAMES))), cols[int(rng.integers(len(cols)))]
        c1 = [c for c in LOGO_PALETTE if math.dist(c, c0) > 120][int(rng.integers(5))]
        rgb, alpha = _logo_rgba(lid, s, (c0, c1))
        region = fl["fabric"][gb[1]:gb[3], gb[0]:gb[2]]
        region[:] = (region + (rgb - region) * alpha[..., None] + 0.5).astype(np.uint8)
        placed.append((gb, tb, lid))
    if len(placed) < cfg.min_logos:
        raise RuntimeError(f"no room for {cfg.min_logos} logos at {h}x{w}: lower min_logos or enlarge images")
    return [p[0] for p in placed], [p[1] for p in placed], [p[2] for p in placed]


# ------------------------------------------------------------------------------------------------ samples
def _render(seed: int, index: int, cfg: SyntheticConfig, corner_offsets: np.ndarray | None = None) -> tuple:
    """(arrays garment/person/mask/target, garment logo boxes, target logo boxes, logo ids, meta).
    ``corner_offsets``: (4, 2) px added to the torso's corner jitter; every draw before the logos' is unchanged."""
    h, w = cfg.height, cfg.width
    rng = np.random.default_rng([seed, index])
    body, new = _sample_body(rng, h, w), _sample_garment(rng)
    if corner_offsets is not None:
        body["twist"] = body["twist"] + np.asarray(corner_offsets, float).reshape(4, 2)
    old = _sample_garment(rng, avoid=new)
    base, layers = _render_body(body, rng, h, w)
    geo_new, geo_old = _geometry(new, body, h, w), _geometry(old, body, h, w)
    fl_new, fl_old = _render_flat(new, geo_new, rng, h, w), _render_flat(old, geo_old, rng, h, w)
    w_new, w_old = _warp_parts(fl_new, geo_new, h, w), _warp_parts(fl_old, geo_old, h, w)
    gboxes, tboxes, ids = _place_logos(rng, cfg, new, geo_new, fl_new, layers, w_new)
    w_new[0] = _warp_parts(fl_new, geo_new, h, w, n=1)[0]  # the torso again, now carrying the logos
    person, target = _dress(base, layers, w_old), _dress(base, layers, w_new)

    changed = np.zeros((h, w), np.uint8)
    for x, y, _, a in w_new + w_old:
        changed[y:y + a.shape[0], x:x + a.shape[1]] |= a
    r = max(1, round(h / 96))
    mask = cv2.dilate(cv2.threshold(changed, 0, 255, cv2.THRESH_BINARY)[1],
                      cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    keep = cv2.bitwise_not(mask)
    cv2.copyTo(person, keep, target)  # a no-op by construction; makes the invariant exact
    outside = cv2.bitwise_and(cv2.absdiff(target, person), cv2.merge((keep, keep, keep)))
    assert 0 < cv2.countNonZero(mask) < mask.size and cv2.countNonZero(outside.reshape(h, -1)) == 0

    garment = _solid(h, w, GARMENT_BG)
    _over(garment, (0, 0, fl_new["fabric"], np.maximum.reduce(fl_new["parts"])))
    meta = dict(seed=seed, index=index, kind=new["kind"], pattern=new["pattern"], base_color=list(new["base"]),
                pattern_color=list(new["second"]), neckline=new["neckline"], sleeve=round(new["sleeve"], 3),
                length=round(new["length"], 3), old_kind=old["kind"], old_pattern=old["pattern"],
                old_base_color=list(old["base"]), skin=list(body["skin"]), background=body["bg_kind"],
                arm_angles_deg=[round(math.degrees(a), 1) for a in body["arm_ang"]],
                logo_names=[LOGO_NAMES[i] for i in ids])
    return dict(garment=garment, person=person, mask=mask, target=target), gboxes, tboxes, ids, meta


def make_sample(seed: int, index: int, config: SyntheticConfig | None = None) -> TryOnSample:
    """One try-on pair; identical pixels for the same (seed, index, config)."""
    arrays, gboxes, tboxes, ids, meta = _render(seed, index, config or SyntheticConfig())
    images = [Image.fromarray(arrays[k], "L" if k == "mask" else "RGB")
              for k in ("garment", "person", "mask", "target")]
    return TryOnSample(*images, gboxes, tboxes, ids, meta)


def misplaced_pair(seed: int, index: int, corner_offsets: np.ndarray,
                   config: SyntheticConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pair ``(seed, index)``'s target (uint8 RGB) and mask (uint8, 255 = repaint) with both garments' torso corners
    moved by ``corner_offsets`` ((4, 2) px) and every random draw as in ``make_sample``: what a try-on that places
    the garment that far off draws (sleeves follow the shoulders; logo placement is drawn again on the moved torso),
    and the mask such a body would have had."""
    arrays = _render(seed, index, config or SyntheticConfig(), corner_offsets)[0]
    return arrays["target"], arrays["mask"]


def make_batch(seed: int, start: int, count: int,
               config: SyntheticConfig | None = None) -> dict[str, np.ndarray]:
    """Samples start..start+count-1 as uint8 arrays: garment/person/target (N,H,W,3), mask (N,H,W)."""
    cfg = config or SyntheticConfig()
    shape = (count, cfg.height, cfg.width)
    out = {k: np.empty(shape if k == "mask" else (*shape, 3), np.uint8)
           for k in ("garment", "person", "mask", "target")}
    for i in range(count):
        for k, a in _render(seed, start + i, cfg)[0].items():
            out[k][i] = a
    return out


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core: OpenCV's own threads would oversubscribe


def iter_batches(seed: int, batch_size: int, config: SyntheticConfig | None = None,
                 workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches; batch b holds indices b*batch_size.. so no sample repeats; same output for any workers.

    With workers > 0, a spawn-context Pool computes batches ahead, at most 2 per worker in flight so memory
    stays bounded; closing the generator waits for those and shuts the pool down. Spawned workers re-import
    the caller's main module: run from a script with an ``if __name__ == "__main__":`` guard, a notebook or
    ``python -c`` (not from stdin).
    """
    job, starts = partial(make_batch, seed, count=batch_size, config=config), itertools.count(0, batch_size)
    if workers <= 0:
        yield from map(job, starts)
        return
    pool = get_context("spawn").Pool(workers, initializer=_worker_init)
    pending: deque = deque()
    try:
        pending.extend(pool.apply_async(job, (next(starts),)) for _ in range(2 * workers))
        while True:
            yield pending.popleft().get()
            pending.append(pool.apply_async(job, (next(starts),)))
    finally:  # let in-flight batches land first: terminating a Pool mid-result can deadlock it
        pool.close()
        for r in pending:
            r.wait()
        pool.join()


def write_sample_set(out_dir: str | Path, seed: int, count: int, config: SyntheticConfig | None = None) -> Path:
    """Write PNGs and manifest.json under `out_dir`; byte-identical on re-run (PIL writes no timestamps)."""
    cfg, out = config or SyntheticConfig(), Path(out_dir)
    for sub in ("persons", "garments", "masks", "targets", "logos"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(count):
        s, sid = make_sample(seed, i, cfg), f"s{i:0{max(3, len(str(count - 1)))}d}"
        rec: dict[str, Any] = {"id": sid}
        for key in ("person", "garment", "mask", "target"):
            rec[key] = f"{key}s/{sid}.png"
            getattr(s, key).save(out / rec[key], format="PNG")
        rec.update(garment_logo_boxes=[list(b) for b in s.garment_logo_boxes],
                   target_logo_boxes=[list(b) for b in s.target_logo_boxes], logo_ids=s.logo_ids, meta=s.meta)
        samples.append(rec)
    logos = [{"id": i, "name": name, "path": f"logos/logo{i}.png"} for i, name in enumerate(LOGO_NAMES)]
    for rec in logos:
        make_logo(rec["id"], 64, ((30, 30, 30), (250, 200, 20))).save(out / rec["path"], format="PNG")
    manifest = dict(seed=seed, config=asdict(cfg), generator="tryon_lab.synthetic", samples=samples,
                    logos=logos)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out
