"""Logo pass, batched against one call per logo, for 1..n logos per garment.

    on_model   a model folder (the default model on the CPU): a sample's known target logo boxes (cycled when
               the garment has fewer logos than asked) through ``logos.logo_pass``
    full_size  the full-size FLUX Fill transformer + VAE with random weights (``fullsize``): the logo pass's
               diptychs through denoise + decode, with random embeddings in place of Redux tokens

Per garment: latency (seconds for its whole logo pass, median over ``repeats`` after a warm-up), throughput
(logos per second) and the speed-up of batching.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import checkpoint, logos, pipeline, samples
from ..configure import build_pipeline
from ..plots import markdown_table
from ..provenance import REPO_ROOT, stamp, write_results
from ..timers import Timings
from . import fullsize

COLUMNS = ["logos", "mode", "calls", "latency_s", "logos_per_s", "speedup"]
RESULTS = REPO_ROOT / "benchmarks" / "results.json"


def summarise(n: int, seconds: dict[str, list[float]], calls: dict[str, int]) -> list[dict]:
    seq = statistics.median(seconds["sequential"])
    rows = []
    for mode, ts in seconds.items():
        lat = statistics.median(ts)
        rows.append({"logos": n, "mode": mode, "calls": calls[mode], "latency_s": lat, "logos_per_s": n / lat,
                     "speedup": seq / lat})
    return rows


def on_model(model: str = "default", sample: str = "s000", steps: int = 8, size: int = 64, max_logos: int = 5,
             repeats: int = 3, threads: int = 2) -> tuple[dict, list[dict]]:
    """The logo pass on a real model folder on the CPU (float32); returns (meta, rows)."""
    torch.set_num_threads(threads)
    model_dir = checkpoint.resolve_model_dir(model)
    pipe = build_pipeline(model_dir, device="cpu", dtype="float32")
    s = samples.load_sample(sample)
    pairs = list(zip(s.garment_logo_boxes, s.target_logo_boxes, strict=True))
    settings = pipeline.TryOnSettings(steps=steps, progress=False)
    rows = []
    for n in range(1, max_logos + 1):
        chosen = [pairs[i % len(pairs)] for i in range(n)]
        matches = logos.known_matches([g for g, _ in chosen], [t for _, t in chosen])
        seconds, calls = {"sequential": [], "batched": []}, {}
        for mode in seconds:
            kw = dict(batched=mode == "batched", size=size, seed=0)
            logos.logo_pass(pipe, s.target, s.garment, matches, settings, **kw)  # warm-up
            for _ in range(repeats):
                r = logos.logo_pass(pipe, s.target, s.garment, matches, settings, **kw)
                seconds[mode].append(r.timings["total"])
                calls[mode] = r.calls
        rows += summarise(n, seconds, calls)
        print(rows[-2:], flush=True)
    meta = {"model": checkpoint.describe_model(model_dir).replace(f"{REPO_ROOT}/", ""), "sample": sample,
            "steps": steps, "size": size, "repeats": repeats, "threads": threads}
    return meta, rows


def full_size(steps: int = 28, size: int = 256, max_logos: int = 5, repeats: int = 3, tiny: bool = False,
              config: str | Path = fullsize.CONFIG_FILE) -> tuple[dict, list[dict]]:
    """The logo pass's diptychs (``size`` px per half) through the full-size Fill denoise + VAE decode,
    batched and one call per logo; ``tiny``: the toy-size model on the CPU. Returns (meta, rows)."""
    s = fullsize.shape(tiny, config=config)
    fill = fullsize.build_fill(s)
    pe, pooled = fullsize.text_embeddings(s)
    rng = np.random.default_rng(0)
    crop = lambda: Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))  # noqa: E731
    settings = pipeline.TryOnSettings(steps=steps, progress=False)

    def call(reqs) -> float:
        t = Timings(device=s.device)
        with t.stage("pass"):
            prepared = pipeline.prepare(reqs, "pad")
            n = len(prepared)
            lat = pipeline.denoise(fill, prepared, pe.expand(n, -1, -1), pooled.expand(n, -1), settings,
                                   [r.seed for r in reqs])
            w, h = prepared[0].diptych.size
            pipeline.decode(fill, lat, h, w)
        return t.seconds["pass"]

    rows = []
    for n in range(1, max_logos + 1):
        reqs = [pipeline.TryOnRequest(crop(), crop(), logos.diptych_mask(size), seed=i) for i in range(n)]
        seconds = {"sequential": [], "batched": []}
        for mode in seconds:
            groups = [reqs] if mode == "batched" else [[r] for r in reqs]
            sum(call(grp) for grp in groups)  # warm-up
            seconds[mode] = [sum(call(grp) for grp in groups) for _ in range(repeats)]
        rows += summarise(n, seconds, {"sequential": n, "batched": 1})
        print(rows[-2:], flush=True)
    meta = {"model": f"{'tiny' if tiny else 'full-size'} FLUX Fill, random {s.dtype} weights", "steps": steps,
            "size": size, "repeats": repeats, "device": s.device}
    return meta, rows


def run(full: bool = False, results: str | Path = RESULTS, **kw) -> list[dict]:
    """``full_size(**kw)`` (entry ``logos_gpu_full_size``; tiny: ``logos_tiny``) or ``on_model(**kw)``
    (``logos_cpu``), written with a markdown table beside ``results``."""
    name = ("logos_tiny" if kw.get("tiny") else "logos_gpu_full_size") if full else "logos_cpu"
    start = time.perf_counter()
    meta, rows = full_size(**kw) if full else on_model(**kw)
    out = {"stamp": stamp(meta.get("device", "cpu")), **meta, "rows": rows, "wall_s": time.perf_counter() - start}
    title = (f"# Logo pass, batched vs sequential ({name})\n\n{meta['model']}; {meta['steps']} steps, {meta['size']} px "
             f"per half, median of {meta['repeats']}; latency = seconds for one garment's whole logo pass.\n\n")
    write_results(results, name, out, title + markdown_table(rows, COLUMNS))
    print(markdown_table(rows, COLUMNS))
    return rows
