"""Training data: procedural pairs with their logo masks, logo-task crops, and how they are fed.

    make_pairs        ``synthetic`` pairs + ``garment_logo`` / ``target_logo`` masks (1 inside a logo box):
                      ``synthetic.make_batch`` drops the boxes, so pairs are built from ``make_sample``
    make_logo_crops   the logo pass's own inputs (``logos.logo_requests``) around every known logo, with the
                      ground-truth crop as target: what the logo adapter learns
    stream            endless batches from fresh indices (worker processes, bounded look-ahead)
    PairPool          pairs generated once and reshuffled every epoch, for when generation cannot keep up
    throughput        pairs per second of one process, to compare with what a training step consumes

Every pair is a pure function of ``(seed, index)``, so a stage resumes by continuing from its next index.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from multiprocessing import get_context

import numpy as np
from PIL import Image, ImageFilter

from ..synthetic import SyntheticConfig, make_batch, make_sample

Batch = dict[str, np.ndarray]


def box_mask(boxes, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask, True inside the boxes (x0, y0, x1, y1; x1/y1 exclusive) of an image of ``size`` (W, H)."""
    w, h = size
    m = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def make_pairs(seed: int, start: int, count: int, config: SyntheticConfig | None = None) -> Batch:
    """Pairs ``start..start+count-1`` as ``make_batch`` gives them, plus the two logo masks (N, H, W) uint8."""
    cfg = config or SyntheticConfig()
    keys = ("garment", "person", "mask", "target")
    rows: dict[str, list] = {k: [] for k in (*keys, "garment_logo", "target_logo")}
    for i in range(start, start + count):
        s = make_sample(seed, i, cfg)
        for k in keys:
            rows[k].append(np.asarray(getattr(s, k)))
        rows["garment_logo"].append(box_mask(s.garment_logo_boxes, (cfg.width, cfg.height)).astype(np.uint8))
        rows["target_logo"].append(box_mask(s.target_logo_boxes, (cfg.width, cfg.height)).astype(np.uint8))
    return {k: np.stack(v) for k, v in rows.items()}


