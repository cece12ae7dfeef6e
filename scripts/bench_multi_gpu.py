"""Past one GPU, measured: context-parallel latency and sweep throughput on 1, 2 and 4 GPUs (one launch per count).

Full-size FLUX Fill from ``benchmarks/flux_fill_config.json``, random bf16 weights built on each GPU (as
``scripts/bench_gpu.py`` builds them), 512 T5 + 729 Redux text tokens, diptychs of 1024x768 and 2048x1536.

* throughput: every rank runs its own requests on its own copy of the model (what a Ray sweep with one GPU per
  point does once the model is loaded); requests per minute = all requests / wall time of the slowest rank.
* latency: one image split over all ranks with context parallelism (``tryon_lab.parallel``; Ulysses by
  default, ``--ring`` for ring attention); ms per step (CUDA events, median) and seconds per image (denoise +
  VAE decode, median of ``--repeats``), peak memory per GPU; rank 0's final latents against the 1-GPU run's
  saved ones (rel-L2), when that run saved them in ``--work``.

Each launch writes ``multi_gpu_<N>gpu`` to ``benchmarks/results.json``; ``--summarise`` (no torchrun) adds
``multi_gpu``: scaling efficiency (t_1 / (N t_N)) and requests per minute against GPU count, with a table.

    torchrun --nproc-per-node 1 scripts/bench_multi_gpu.py        # run first: the reference latents
    torchrun --nproc-per-node 2 scripts/bench_multi_gpu.py
    torchrun --nproc-per-node 4 scripts/bench_multi_gpu.py
    python scripts/bench_multi_gpu.py --summarise
    torchrun --nproc-per-node 2 scripts/bench_multi_gpu.py --tiny --results /tmp/r.json   # CPU smoke run (gloo)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIZES = {"1024x768": (768, 1024), "2048x1536": (1536, 2048)}  # diptych (height, width)
COLUMNS = ["gpus", "size", "ms_per_step", "s_per_image", "efficiency", "peak_gib_per_gpu", "requests_per_min",
           "rel_l2_vs_1gpu"]


def setup_for(a, size: str):
    """bench_gpu's Setup (full size, or tiny on the CPU) at one diptych size."""
    from scripts.bench_gpu import make_setup

    base = make_setup(argparse.Namespace(tiny=a.tiny, config=a.config, steps=a.steps, backend=None, work=a.work))
    if a.tiny:
        return base  # 64x128, CPU, float32: one size only
    h, w = SIZES[size]
    return dataclasses.replace(base, height=h, width=w)


def peak_bytes(device: str) -> int:
    import torch

    from tryon_lab.bench import peak_rss_bytes

    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss_bytes()


def gather(value) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def throughput(fill, s, n: int) -> dict:
    """Independent requests on every rank at once; requests per minute over all ranks."""
    import torch.distributed as dist

    from scripts.bench_gpu import inputs, run_image

    x = inputs(s)
    run_image(fill, s, x, 2)  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        run_image(fill, s, x, s.steps)
    wall = max(gather(time.perf_counter() - t0))
    world = dist.get_world_size()
    return {"requests": n * world, "wall_s": wall, "requests_per_min": 60 * n * world / wall}


def latency(fill, s, repeats: int, device: str, ref_file: Path | None) -> dict:
    import torch

    from scripts.bench_gpu import inputs, run_image
    from tryon_lab.metrics import rel_l2

    x = inputs(s)
    run_image(fill, s, x, 2)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runs = [run_image(fill, s, x, s.steps) for _ in range(repeats)]
    out = {"ms_per_step": 1e3 * statistics.median([t for r in runs for t in r["per_step"]]),
           "s_per_image": statistics.median(r["seconds"] for r in runs),
           "peak_bytes_per_rank": gather(peak_bytes(device))}
    lat = runs[-1]["latents"]
    if ref_file is not None and ref_file.is_file():
        out["rel_l2_vs_1gpu"] = float(rel_l2(lat, torch.load(ref_file)))
    return out, lat


