"""The full-size cold-start cases on a GPU, run by the ``coldstart`` harness (``gpu_run``), and the AOTInductor
case: packages exported once (``prepare_aoti``, in a process of their own), then a fresh process that imports
torch, numpy, PIL and safetensors only (``aoti_child``) runs the same request as every other case and reports
the same phases. Like ``coldstart``, this module imports the standard library only at the top: the child counts
every import after it starts.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..attention import FA3  # the standard library only, like import_cache
from .coldstart import (
    FP8_FOLDER,
    PHASES,
    Case,
    _by_package,
    _count_imports,
    _cuda_init,
    _laps,
    _request,
    _request_images,
    _split,
    run,
)

SLIM = dict(fp8="fp8_dynamic_row", fuse_qkv=True, compile="regional")  # the best step-speed variant of run 10
STATIC_SLIM = {**SLIM, "fp8": "fp8_static_tensor"}  # the best since (fp8_static_fused_regional, 88 ms/step)
STATIC_FA3 = {**STATIC_SLIM, "attention": FA3}  # with FlashAttention-3 in place of cuDNN
HOT_FA3 = {**STATIC_FA3, "hot_path": True}  # + the preallocated loop, which the Fill parts without the class run
NO_TRANSFORMERS = {**HOT_FA3, "redux_process": True}  # + Redux in a worker: no transformers in the serving process
# a serving process's levers, with the kernels from the inductor folder the FA3 blocks' compile filled
SERVING = dict(fp8_weights=True, aot_blocks="load", import_cache=True, leave_out=True,
               cache="slim + static FP8 weights + FA3, AOT blocks, empty cache")
SIGMOID_FA3 = {**STATIC_FA3, "sigmoid_gelu": True}  # the best step's blocks (run 28): GELU as a sigmoid
BEST_STEP = {**SIGMOID_FA3, "hot_path": True, "step_graph": True}  # + the step as one CUDA graph
SERVING_SIGMOID = {**SERVING, "cache": "slim + static FP8 weights + FA3 + sigmoid GELU, AOT blocks, empty cache"}


def aoti_child(t: float) -> None:
    """The AOTInductor case (``_AOTI_CHILD``): torch, numpy, PIL and safetensors only (no diffusers, no
    transformers, no dynamo), the packages ``prepare_aoti`` wrote, the same request as every other case, the same
    phases; prints one ``COLD {json}`` line, with the final latents' rel-L2 against the slim eager pipeline's."""
    imports = _count_imports()
    a = json.loads(sys.argv[1])
    marks, lap = _laps(t, imports, a["spawned"])
    from ..images import paste_back, prepare_input
    from ..metrics import rel_l2
    from ..timers import sync
    from . import aoti_run
    lap("imports")
    _cuda_init()
    lap("cuda_init")
    p = aoti_run.load_packages(a["aoti_dir"], on_stage=lap)  # "artifacts" (compiled code), then "weights"
    marks["weights_bytes"] = p.weights_bytes
    person, garment, mask = _request_images(a)
    calls: list[float] = []

    def timed_transformer(*args):  # the first call holds the kernels' loading: "compile" beside a steady call
        sync(p.schedule.device)
        start = time.perf_counter()
        out = p.transformer(*args)
        sync(p.schedule.device)
        calls.append(time.perf_counter() - start)
        return out

    def image(step=lambda name: None):
        prepared = prepare_input(person, garment, mask)
        step("prepare")
        latents, decoded = aoti_run.run_request(p, [prepared.diptych], [prepared.mask], [a["seed"]], a["steps"],
                                                on_stage=step, transformer=timed_transformer)
        paste_back(aoti_run.to_pil(decoded)[0], prepared)
        step("decode")
        return latents

    latents = image(lap)
    marks["to_first_image"] = time.time() - a["spawned"]
    steady = statistics.median(calls[1:]) if len(calls) > 1 else 0.0
    _split(marks, "denoise", {"compile": max(0.0, calls[0] - steady) if calls else 0.0})
    start = time.perf_counter()
    image()
    marks["steady_image"] = time.perf_counter() - start
    marks["steady_step_ms"] = 1000 * statistics.median(calls[1:]) if len(calls) > 1 else None
    reference = Path(a["aoti_dir"]) / "reference_latents.safetensors"
    if reference.exists():
        from safetensors.torch import load_file

        marks["rel_l2_vs_slim_eager"] = rel_l2(latents, load_file(str(reference))["latents"])
    marks["imports_by_package"] = _by_package(imports)
    marks["heavy_modules_loaded"] = [m for m in aoti_run.HEAVY_MODULES if m in sys.modules]
    for k in PHASES:  # phases this path does not have (configure, quantize) are zero, not missing
        marks.setdefault(k, 0.0)
    print("COLD " + json.dumps(marks, default=str), flush=True)


def aoti_export(args: str) -> None:
    """The exporting process (``prepare_aoti``): the slim pipeline with ``options`` (no compile), its eager final
    latents for the run's request (the reference the cold case is checked against), then every package with the
    transformer's weights beside it. Prints one ``AOTI {json}`` line."""
    import torch

    from .. import pipeline
    from ..configure import PipelineOptions, build_pipeline
    from . import aoti

    a = json.loads(args)
    out, start = Path(a["aoti_dir"]), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)

    def stage(name: str) -> None:  # on stdout as it happens: a process that dies still says how far it got
        print(f"AOTI-STAGE {name} {time.perf_counter() - start:.1f} s", flush=True)

    pipe = build_pipeline(a["model_dir"], PipelineOptions(**a["options"]))
    stage("built")
    info: dict = {"model": pipe.description, "options": a["options"], "build_s": time.perf_counter() - start}
    prepared = pipeline.prepare([_request(a)])
    latents, _, _, _ = aoti.reference(pipe, prepared, [a["seed"]], a["steps"])
    from safetensors.torch import save_file

    save_file({"latents": latents.contiguous().cpu()}, str(out / "reference_latents.safetensors"))
    stage("reference latents")
    begin = time.perf_counter()
    exported = aoti.export_all(pipe, prepared, [a["seed"]], out, steps=(a["steps"],), external_weights=True,
                               on_stage=stage)
    info.update(export_s=time.perf_counter() - begin, seconds_by_package=exported["seconds"],
                bytes={f.name: f.stat().st_size for f in out.iterdir()},
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
    print("AOTI " + json.dumps(info, default=str), flush=True)


def prepare_aoti(model_dir: Path, work: Path, base: dict, timeout: float) -> dict:
    """Export the AOTInductor packages in a process of their own (its GPU memory is gone before the cases)."""
    args = {**base, "model_dir": str(model_dir), "aoti_dir": str(work / "aoti"),
            "options": {**{k: v for k, v in SLIM.items() if k != "compile"}, **base.get("options", {})}}
    import torch

    from . import aoti

    shutil.rmtree(work / "aoti", ignore_errors=True)
    start = time.perf_counter()
    check = aoti.loader_check(work, "cuda" if torch.cuda.is_available() else "cpu")
    if not check["ok"]:
        return {"status": "failed", "seconds": time.perf_counter() - start, "loader_check": check,
                "reason": f"torch's AOTInductor loader fails on a two-layer package in a torch-only process here "
                          f"(exit {check['returncode']}), so the full-size export was not started"}
    try:
        p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", "import sys; from tryon_lab.experiments.coldstart_gpu "
                            "import aoti_export; aoti_export(sys.argv[1])", json.dumps(args)], capture_output=True,
                           text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired as e:
        return {"status": "failed", "reason": f"export did not finish within {timeout:.0f} s: "
                f"{(e.stderr or b'')[-1500:]!r}", "seconds": time.perf_counter() - start}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("AOTI ")]
    stages = [ln[11:] for ln in p.stdout.splitlines() if ln.startswith("AOTI-STAGE ")]
    if p.returncode or not lines:
        errors = [ln for ln in p.stderr.splitlines() if "it/s]" not in ln and "s/it]" not in ln]
        return {"status": "failed", "returncode": p.returncode, "stages": stages, "reason": "\n".join(errors)[-4000:],
                "seconds": time.perf_counter() - start}
    return {"status": "ok", **json.loads(lines[-1][5:]), "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------ the full-size cases on a GPU
GPU_CASES = {
    "stock eager": Case(stock=True),
    "slim, empty cache": Case(options=SLIM, artifacts="save:bf16"),
    "slim, warm artefacts": Case(options=SLIM, artifacts="load:bf16"),
    "slim + FP8 weights, empty cache": Case(options=SLIM, fp8_weights=True, artifacts="save:fp8"),
    "slim + FP8 weights, warm artefacts": Case(options=SLIM, fp8_weights=True, artifacts="load:fp8"),
    # the empty-cache case's inductor folder kept, as an image would bake it in: no mega-cache file to unpack
    "slim + FP8 weights, warm inductor folder": Case(options=SLIM, fp8_weights=True,
                                                     cache="slim + FP8 weights, empty cache"),
    "slim, all levers (+ CUDA init on a thread)": Case(options=SLIM, fp8_weights=True, artifacts="load:fp8",
                                                       cuda_thread=True),
    # regional compile as AOT-compiled blocks (aot_blocks.py): the first case compiles and saves them, the next
    # loads them with an empty inductor folder (only the blocks' folder ships)
    "slim + FP8 weights, AOT blocks, empty cache": Case(options=SLIM, fp8_weights=True, aot_blocks="save"),
    "slim + FP8 weights, AOT blocks loaded": Case(options=SLIM, fp8_weights=True, aot_blocks="load"),
    # importlib's package map and transformers' lazy-import tables read from a file written at image build
    "slim + FP8 weights, AOT blocks loaded, import cache": Case(options=SLIM, fp8_weights=True, aot_blocks="load",
                                                               import_cache=True),
    # the kernels of the saved blocks from the inductor folder their compile filled, as an image bakes both in
    "slim + FP8 weights, AOT blocks loaded, import cache, their inductor folder": Case(
        options=SLIM, fp8_weights=True, aot_blocks="load", import_cache=True,
        cache="slim + FP8 weights, AOT blocks, empty cache"),
    # a serving process: the packages the slim path imports but never calls left out (import_cache.leave_out)
    "slim + FP8 weights, AOT blocks loaded, import cache, packages left out": Case(
        options=SLIM, fp8_weights=True, aot_blocks="load", import_cache=True, leave_out=True),
    "slim, serving: AOT blocks + inductor folder + import cache + packages left out": Case(
        options=SLIM, fp8_weights=True, aot_blocks="load", import_cache=True, leave_out=True,
        cache="slim + FP8 weights, AOT blocks, empty cache"),
    # the best step variant's FP8 (static activation scales, calibrated once at image build) in the serving case
    "slim + static FP8 weights, AOT blocks, empty cache": Case(options=STATIC_SLIM, fp8_weights=True, aot_blocks="save"),
    "slim, serving with static FP8: AOT blocks + inductor folder + import cache + packages left out": Case(
        options=STATIC_SLIM, fp8_weights=True, aot_blocks="load", import_cache=True, leave_out=True,
        cache="slim + static FP8 weights, AOT blocks, empty cache"),
    # FlashAttention-3 (bf16): its kernels come compiled, where cuDNN builds a plan for the shape on first use
    "slim + static FP8 weights + FA3, AOT blocks, empty cache": Case(options=STATIC_FA3, fp8_weights=True, aot_blocks="save"),
    "slim, serving with static FP8 + FA3: AOT blocks + inductor folder + import cache + packages left out": Case(
        options=STATIC_FA3, **SERVING),
    "slim, serving with static FP8 + FA3 + hot path: AOT blocks + inductor folder + import cache + packages left "
    "out": Case(options=HOT_FA3, **SERVING),
    # the FP8 transformer's and SigLIP's reads started right after torch's import (configure.start_reads), so
    # they and the CUDA context run beside the diffusers and torchao imports instead of after them
    "slim, serving with static FP8 + FA3 + hot path, reads started at torch's import: AOT blocks + inductor folder "
    "+ import cache + packages left out": Case(options=HOT_FA3, early_reads=True, **SERVING),
    "slim, serving without transformers (Redux in its own process), static FP8 + FA3 + hot path: AOT blocks + "
    "inductor folder + import cache + packages left out": Case(options=NO_TRANSFORMERS, redux_process=True, **SERVING),
    "slim, serving without transformers (Redux forked after torch's import), static FP8 + FA3 + hot path: AOT "
    "blocks + inductor folder + import cache + packages left out": Case(
        options=NO_TRANSFORMERS, redux_process=True, redux_fork=True, **SERVING),
    # the best step (run 28's blocks, the step graphed) in the serving process; the CUDA handles made on a thread
    # while the reads' thread makes the context (the main thread waited 0.70-0.81 s for both in run 25)
    "slim + static FP8 weights + FA3 + sigmoid GELU, AOT blocks, empty cache": Case(
        options=SIGMOID_FA3, fp8_weights=True, aot_blocks="save"),
    "slim, serving with the best step (static FP8 + FA3 + sigmoid GELU + step graph + hot path), reads started at "
    "torch's import, CUDA handles on a thread: AOT blocks + inductor folder + import cache + packages left out": Case(
        options=BEST_STEP, early_reads=True, cuda_thread=True, **SERVING_SIGMOID),
    "the same, without transformers (Redux forked after torch's import)": Case(
        options={**BEST_STEP, "redux_process": True}, early_reads=True, cuda_thread=True, redux_process=True,
        redux_fork=True, **SERVING_SIGMOID),
    "slim, all levers with AOT blocks (+ CUDA init on a thread)": Case(
        options=SLIM, fp8_weights=True, aot_blocks="load", cuda_thread=True, import_cache=True),
    "AOTInductor packages, torch only": Case(aoti=True),
}


def round_name(name: str, r: int) -> str:
    """A case's name in round ``r`` of ``gpu_run(rounds=...)`` (the first round keeps the name)."""
    return name if r == 1 else f"{name} (round {r})"


def base_case(name: str) -> str:
    """The ``GPU_CASES`` name behind a ``round_name``."""
    return name.split(" (round ")[0]


def select_cases(names: list[str] | None = None) -> dict[str, Case]:
    """``GPU_CASES`` named in ``names`` (all when None), in ``GPU_CASES`` order whatever order they were named in:
    a warm case reads the cache folder or artefacts that an earlier case wrote."""
    if unknown := [n for n in names or [] if n not in GPU_CASES]:
        raise ValueError(f"unknown cold-start cases {unknown}; choose from {list(GPU_CASES)}")
    return {k: c for k, c in GPU_CASES.items() if names is None or k in names}


def prepare_fp8(model_dir: Path, work: Path, options: dict, calibration: int | None = None) -> dict:
    """The FP8 transformer saved once before the cases (what a deployment ships beside the bf16 weights), with
    the fusing and mode the cases use; static FP8 calibrated on the bundled sample ``calibration`` px high."""
    from ..configure import save_fp8_weights
    from ..quant import STATIC

    start = time.perf_counter()
    o = {**SLIM, **options}
    info = save_fp8_weights(model_dir, work / FP8_FOLDER.format(o["fp8"]), o["fp8"], o.get("device", "auto"),
                            o.get("dtype", "auto"), fuse_qkv=o["fuse_qkv"],
                            calibration=calibration if o["fp8"] == STATIC else None)  # only it calibrates
    return {**info, "seconds": time.perf_counter() - start}


def gpu_run(s, work: str | Path, steps: int = 28, budget_s: float = 540, on_case=None,
            names: list[str] | None = None, bytecode: bool = False, rounds: int = 1) -> dict:
    """The full-size snapshot (random weights, real layout, local disk) and the ``GPU_CASES`` cases on it
    (``names``: a subset, in ``GPU_CASES`` order), preceded by the saved FP8 transformer they load.
    ``bytecode``: first write the packages' bytecode caches, as an image build would (``compile_bytecode``).
    ``rounds``: the cases that save nothing run again, ``NAME (round K)``: the import phase of one process varies
    by 1-3 s between processes that import the same modules."""
    chosen = select_cases(names)  # before minutes of snapshot building: a typo fails at once
    from .. import embeddings
    from ..checkpoint import FILL_SUBDIR
    from ..provenance import fingerprint
    from .loading_bench import build_snapshot, compare_reads

    work = Path(work)
    root = work / "model"
    start = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    build_snapshot(root, s)
    embeddings.build_embeddings(root, s.torch_dtype, s.device, root / "embeddings.safetensors")
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    res = {"snapshot_s": time.perf_counter() - start}
    if bytecode:
        from .bytecode import compile_bytecode

        res["bytecode_build"] = compile_bytecode()
        print(f"  bytecode written in {res['bytecode_build']['seconds']:.0f} s: {res['bytecode_build']}", flush=True)
    start = time.perf_counter()  # the content fingerprint every result names, hashed once and cached, as an
    res["fingerprint"] = fingerprint(root)  # image would ship its hash cache (else the first request hashes 35 GB)
    res["fingerprint_s"] = time.perf_counter() - start
    print(f"  snapshot {res['snapshot_s']:.0f} s, fingerprint {res['fingerprint_s']:.0f} s", flush=True)
    base = dict(device=s.device, dtype=s.dtype, embeddings_file=str(root / "embeddings.safetensors"),
                compile_backend="inductor" if s.device == "cuda" else "aot_eager")
    cpu = s.device != "cuda"  # the CPU smoke run: FP8 weights only, no FP8 matmuls, no FA3, no CUDA graphs
    cases = {k: Case(**{**c.__dict__, "options": {**c.options, "fp8": "fp8_weight_only", "attention": "native",
                                                        "step_graph": False}
                        if c.options and cpu else c.options}) for k, c in chosen.items()}
    for old in [*work.glob("fp8-transformer*"), work / "aoti"]:
        shutil.rmtree(old, ignore_errors=True)
    # saved only for the modes a case loads (disk: 16 GiB each at full size), each with the shape's height
    fp8_bytes = 0.75 * sum(f.stat().st_size for f in (root / FILL_SUBDIR / "transformer").glob("*.safetensors"))
    for mode in dict.fromkeys(c.options.get("fp8", SLIM["fp8"]) for c in cases.values() if c.fp8_weights):
        by_mode = res.setdefault("fp8_saved_by_mode", {})
        if (free := shutil.disk_usage(work).free) < fp8_bytes + 2**31:  # FP8 ~2/3 of bf16, 2 GiB to spare
            by_mode[mode] = {"status": "skipped", "reason": (
                f"{free / 2**30:.1f} GiB free for a ~{fp8_bytes / 2**30:.0f} GiB FP8 folder: its cases skip")}
            print(f"  FP8 transformer ({mode}) not saved: {by_mode[mode]['reason']}", flush=True)
            continue
        by_mode[mode] = saved = prepare_fp8(root, work, {**base, "fp8": mode}, calibration=s.height)
        print(f"  FP8 transformer ({mode}) saved in {saved['seconds']:.0f} s ({saved['bytes'] / 2**30:.1f} GiB)",
              flush=True)
        if "fp8_read" not in res:  # the read itself, both ways, once
            from ..quant import FP8_FILE

            res["fp8_saved"] = saved
            res["fp8_read"] = compare_reads(work / FP8_FOLDER.format(mode) / FP8_FILE, s.device)
            print(f"  FP8 file read: {res['fp8_read']}", flush=True)
    request = {"steps": steps, "seed": 0, "height": s.height, "width": s.width // 2}
    if any(c.aoti for c in cases.values()):
        left = budget_s - (time.perf_counter() - start + res["snapshot_s"]) - 60  # keep a minute for a case
        res["aoti_export"] = prepare_aoti(root, work, {**request, "options": {
            **base, **({"fp8": "fp8_weight_only"} if cpu else {})}}, left)
        e = res["aoti_export"]
        print(f"  AOTInductor export {e['status']} in {e['seconds']:.0f} s " + (
            json.dumps(e.get("seconds_by_package")) if e["status"] == "ok" else
            f"(exit {e['returncode']}, stages {e['stages']}) {e['reason'][-1500:]}"), flush=True)
        if on_case:
            on_case({**res, "cases": {}})
    if any(c.import_cache for c in cases.values()):
        from .coldstart import write_import_cache

        res["import_cache_build"] = write_import_cache(work)
        print(f"  import cache written: {res['import_cache_build']}", flush=True)
    res["cases"] = {}
    again = {k: c for k, c in cases.items() if c.aot_blocks != "save" and not (c.artifacts or "").startswith(
        ("save", "load"))}  # (a round deletes the artefact files the first one saved)
    for r in range(1, rounds + 1):
        spent = time.perf_counter() - start + res["snapshot_s"]

        def record(new: dict, r: int = r) -> None:
            res["cases"].update({round_name(k, r): v for k, v in new.items()})
            if on_case:
                on_case(res)

        record(run(root, cases if r == 1 else again, work, steps, budget_s - spent, height=s.height,
                   width=s.width // 2, options=base, on_case=record))
    return res


def targets(cases: dict) -> list[str]:
    """The issue's cold-start targets, read off the cases: warm <= 15 s and <= 0.5x stock; empty cache <= 30 s.
    A case run in several rounds counts with its median time to the first image."""
    runs: dict[str, list[float]] = {}
    for k, v in cases.items():
        if v.get("status") == "ok":
            runs.setdefault(base_case(k), []).append(v["first_image_wall_s"])
    wall = {k: statistics.median(v) for k, v in runs.items()}
    if "stock eager" not in wall:
        return []

    def said(name: str) -> str:
        n = len(runs[name])
        return f"{name} {wall[name]:.1f} s" + (f" (median of {n}: {min(runs[name]):.1f}-{max(runs[name]):.1f})"
                                               if n > 1 else "")

    warm = [k for k in wall if "empty cache" not in k and k != "stock eager"]
    out = []
    if warm:
        best = min(warm, key=wall.get)
        t, ratio = wall[best], wall[best] / wall["stock eager"]
        out.append(f"warm: {said(best)} vs stock {said('stock eager')[12:]} = {ratio:.2f}x "
                   f"(target <= 15 s and <= 0.5x: {'met' if t <= 15 and ratio <= 0.5 else 'NOT met'})")
    if empty := [k for k in wall if "empty cache" in k]:
        best = min(empty, key=wall.get)
        out.append(f"empty cache: {said(best)} (target <= 30 s: {'met' if wall[best] <= 30 else 'NOT met'})")
    return out