def _jitter(box, rng: np.random.Generator, frac: float, w: int, h: int) -> tuple[int, int, int, int]:
    """The box moved and rescaled by up to ``frac`` of its size, as template matching misses it, kept inside."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    s = 1 + rng.uniform(-frac, frac)
    nw, nh = max(3, round(bw * s)), max(3, round(bh * s))
    cx, cy = (x0 + x1) / 2 + rng.uniform(-frac, frac) * bw, (y0 + y1) / 2 + rng.uniform(-frac, frac) * bh
    nx0, ny0 = int(np.clip(round(cx - nw / 2), 0, w - nw)), int(np.clip(round(cy - nh / 2), 0, h - nh))
    return nx0, ny0, nx0 + nw, ny0 + nh


def make_logo_crops(seed: int, start: int, count: int, config: SyntheticConfig | None = None, size: int = 64,
                    jitter: float = 0.15, max_blur: float = 1.5) -> Batch:
    """The logo task from pairs ``start..start+count-1``: one row per logo, at most ``count`` rows.

    Inputs are built by ``logos.logo_requests`` exactly as the logo pass builds them, from the ground truth
    blurred by a random radius (the try-on around a logo is softer than the truth) at a jittered box (the
    matcher's box is a few pixels off): garment = the garment's logo crop, person = that crop of the blurred
    image, mask = ``logos.diptych_mask``; target = the same crop of the sharp ground truth.
    """
    from ..logos import known_matches, logo_requests

    cfg = config or SyntheticConfig()
    rows: dict[str, list] = {k: [] for k in ("garment", "person", "mask", "target")}
    for i in range(start, start + count):
        s = make_sample(seed, i, cfg)
        rng = np.random.default_rng([seed, i, 7])
        boxes = [_jitter(b, rng, jitter, cfg.width, cfg.height) for b in s.target_logo_boxes]
        soft = s.target.filter(ImageFilter.GaussianBlur(rng.uniform(0, max_blur)))
        reqs, found = logo_requests(soft, s.garment, known_matches(s.garment_logo_boxes, boxes), size)
        for r, m in zip(reqs, found, strict=True):
            rows["garment"].append(np.asarray(r.garment))
            rows["person"].append(np.asarray(r.person))
            rows["mask"].append(np.asarray(r.mask))
            rows["target"].append(np.asarray(s.target.crop(m.box).resize((size, size), Image.BICUBIC)))
    return {k: np.stack(v[:count]) for k, v in rows.items()}


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core: OpenCV's own threads would oversubscribe


def stream(job: Callable[[int], Batch], start: int, step: int, workers: int = 0) -> Iterator[Batch]:
    """``job(start)``, ``job(start + step)``, ... forever; with ``workers`` > 0 computed ahead by a spawn pool
    (at most 2 batches per worker in flight). Closing the generator lets in-flight batches land, then stops."""
    starts = itertools.count(start, step)
    if workers <= 0:
        yield from map(job, starts)
        return
    pool = get_context("spawn").Pool(workers, initializer=_worker_init)
    pending: deque = deque(pool.apply_async(job, (next(starts),)) for _ in range(2 * workers))
    try:
        while True:
            yield pending.popleft().get()
            pending.append(pool.apply_async(job, (next(starts),)))
    finally:  # terminating a Pool mid-result can deadlock it
        pool.close()
        for r in pending:
            r.wait()
        pool.join()


class PairPool:
    """``n`` pairs from indices ``start..start+n-1`` held in memory, served as reshuffled batches every epoch.

    For when a training step consumes pairs faster than the workers make them: the pool is made once per call
    (fresh indices each call, so calls never repeat pairs) and reused across epochs within the call.
    """

    def __init__(self, job: Callable[[int], Batch], start: int, n: int, chunk: int, workers: int = 0):
        starts = list(range(start, start + n, chunk))
        if workers > 0:
            with get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
                parts = pool.map(job, starts)
        else:
            parts = [job(s) for s in starts]
        self.arrays = {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}
        self.start, self.n = start, len(self.arrays["garment"])

    def batches(self, batch: int, seed: int) -> Iterator[Batch]:
        if batch > self.n:
            raise ValueError(f"batch {batch} is larger than the pool of {self.n} pairs; raise pool_pairs.")
        for epoch in itertools.count():
            order = np.random.default_rng([seed, self.start, epoch]).permutation(self.n)
            for i in range(0, self.n - batch + 1, batch):
                idx = np.sort(order[i:i + batch])
                yield {k: v[idx] for k, v in self.arrays.items()}


def source(kind: str, seed: int, start: int, batch: int, config: SyntheticConfig, workers: int = 0,
           pool_pairs: int = 0, logo_size: int = 64, logo_max_blur: float = 1.5
           ) -> tuple[Iterator[Batch], Callable[[int], int]]:
    """Batches of ``kind`` ('pairs' or 'logos') from index ``start``; returns (batches, next_start(steps))."""
    job = {"pairs": partial(make_pairs, seed, count=batch, config=config),
           "logos": partial(make_logo_crops, seed, count=batch, config=config, size=logo_size,
                            max_blur=logo_max_blur)}[kind]
    if pool_pairs > 0:
        pool = PairPool(job, start, pool_pairs, batch, workers)
        return pool.batches(batch, seed), lambda steps: start + pool_pairs
    return stream(job, start, batch, workers), lambda steps: start + steps * batch


def throughput(seconds: float = 3.0, config: SyntheticConfig | None = None, seed: int = 5, batch: int = 8) -> dict:
    """Pairs per second of one process: ``make_batch`` (what the stock loader runs) and ``make_pairs`` (with
    the logo masks); each timed over at least ``seconds`` after one warm-up batch."""
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # as in a worker
    out = {}
    for name, fn in (("make_batch", make_batch), ("make_pairs", make_pairs)):
        fn(seed, 0, 1, config)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn(seed, n, batch, config)
            n += batch
        out[f"{name}_pairs_per_s"] = n / (time.perf_counter() - t0)
    cv2.setNumThreads(threads)
    return out
