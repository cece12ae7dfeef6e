"""Past one GPU, measured: context-parallel latency and sweep throughput on 1, 2 and 4 GPUs (one launch per count).

Full-size FLUX Fill (``fullsize``: random bf16 weights built on each GPU), 512 T5 + 729 Redux text tokens,
diptychs of 1024x768 and 2048x1536. Launch one process per GPU (``torchrun``):

* throughput: every rank runs its own requests on its own copy of the model (what a Ray sweep with one GPU per
  point does once the model is loaded); requests per minute = all requests / wall time of the slowest rank.
* latency: one image split over all ranks with context parallelism (``PipelineOptions.context_parallel``
  through ``configure.apply_options``; Ulysses by default, ring for ``ring > 1``); ms per step (CUDA events,
  median) and seconds per image (denoise + VAE decode, median of ``repeats``), peak memory per GPU; rank 0's
  final latents against the 1-GPU run's saved ones (rel-L2), when that run saved them in ``work``.

On the CPU (``tiny``, gloo) the ranks run whole, unsplit: context parallelism needs an accelerator.
``bench`` writes ``multi_gpu_<N>gpu``; ``summarise`` (no torchrun) adds ``multi_gpu``: scaling efficiency
(t_1 / (N t_N)) and requests per minute against GPU count, with a table.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from ..configure import PipelineOptions, apply_options
from ..metrics import rel_l2
from ..parallel import ContextParallel, init_distributed
from ..plots import markdown_table
from ..provenance import REPO_ROOT, stamp, write_results
from ..timers import peak_memory_bytes
from . import fullsize, step_profile
from .gpu_bench import run_image

SIZES = {"1024x768": (768, 1024), "2048x1536": (1536, 2048)}  # diptych (height, width)
COLUMNS = ["run (UTC)", "gpus", "variant", "size", "ms_per_step", "s_per_image", "s_outside_steps", "s_decode",
           "speedup", "efficiency", "peak_gib_per_gpu", "requests_per_min", "rel_l2_vs_1gpu"]
RESULTS = REPO_ROOT / "benchmarks" / "results.json"


def shape_for(size: str, tiny: bool, config: str | Path = fullsize.CONFIG_FILE) -> fullsize.Shape:
    """The full-size shape at one diptych size (tiny: the toy model on the CPU, one size only)."""
    if tiny:
        return fullsize.shape(tiny=True)
    h, w = SIZES[size]
    return fullsize.shape(height=h, width=w, config=config)


def gather(value) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def throughput(fill, s: fullsize.Shape, steps: int, n: int) -> dict:
    """Independent requests on every rank at once; requests per minute over all ranks."""
    import torch.distributed as dist

    x = fullsize.diptych_inputs(s)
    run_image(fill, s, x, 2)  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        run_image(fill, s, x, steps)
    wall = max(gather(time.perf_counter() - t0))
    world = dist.get_world_size()
    return {"requests": n * world, "wall_s": wall, "requests_per_min": 60 * n * world / wall}


def latency(fill, s: fullsize.Shape, steps: int, repeats: int, ref_file: Path | None) -> tuple[dict, torch.Tensor]:
    x = fullsize.diptych_inputs(s)
    run_image(fill, s, x, 2)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    runs = [run_image(fill, s, x, steps) for _ in range(repeats)]
    out = {"ms_per_step": 1e3 * statistics.median([t for r in runs for t in r["per_step"]]),
           "s_per_image": statistics.median(r["seconds"] for r in runs),
           "phases_s": {k: statistics.median(r["phases"][k] for r in runs) for k in runs[0]["phases"]},
           "peak_bytes_per_rank": gather(peak_memory_bytes(s.device))}
    lat = runs[-1]["latents"]
    if ref_file is not None and ref_file.is_file():
        out["rel_l2_vs_1gpu"] = float(rel_l2(lat, torch.load(ref_file)))
    return out, lat


def profile_steps(fill, s: fullsize.Shape, steps: int = 4) -> dict:
    """Where a split step's time goes on this rank, denoising steps only (``step_profile.profile_window``): device
    time by kernel kind per step, the time a kernel runs on any stream per step, the top kernels, and on CUDA the
    device's lag behind the host (``step_profile.device_lag``), after a warm-up. Under the profiler kernels run a
    little longer."""
    cuda = s.device == "cuda"
    x = fullsize.diptych_inputs(s)
    fill(**x, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0))
    out = step_profile.device_lag(fill, x, steps) if cuda else {}
    prof, wall_ms = step_profile.profile_window(fill, x, steps, cuda)
    kinds = {r["kind"]: r["ms_per_step"] for r in step_profile.time_by_kind(prof, cuda, steps)}
    top = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: -e.self_device_time_total)[:15]
    out["top_kernels_ms_per_step"] = {e.key[:100]: e.self_device_time_total / 1e3 / steps for e in top}
    # CPU events nest, so busy time means something on CUDA only
    return out | {"window": f"{steps} steps", "kind_rule": step_profile.KIND_RULE,
                  "wall_ms_per_step_profiled": wall_ms, "device_ms_per_step_by_kind": kinds,
                  "busy_ms_per_step": step_profile.busy_ms(prof) / steps if cuda else None}


FP8 = {"fp8": "fp8_dynamic_row", "fuse_qkv": True}
VARIANTS = {"eager": {}, "fp8": FP8 | {"compile": "regional"},  # fp8: the best one-GPU path
            "fp8_full": FP8 | {"compile": "full"},  # one compiled graph a step: fewer host calls than 57 blocks
            "fp8_cudagraphs": FP8 | {"compile": "full", "compile_mode": "reduce-overhead"},  # no launches at all
            "fp8_step_graph": FP8 | {"compile": "regional", "step_graph": True}}  # regional's rounding, one launch
VARIANTS |= {f"{k}_overlap": v for k, v in VARIANTS.items() if "compile" in v}  # + comm_overlap_config
# peers: cache-dit's own Ulysses (peers_gpu.cache_dit_parallel) on FP8 + regional compile; no fused QKV, which its
# asynchronous Ulysses overlaps projection by projection
PEERS = {"cache_dit_async": {"ulysses_async": True},
         "cache_dit_async_fp8comm": {"ulysses_async": True, "ulysses_float8": True}}
# the peer's split under our step graph (one CUDA graph per transformer call): its overlap without the host
PEERS |= {f"{k}_step_graph": v for k, v in PEERS.items()}
VARIANTS |= {k: {"fp8": "fp8_dynamic_row", "compile": "regional"} for k in PEERS}


def graphed(variant: str) -> bool:
    """Whether the variant's CUDA graphs hold the collectives: whole-model graphs, our step graph, or the peer's
    split under our step graph (applied after the peer's hooks, so not through the options)."""
    v = VARIANTS[variant]
    return "compile_mode" in v or v.get("step_graph", False) or (variant in PEERS and variant.endswith("_step_graph"))


OVERLAP_PASSES = ("reorder_communication_preserving_peak_memory", "sink_waits_iterative",
                  "reorder_communication_preserving_peak_memory")  # inductor's recommended sequence


def comm_overlap_config() -> dict:
    """Inductor's reordering of each compiled graph's collectives against compute that does not need them (in a
    single-stream block the MLP projection does not wait for attention's all-to-alls), with the recommended
    passes this torch has."""
    from torch._inductor import comms

    return {"reorder_for_compute_comm_overlap": True,
            "reorder_for_compute_comm_overlap_passes": [p for p in OVERLAP_PASSES if hasattr(comms, p)]}


def entry_name(world: int, variant: str, split_vae: bool = False, ring: int = 1, chunks: int = 0) -> str:
    return (f"multi_gpu_{world}gpu" + ("" if variant == "fp8" else f"_{variant}") + ("_splitvae" if split_vae else "")
            + (f"_ring{ring}" if ring > 1 else "") + (f"_qkv{chunks}" if chunks else ""))


def bench(*args, variant: str = "fp8", **kwargs) -> dict:
    """``measure`` (below) under the variant's inductor settings: compile happens at the first call, so they hold
    for the whole run."""
    from torch._inductor import config as inductor_config

    with inductor_config.patch(comm_overlap_config() if variant.endswith("_overlap") else {}):
        return measure(*args, variant=variant, **kwargs)


@torch.no_grad()  # inference only; restores the caller's grad mode on return
def measure(sizes: tuple[str, ...] = tuple(SIZES), steps: int | None = None, repeats: int = 3, requests: int = 3, ring: int = 1,
          work: str | Path = "/tmp/bench_multi_gpu", results: str | Path = RESULTS, tiny: bool = False,
          config: str | Path = fullsize.CONFIG_FILE, variant: str = "fp8", text_multiple: int = 2,
          profile: bool = False, teardown: bool = True, split_vae: bool = False, ulysses_chunks: int = 0) -> dict:
    """One launch (every rank calls it): throughput (eager, one model per GPU), then latency of ``variant`` (the
    best one-GPU path: FP8 + fused QKV + regional compile) with context parallelism over all ranks.

    ``text_multiple``: the text tokens are padded (T5 padding positions) to a multiple of this, the same in every
    launch, so the split is even (no ``ulysses_anything``, and compile works) and runs compare like for like.
    ``profile``: after each size's latency, where the split step's time goes (``profile_steps``).
    ``split_vae``: the VAE encode and decode split over the ranks too (``parallel.split_vae``).
    ``ulysses_chunks``: one all-to-all for Q, K and V over that many chunks of heads (``ContextParallel``).
    ``teardown=False`` leaves the process group as it is: after CUDA graphs captured the collectives, the closing
    barrier hung on two H200s, so the script exits those ranks without it once the results are written."""
    import torch.distributed as dist

    rank, world, device = init_distributed()
    steps = steps or (3 if tiny else 28)
    sizes = ["tiny"] if tiny else list(sizes)
    s0 = shape_for(sizes[0], tiny, config)
    s0.text_tokens += -s0.text_tokens % text_multiple
    pipe = fullsize.slim_pipeline(s0)  # the same seeded random weights on every rank
    split_vae = split_vae and world > 1  # one process has nothing to split
    res = {"stamp": stamp(device), "gpus": world, "steps": steps, "repeats": repeats, "variant": variant,
           "options": VARIANTS[variant], "text_tokens_padded_to_multiple_of": text_multiple,
           "model": "tiny FLUX Fill (CPU smoke run)" if tiny else "full-size FLUX Fill, random bf16 weights",
           "decode": ("each rank encodes and decodes a band of rows (split_vae)" if split_vae else
                      "every rank encodes and decodes the whole image (not split)"),
           "split_vae": split_vae, "sizes": {}}
    if requests:
        res["throughput"] = throughput(pipe.fill, s0, steps, requests) | {"size": sizes[0]}
    options = PipelineOptions(device=s0.device, dtype=s0.dtype, **VARIANTS[variant] if not tiny else {})
    peer = None
    if world > 1 and torch.accelerator.device_count() == 0:  # the CPU smoke run: the code paths, no splitting
        res["context_parallel"] = "not applied: context parallelism needs an accelerator (each rank runs whole)"
    elif world > 1 and variant in PEERS:
        peer = PEERS[variant]
    elif world > 1:
        even = (s0.text_tokens + s0.image_tokens) % world == 0
        cp = ContextParallel(ulysses_degree=world // ring, ring_degree=ring, anything=not even, split_vae=split_vae,
                             ulysses_chunks=ulysses_chunks)
        options = dataclasses.replace(options, context_parallel=cp)
        res["context_parallel"] = dataclasses.asdict(cp) | {"backend": cp.backend}
    apply_options(pipe, options)
    if peer is not None:  # the peer's own hooks: after FP8, before the first (compiling) image
        from .peers_gpu import cache_dit_parallel

        res["context_parallel"] = cache_dit_parallel(pipe.fill, world, **peer)
        if variant.endswith("_step_graph"):  # registered last: the peer's split and gather run inside the graph
            from ..step_graph import apply_step_graph

            apply_step_graph(pipe.fill.transformer)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    name = entry_name(world, variant, split_vae, ring if world > 1 else 1, ulysses_chunks if world > 1 else 0)
    for size in sizes:
        s = shape_for(size, tiny, config)
        s.text_tokens = s0.text_tokens
        ref = work / f"multi_gpu_latents_{size}.pt"
        out, lat = latency(pipe.fill, s, steps, repeats, None if world == 1 else ref)
        res["sizes"][size] = out | {"image_tokens": s.image_tokens, "text_tokens": s.text_tokens}
        if profile:
            res["sizes"][size]["profile_per_rank"] = gather(profile_steps(pipe.fill, s))
        if rank == 0:
            if world == 1 and variant == "fp8":  # the reference: the best one-GPU path
                torch.save(lat, ref)
            print(size, json.dumps(res["sizes"][size]), flush=True)
            write_results(results, name, res)  # after every size: a run stopped later keeps what it measured
    if rank == 0:
        print(f"wrote {name} to {results}", res.get("throughput", ""))
    if teardown:
        dist.barrier()
        dist.destroy_process_group()
    return res


def label(e: dict) -> str:
    """A run's variant as the tables name it (``+splitvae``: the VAE split over the ranks too; ``+ring2``: ring
    attention of degree 2 in the split; ``+qkv2``: one all-to-all for Q, K and V over 2 chunks of heads)."""
    cp = e.get("context_parallel")
    ring, chunks = (cp.get("ring_degree", 1), cp.get("ulysses_chunks", 0)) if isinstance(cp, dict) else (1, 0)
    return (e.get("variant", "fp8") + ("+splitvae" if e.get("split_vae") else "") + (f"+ring{ring}" if ring > 1 else "")
            + (f"+qkv{chunks}" if chunks else ""))


def by_kind(p: dict) -> dict[str, float]:
    """A rank's device time per step by kernel kind, profiles filed by the old rule refiled from their top kernels."""
    kinds = p["device_ms_per_step_by_kind"]
    if p.get("kind_rule") == step_profile.KIND_RULE:
        return kinds
    return step_profile.refiled(kinds, p.get("top_kernels_ms_per_step", {}))


TARGETS = {"1024x768": 1.6, "2048x1536": 1.8}  # per-image speedup of 2 GPUs over the best one-GPU path


def verdicts(rows: list[dict]) -> list[str]:
    """One line per size: the best multi-GPU speedup per image against its target, and its rel-L2."""
    out = []
    for size, target in TARGETS.items():
        multi = [r for r in rows if r["size"] == size and r["gpus"] > 1 and r["speedup"]]
        if multi:
            b = max(multi, key=lambda r: r["speedup"])
            met = "met" if b["speedup"] >= target else "NOT met"
            err = b["rel_l2_vs_1gpu"]
            out.append(f"- {size}: best {b['gpus']} GPUs `{b['variant']}` {b['speedup']:.2f}x per image "
                       f"({b['s_per_image']:.2f} s), target >= {target}x: **{met}**; final-latent rel-L2 against "
                       f"one GPU {f'{err:.3g}' if err != '' else 'not measured (no one-GPU latents at hand)'}")
    return out


def summary(results: str | Path = RESULTS) -> tuple[list[dict], list[dict], str]:
    """Scaling rows (speed-up and efficiency against the best one-GPU path, throughput), per-rank profile rows and
    the markdown report, from the per-count (and per-variant) entries."""
    data = json.loads(Path(results).read_text())
    runs = {k: e for k, e in data.items() if k.startswith("multi_gpu_") and "gpu" in k.split("_")[2]}
    refs = sorted((e for e in runs.values() if e["gpus"] == 1 and e.get("variant", "fp8") == "fp8"),
                  key=lambda e: e["stamp"]["date"])
    if not refs:
        raise SystemExit("no 1-GPU FP8 entry (multi_gpu_1gpu): run torchrun --nproc-per-node 1 first")
    rows, profiled = [], []
    for e in sorted(runs.values(), key=lambda e: (e["stamp"]["date"], e["gpus"])):
        # the reference: the best one-GPU path measured last before this entry (same session), else the first one
        best_one = ([r for r in refs if r["stamp"]["date"] <= e["stamp"]["date"]] or refs)[-1]["sizes"]
        for size, r in e["sizes"].items():
            t1 = best_one.get(size, {}).get("s_per_image")
            rows.append({"run (UTC)": e["stamp"]["date"][5:16], "gpus": e["gpus"], "variant": label(e),
                         "size": size,
                         "ms_per_step": r["ms_per_step"], "s_per_image": r["s_per_image"],
                         # what the split does not shrink: preparation, the VAE encode and decode (every rank whole)
                         "s_outside_steps": r["s_per_image"] - e["steps"] * r["ms_per_step"] / 1e3,
                         "s_decode": r.get("phases_s", {}).get("decode_s", ""),
                         "speedup": t1 / r["s_per_image"] if t1 else None,
                         "efficiency": t1 / (e["gpus"] * r["s_per_image"]) if t1 else None,
                         "peak_gib_per_gpu": max(r["peak_bytes_per_rank"]) / 2**30,
                         "requests_per_min": e.get("throughput", {}).get("requests_per_min", ""),
                         "rel_l2_vs_1gpu": r.get("rel_l2_vs_1gpu", "")})
            profiled += [{"run (UTC)": e["stamp"]["date"][5:16], "gpus": e["gpus"], "variant": label(e),
                          "size": size, "rank": i,
                          "ms/step": r["ms_per_step"], "host ms/step": p.get("host_ms_per_step"),
                          "device lag ms (last step)": (p.get("device_lag_ms") or [None])[-1],
                          "busy ms/step (profiled)": p.get("busy_ms_per_step"), "profiled window": p.get("window"),
                          **{f"{k} ms": v for k, v in by_kind(p).items()}}
                         for i, p in enumerate(r.get("profile_per_rank", []))]
    title = ("# Past one GPU: context-parallel latency and sweep throughput\n\nspeedup = t(best one-GPU path) / "
             "t(N GPUs) per image, efficiency = speedup / N; the best one-GPU path is FP8 + fused QKV + regional "
             "compile (`multi_gpu_1gpu`), measured last before the row (the same session). requests_per_min: one "
             "model per GPU, one request per GPU at a time (a sweep's steady state).\n\n")
    notes = [f"- {e['stamp']['date'][5:16]} {e['gpus']} GPUs `{label(e)}` {size}: {r['source']}"
             for e in runs.values() for size, r in e["sizes"].items() if r.get("source")]
    md = (title + markdown_table(rows, COLUMNS) + "\n\n" + "\n".join(notes + [""] if notes else [])
          + "\n".join(verdicts(rows)))
    if profiled:
        md += ("\n\n## Where a step's time goes, per rank (`--profile`)\n\nprofiled window: what the profile "
               "covered (\"+ VAE encode\": the pipeline's VAE encode of the masked image too, once per image, "
               "spread over the steps under \"other\"); host ms/step: "
               "how long the host takes to issue a step; device lag: how far the GPU runs behind the host at the "
               "last step's end (near 0: host-bound: the GPU waits for work); busy: the time a kernel runs on any stream, "
               "then device time by kernel kind, both under the profiler (which slows kernels a little). Triton "
               "kernels are filed by their prefix: inductor names them after the ops they fuse, so an FP8 "
               "activation-quantize kernel's name says `scaled_mm`. Profiles recorded before that rule are refiled "
               "from the top kernels they list; those that list none (before 05:00 on 11-30) still count Triton "
               "quantize and RoPE kernels under GEMM and attention.\n\n"
               + markdown_table(profiled, list(dict.fromkeys(k for r in profiled for k in r))))
    if sweep := data.get("ray_sweep"):
        from . import ray_sweep_bench as rs

        md += (f"\n\n## Sweep throughput on Ray (`scripts/bench_ray_sweep.py`, {sweep['stamp']['date']})\n\n"
               f"`{sweep['notebook']}` over {sweep['grid']} (base {sweep['base_params']}), one GPU per point.\n\n"
               + rs.table(sweep["rows"])
               + "\n\n" + rs.verdict(sweep["rows"]) + ("" if sweep.get("valid", True) else
                                                       " Not a throughput measurement: points failed.")
               + (f"\n\n{sweep['caveats']}." if sweep.get("caveats") else ""))
    return rows, profiled, md


def summarise(results: str | Path = RESULTS) -> list[dict]:
    """``summary`` written as the ``multi_gpu`` entry and ``multi_gpu.md`` beside the results file."""
    rows, profiled, md = summary(results)
    write_results(results, "multi_gpu", {"stamp": stamp(), "rows": rows, "profile": profiled}, md)
    print(md)
    return rows


def plot_profile(profiled: list[dict]):
    """Device time per step by kernel kind, one stacked bar per rank and run, beside the host's time per step."""
    from ..plots import phase_bars

    short = {step_profile.TRITON: "Triton (fused)", "communication (NCCL)": "NCCL"}
    kinds = list(dict.fromkeys(k[:-3] for r in profiled for k in r if k.endswith(" ms") and k != "host ms"))
    rows = [{**{short.get(k, k): r.get(f"{k} ms") for k in kinds},
             "case": f"{r['gpus']} GPU {r['variant']} {r['size']} rank {r['rank']}: step {r['ms/step']:.0f} ms, "
                     f"host {r['host ms/step'] or 0:.0f} ms"} for r in profiled]
    return phase_bars(rows, [short.get(k, k) for k in kinds], unit="ms",
                      title="device time per denoising step, by kernel kind (under the profiler)")
