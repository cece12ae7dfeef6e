"""Fidelity metrics: one PSNR, one SSIM, one relative L2 for the whole workbench."""

from __future__ import annotations

import numpy as np
from PIL import Image


def _as_float(img) -> np.ndarray:
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    arr = np.asarray(img)
    return arr.astype(np.float64) / (255.0 if arr.dtype == np.uint8 else 1.0)


def psnr(a, b, mask=None) -> float:
    """PSNR in dB of two images (PIL or arrays in [0,1] / uint8); ``inf`` when identical.

    With ``mask`` (H, W, true = counted) only the masked pixels count (e.g. the try-on region).
    """
    x, y = _as_float(a), _as_float(b)
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ {x.shape} vs {y.shape}")
    diff = (x - y) ** 2
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        diff = diff[m]
    mse = float(diff.mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def ssim(a, b, mask=None) -> float:
    """Structural similarity (scikit-image, RGB); with ``mask``, the mean SSIM map over the masked pixels."""
    from skimage.metrics import structural_similarity

    x, y = _as_float(a), _as_float(b)
    value, smap = structural_similarity(x, y, channel_axis=-1, data_range=1.0, full=True)
    if mask is None:
        return float(value)
    m = np.asarray(mask).astype(bool)
    return float(smap.mean(axis=-1)[m].mean())


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| in float64 (b is the reference)."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    denom = b64.norm().item()
    return (a64 - b64).norm().item() / (denom if denom > 0 else 1.0)


def max_abs(a, b) -> float:
    """Largest absolute difference (tensors, or images in 0..255 units)."""
    if isinstance(a, Image.Image):
        return float(np.abs(np.asarray(a, dtype=np.int32) - np.asarray(b, dtype=np.int32)).max())
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()