def bench(a) -> int:
    import torch
    import torch.distributed as dist

    from scripts.bench_gpu import build_fill
    from tryon_lab import parallel
    from tryon_lab.bench import stamp, write_results

    rank, world, device = parallel.init_distributed()
    torch.set_grad_enabled(False)
    sizes = ["tiny"] if a.tiny else a.sizes.split(",")
    fill = build_fill(setup_for(a, sizes[0]))  # the same seeded random weights on every rank
    res = {"stamp": stamp(device), "gpus": world, "steps": setup_for(a, sizes[0]).steps, "repeats": a.repeats,
           "model": "tiny FLUX Fill (CPU smoke run)" if a.tiny else "full-size FLUX Fill, random bf16 weights",
           "decode": "every rank decodes the whole image (not split)", "sizes": {}}
    res["throughput"] = throughput(fill, setup_for(a, sizes[0]), a.requests) | {"size": sizes[0]}
    if world > 1:
        cp = parallel.ContextParallel(ulysses_degree=world // a.ring, ring_degree=a.ring)
        parallel.enable_context_parallel(fill.transformer, cp)
        res["context_parallel"] = dataclasses.asdict(cp) | {"backend": cp.backend}
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        s = setup_for(a, size)
        ref = work / f"multi_gpu_latents_{size}.pt"
        out, lat = latency(fill, s, a.repeats, device, None if world == 1 else ref)
        res["sizes"][size] = out | {"image_tokens": s.image_tokens, "text_tokens": s.txt_tokens}
        if rank == 0:
            if world == 1:
                torch.save(lat, ref)
            print(size, json.dumps(res["sizes"][size]), flush=True)
    if rank == 0:
        write_results(a.results, f"multi_gpu_{world}gpu", res)
        print(f"wrote multi_gpu_{world}gpu to {a.results}; requests/min {res['throughput']['requests_per_min']:.2f}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def summarise(a) -> int:
    """Scaling efficiency and throughput against GPU count from the per-count entries."""
    from tryon_lab.bench import markdown_table, stamp, write_results

    data = json.loads(Path(a.results).read_text())
    runs = {e["gpus"]: e for k, e in data.items() if k.startswith("multi_gpu_") and k.endswith("gpu")}
    if 1 not in runs:
        raise SystemExit("no 1-GPU entry (multi_gpu_1gpu): run torchrun --nproc-per-node 1 first")
    rows = []
    for n in sorted(runs):
        for size, r in runs[n]["sizes"].items():
            t1 = runs[1]["sizes"].get(size, {}).get("s_per_image")
            rows.append({"gpus": n, "size": size, "ms_per_step": r["ms_per_step"], "s_per_image": r["s_per_image"],
                         "efficiency": t1 / (n * r["s_per_image"]) if t1 else None,
                         "peak_gib_per_gpu": max(r["peak_bytes_per_rank"]) / 2**30,
                         "requests_per_min": runs[n]["throughput"]["requests_per_min"],
                         "rel_l2_vs_1gpu": r.get("rel_l2_vs_1gpu", "")})
    title = ("# Past one GPU: context-parallel latency and sweep throughput\n\nefficiency = t(1 GPU) / (N x t(N GPUs)) "
             "per image; requests_per_min: one request per GPU at a time (a Ray sweep's steady state), at "
             f"{runs[1]['throughput']['size']}.\n\n")
    write_results(a.results, "multi_gpu", {"stamp": stamp(), "rows": rows}, title + markdown_table(rows, COLUMNS))
    print(markdown_table(rows, COLUMNS))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(SIZES), help="diptych sizes, WxH")
    ap.add_argument("--steps", type=int, default=None, help="28 (tiny: 3)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3, help="throughput: requests per GPU")
    ap.add_argument("--ring", type=int, default=1, help="ring degree (the rest is Ulysses)")
    ap.add_argument("--config", default=str(REPO / "benchmarks" / "flux_fill_config.json"))
    ap.add_argument("--work", default="/tmp/bench_multi_gpu", help="reference latents of the 1-GPU run")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results.json"))
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (gloo): the same code path")
    ap.add_argument("--summarise", action="store_true", help="combine the per-count entries (no torchrun)")
    a = ap.parse_args(argv)
    return summarise(a) if a.summarise else bench(a)


if __name__ == "__main__":
    raise SystemExit(main())
