"""Logo pass, batched against one call per logo, for 1..5 logos per garment.

CPU mode (default): the default model, the sample's known target logo boxes (cycled when a garment has fewer
logos than asked), diptychs of ``--size`` px per half, ``--steps`` steps; median over ``--repeats`` after a
warm-up. Per garment: latency (seconds for its whole logo pass) and throughput (logos per second).

``--full-size``: the full-size FLUX Fill transformer + VAE from ``benchmarks/flux_fill_config.json`` with random
bf16 weights on the GPU and 256 px per half (the denoise + decode a logo pass runs, with random embeddings in
place of Redux tokens). Run on an H100: benchmarks/logos_gpu_full_size.md.

    python scripts/bench_logos.py                      # CPU, default model -> benchmarks/results.json, logos_cpu.md
    python scripts/bench_logos.py --full-size --size 256  # GPU -> logos_gpu_full_size
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COLUMNS = ["logos", "mode", "calls", "latency_s", "logos_per_s", "speedup"]


def summarise(n: int, seconds: dict[str, list[float]], calls: dict[str, int]) -> list[dict]:
    seq = statistics.median(seconds["sequential"])
    rows = []
    for mode, ts in seconds.items():
        lat = statistics.median(ts)
        rows.append({"logos": n, "mode": mode, "calls": calls[mode], "latency_s": lat, "logos_per_s": n / lat,
                     "speedup": seq / lat})
    return rows


def bench_cpu(a) -> tuple[dict, list[dict]]:
    import torch

    from tryon_lab import checkpoint, loading, logos, pipeline, samples

    torch.set_num_threads(a.threads)
    model_dir = checkpoint.resolve_model_dir(a.model)
    pipe = loading.load_slim(model_dir, torch.float32, "cpu")
    s = samples.load_sample(a.sample)
    pairs = list(zip(s.garment_logo_boxes, s.target_logo_boxes, strict=True))
    settings = pipeline.TryOnSettings(steps=a.steps, progress=False)
    rows = []
    for n in range(1, a.max_logos + 1):
        chosen = [pairs[i % len(pairs)] for i in range(n)]
        matches = logos.known_matches([g for g, _ in chosen], [t for _, t in chosen])
        seconds, calls = {"sequential": [], "batched": []}, {}
        for mode in seconds:
            kw = dict(batched=mode == "batched", size=a.size, seed=0)
            logos.logo_pass(pipe, s.target, s.garment, matches, settings, **kw)  # warm-up
            for _ in range(a.repeats):
                r = logos.logo_pass(pipe, s.target, s.garment, matches, settings, **kw)
                seconds[mode].append(r.timings["total"])
                calls[mode] = r.calls
        rows += summarise(n, seconds, calls)
        print(rows[-2:], flush=True)
    meta = {"model": checkpoint.describe_model(model_dir).replace(f"{REPO}/", ""), "sample": a.sample, "steps": a.steps, "size": a.size,
            "repeats": a.repeats, "threads": a.threads}
    return meta, rows


def bench_full_size(a) -> tuple[dict, list[dict]]:
    """Full-size Fill on the GPU: the logo pass's diptychs through denoise + decode, batched and sequential."""
    import json

    import numpy as np
    import torch
    from PIL import Image

    from scripts.bench_memory_gpu import build
    from tryon_lab import logos, pipeline
    from tryon_lab.bench import Timings

    cfg = json.loads(Path(a.config).read_text())
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    fill = build(a, a.device)[0].fill  # transformer + VAE seeded as before; the Redux part goes unused here
    txt = cfg["text_embeddings"]["t5_prompt_embeds"][1] + cfg["redux"]["image_encoder"]["image_tokens"]
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, txt, cfg["transformer"]["joint_attention_dim"], generator=g).to(a.device, dtype)
    pooled = torch.randn(1, cfg["transformer"]["pooled_projection_dim"], generator=g).to(a.device, dtype)
    rng = np.random.default_rng(0)
    crop = lambda: Image.fromarray(rng.integers(0, 255, (a.size, a.size, 3), dtype=np.uint8))  # noqa: E731
    settings = pipeline.TryOnSettings(steps=a.steps, progress=False)

    def call(reqs) -> float:
        t = Timings(device=a.device)
        with t.stage("pass"):
            prepared = pipeline.prepare(reqs, "pad")
            n = len(prepared)
            lat = pipeline.denoise(fill, prepared, pe.expand(n, -1, -1), pooled.expand(n, -1), settings,
                                   [r.seed for r in reqs])
            w, h = prepared[0].diptych.size
            pipeline.decode(fill, lat, h, w)
        return t.seconds["pass"]

    rows = []
    for n in range(1, a.max_logos + 1):
        reqs = [pipeline.TryOnRequest(crop(), crop(), logos.diptych_mask(a.size), seed=i) for i in range(n)]
        seconds = {"sequential": [], "batched": []}
        for mode in seconds:
            groups = [reqs] if mode == "batched" else [[r] for r in reqs]
            sum(call(grp) for grp in groups)  # warm-up
            seconds[mode] = [sum(call(grp) for grp in groups) for _ in range(a.repeats)]
        rows += summarise(n, seconds, {"sequential": n, "batched": 1})
        print(rows[-2:], flush=True)
    meta = {"model": "full-size FLUX Fill, random bf16 weights", "steps": a.steps, "size": a.size,
            "repeats": a.repeats}
    return meta, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full-size", action="store_true", help="full-size transformer on the GPU (random bf16 weights)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--sample", default="s000")
    ap.add_argument("--steps", type=int, default=None, help="8 on the CPU, 28 full size")
    ap.add_argument("--size", type=int, default=None, help="px per diptych half: 64 on the CPU, 256 full size")
    ap.add_argument("--max-logos", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda", help="--full-size only (cpu: a smoke run with a small --config)")
    ap.add_argument("--config", default=str(REPO / "benchmarks" / "flux_fill_config.json"))
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results.json"))
    a = ap.parse_args(argv)
    a.steps = a.steps or (28 if a.full_size else 8)
    a.size = a.size or (256 if a.full_size else 64)
    name = "logos_gpu_full_size" if a.full_size else "logos_cpu"
    start = time.perf_counter()
    meta, rows = (bench_full_size if a.full_size else bench_cpu)(a)

    from tryon_lab.bench import markdown_table, stamp

    device = a.device if a.full_size else "cpu"
    results = {"stamp": stamp(device), **meta, "rows": rows, "wall_s": time.perf_counter() - start}
    title = f"# Logo pass, batched vs sequential ({name})\n\n{meta['model']}; {a.steps} steps, {a.size} px per half, " \
            f"median of {a.repeats}; latency = seconds for one garment's whole logo pass.\n\n"
    from tryon_lab.bench import write_results

    write_results(a.results, name, results, title + markdown_table(rows, COLUMNS))
    print(markdown_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
