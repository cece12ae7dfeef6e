"""Cold start: a fresh process to its first try-on image, phase by phase, case by case (one harness for the
toy model in notebook 03 and the full-size model in the GPU benchmark, whose cases are in ``coldstart_gpu``).

Each case is one fresh Python process with its own compile cache folder. It runs what a user runs, the slim
``configure.build_pipeline`` + ``pipeline.tryon`` or the stock ``loading.load_standard`` + ``tryon_standard``,
and reports phases that add up to its wall time to the first image:

    interpreter | imports (every import, wherever it happens: lazy ones inside loading count here) | cuda_init
    | weights (read, straight to the device) | quantize (FP8 on load; nothing for a pre-quantized folder)
    | artifacts (compile cache load) | configure (the rest of build_pipeline) | prepare | redux
    | compile (first transformer call beyond a steady one: tracing, cache lookups, kernel loads) | denoise
    | decode | other (what no phase holds)

Imports are timed at the import system's loader and taken out of the phase they happened in: nothing counts twice.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..import_cache import DEFAULT_FILE as IMPORT_CACHE_FILE  # in the work folder, written at "image build"
from .bytecode import bytecode_report

PHASES = ("interpreter", "imports", "cuda_init", "weights", "quantize", "artifacts", "configure", "prepare", "redux",
          "compile", "denoise", "decode")
FP8_FOLDER = "fp8-transformer-{}"  # in the work folder: the FP8 transformer of one mode (``prepare_fp8``)
_CHILD = ("import time; T = time.time(); import sys; from tryon_lab.experiments.coldstart import child; child(T)")
_AOTI_CHILD = ("import time; T = time.time(); import sys; from tryon_lab.experiments.coldstart_gpu import "
               "aoti_child; aoti_child(T)")


@dataclass
class Case:
    """One fresh process: stock, or slim with ``options`` (``PipelineOptions`` fields); the rest are levers."""

    stock: bool = False
    options: dict = field(default_factory=dict)
    artifacts: str | None = None  # "save" / "load", or "save:NAME" / "load:NAME" for one of several files
    fp8_weights: bool = False  # load the FP8 transformer saved before the cases (``prepare_fp8``)
    cuda_thread: bool = False  # the CUDA context and cuBLAS/cuDNN handles made on a thread, joined after the build
    cache: str = "empty"  # "empty": a new inductor folder; or the name of an earlier case whose folder it reuses
    aoti: bool = False  # the AOTInductor packages run by a torch-only process (``coldstart_gpu.aoti_child``)
    aot_blocks: str | None = None  # "save" / "load": regional compile as AOT-compiled blocks (``compile_aot``)
    import_cache: bool = False  # package map + transformers' import tables from a file written at image build
    leave_out: bool = False  # what the slim path imports but never calls marked absent (import_cache.leave_out)
    redux_process: bool = False  # Redux in a worker process, transformers left out here (redux_process.py)
    redux_fork: bool = False  # that worker forked from this process once torch is imported, not spawned
    early_reads: bool = False  # the weight reads started right after torch's import (configure.start_reads)


def _cuda_init() -> None:
    import torch

    if not torch.cuda.is_available():
        return
    torch.cuda.init()
    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()  # cuBLAS handle
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().item()  # cuDNN / flash attention handle


def _request_images(a: dict) -> tuple:
    """The (person, garment, mask) of the synthetic request at the run's size (each ``height`` x ``width``)."""
    from ..synthetic import make_sample

    s = make_sample(a["seed"], 0)
    size = (a["width"], a["height"]) if a.get("height") else None
    return tuple(im.resize(size) if size else im for im in (s.person, s.garment, s.mask))


def _request(a: dict):
    """The synthetic try-on request every case runs."""
    from ..pipeline import TryOnRequest

    return TryOnRequest(*_request_images(a), seed=a["seed"])


def _count_imports() -> dict:
    """Seconds this thread spends loading modules from now on (outermost loads; other threads' are not counted)."""
    import importlib._bootstrap as bootstrap
    import threading

    # per load in progress, outermost first: "children" (time in what it imports), "packages" (its top level)
    state, main = {"seconds": 0.0, "modules": {}, "self": {}, "entered": {}, "children": [], "packages": []}, threading.get_ident()
    load = bootstrap._find_and_load

    def timed_load(name, import_):
        if threading.get_ident() != main:
            return load(name, import_)
        state["children"].append(0.0)
        state["packages"].append(top := name.split(".")[0])
        start = time.perf_counter()
        try:
            return load(name, import_)
        finally:
            took = time.perf_counter() - start
            own = took - state["children"].pop()  # this module's own code, as -X importtime's "self"
            state["self"][name] = state["self"].get(name, 0.0) + own
            state["packages"].pop()
            if top not in state["packages"]:  # entering the package (e.g. scikit-learn from transformers)
                state["entered"][top] = state["entered"].get(top, 0.0) + took
            if state["children"]:
                state["children"][-1] += took
            else:  # an outermost load, by package: what a lever would have to keep out
                state["seconds"] += took
                state["modules"][top] = state["modules"].get(top, 0.0) + took

    bootstrap._find_and_load = timed_load
    return state


# the build's parts, as (module, name) where they are looked up when called: each call's wall and import seconds
BUILD_PARTS = (("configure", "load_slim"), ("configure", "apply_options"), ("loading", "load_fp8_component"),
               ("loading", "load_component"), ("loading", "load_redux"), ("loading", "ensure_embeddings"))


def _time_parts(imports: dict, aot: bool) -> dict:
    """Wrap the build's parts (``BUILD_PARTS``; ``apply_aot_blocks`` when ``aot``): each call adds its wall and import
    seconds to the dict returned, so the build's own work, part by part, is wall less imports."""
    import importlib
    times: dict = {}

    def wrap(name, fn):
        def timed(*args, **kwargs):
            start, imported = time.perf_counter(), imports["seconds"]
            try:
                return fn(*args, **kwargs)
            finally:
                t = times.setdefault(name, {"calls": 0, "wall_s": 0.0, "imports_s": 0.0})
                t.update(calls=t["calls"] + 1, wall_s=t["wall_s"] + time.perf_counter() - start,
                         imports_s=t["imports_s"] + imports["seconds"] - imported)
        return timed
    for module, name in (*BUILD_PARTS, *([("aot_blocks", "apply_aot_blocks")] if aot else [])):
        m = importlib.import_module(f"tryon_lab.{module}")
        setattr(m, name, wrap(f"{module}.{name}", getattr(m, name)))
    return times


def _split(marks: dict, rest: str, parts: dict[str, float]) -> None:
    """Move ``parts`` (seconds reported from inside) out of ``marks[rest]``, never below zero: phases add up to the
    wall (a part that holds a lazy import was already counted under "imports")."""
    for k, v in parts.items():
        marks[k] = min(max(0.0, v), marks[rest])
        marks[rest] -= marks[k]


def _laps(t: float, imports: dict, spawned: float):
    """The phase marks of a child and its ``lap(name)``: the time since the last lap goes to ``name``, less the
    imports inside it (those go to "imports")."""
    marks: dict = {"interpreter": t - spawned, "imports": 0.0}
    clock = {"at": time.perf_counter(), "imported": 0.0}

    def lap(name: str) -> None:
        now, inside = time.perf_counter(), imports["seconds"] - clock["imported"]
        marks[name] = marks.get(name, 0.0) + max(0.0, now - clock["at"] - inside)
        marks["imports"] += inside
        clock.update(at=now, imported=imports["seconds"])

    return marks, lap


def child(t: float) -> None:
    """One fresh process (``_CHILD``): every phase timed; prints one ``COLD {json}`` line."""
    imports = _count_imports()
    a = json.loads(sys.argv[1])
    marks, lap = _laps(t, imports, a["spawned"])
    from .. import import_cache  # first, as a serving script would: before anything imports diffusers

    if a.get("leave_out"):  # with Redux in its own process, transformers too
        marks["left_out"] = import_cache.leave_out(import_cache.WITHOUT_TRANSFORMERS if a["redux_process"]
                                                   else import_cache.SERVING_LEFT_OUT)
    if a.get("import_cache"):
        marks["import_cache"] = import_cache.use(a["import_cache"])

    def start_redux(fork: bool):  # the worker keeps transformers and leaves out the rest
        from ..redux_process import RemoteRedux

        return RemoteRedux(a["model_dir"], a["options"]["device"], a["options"]["dtype"],
                           import_cache.SERVING_LEFT_OUT * a["leave_out"], a.get("import_cache"), fork)

    # spawned now, its imports, load and CUDA context overlap this process's; forked once torch is imported
    redux = start_redux(False) if a["redux_process"] and not a["redux_fork"] else None
    import threading

    import torch
    if a["redux_process"] and a["redux_fork"]:
        redux = start_redux(True)
    reads = None
    if a.get("early_reads"):  # a serving script's first call once torch is in: the reads run beside the imports
        from ..configure import PipelineOptions, start_reads

        reads = start_reads(a["model_dir"], PipelineOptions(**a["options"]))
    lap("imports")
    if thread := (threading.Thread(target=_cuda_init) if a["cuda_thread"] else None):
        thread.start()
    else:
        _cuda_init()
        lap("cuda_init")
    if a["stock"]:
        from ..loading import load_standard
        from ..pipeline import TryOnSettings, tryon_standard
    else:
        from ..configure import PipelineOptions, build_pipeline
        from ..pipeline import TryOnSettings, tryon
    from ..timers import sync
    lap("imports")
    device = a["options"].get("device", "cpu")
    if a["stock"]:
        pipe = load_standard(a["model_dir"], getattr(torch, a["options"].get("dtype", "float32")), device)
    else:
        marks["build_parts"] = _time_parts(imports, a["options"].get("compile_aot") is not None)
        pipe = build_pipeline(a["model_dir"], PipelineOptions(**a["options"]), redux, reads)
    if thread is not None:  # joined after the build, whose lazy imports and reads hide it (H200, 12-02: joined
        lap("configure")  # before the build, the main thread still waited 0.48-0.61 s for it)
        thread.join()
        lap("cuda_init")  # only what the build did not hide
    sync(device)
    lap("configure")  # the build without its imports, split by what the loader and the configure step report
    marks["weights_by_component"] = {r["component"]: {k: r[k] for k in ("load_s", "read_s") if k in r}
                                      for r in pipe.load_report}  # what the build waited for, and the read itself
    _split(marks, "configure", {"weights": sum(r["load_s"] for r in pipe.load_report),
                                **{k: getattr(pipe, "build_report", {}).get("seconds", {}).get(k, 0.0)
                                   for k in ("quantize", "artifacts")}})
    calls: list[float] = []
    tr = pipe.fill.transformer  # its first call holds compiling (tracing, cache lookups, kernel loads)
    tr.register_forward_pre_hook(lambda *_: (sync(device), calls.append(-time.perf_counter()))[0])  # both images
    tr.register_forward_hook(lambda *_: (sync(device), calls.append(time.perf_counter()))[0])
    settings = TryOnSettings(a["steps"], progress=False)
    req = _request(a)
    with torch.no_grad():
        result = tryon_standard(pipe, req, settings) if a["stock"] else tryon(pipe, req, settings)
    sync(device)
    lap("denoise")  # the first image without its imports, split by its own timings
    marks["to_first_image"] = time.time() - a["spawned"]
    ms = {"first_image": [calls[i] + calls[i + 1] for i in range(0, len(calls) - 1, 2)]}
    per_call, calls[:] = ms["first_image"], []  # the steady image's calls too: where a first image's extra goes
    steady = statistics.median(per_call[1:]) if len(per_call) > 1 else 0.0
    tm = result.timings
    _split(marks, "denoise", {"compile": max(0.0, per_call[0] - steady) if per_call else 0.0,
                              **{k: tm.get(k, 0.0) for k in ("prepare", "redux", "decode")}})
    marks["first_image_phases"] = {k: v for k, v in tm.items() if k != "total"}
    start = time.perf_counter()
    with torch.no_grad():
        tryon_standard(pipe, req, settings) if a["stock"] else tryon(pipe, req, settings)
    sync(device)
    marks["steady_image"] = time.perf_counter() - start
    ms["steady_image"] = [calls[i] + calls[i + 1] for i in range(0, len(calls) - 1, 2)]
    marks["transformer_calls_ms"] = {k: [round(1e3 * c, 2) for c in v] for k, v in ms.items()}  # hooks synced
    from torch._dynamo.utils import counters

    marks["dynamo_graphs"] = counters["stats"]["unique_graphs"]  # none when everything compiled came from disk
    if getattr(pipe, "aot_blocks", None):
        from ..aot_blocks import report

        marks["aot_blocks"] = report(pipe.aot_blocks)
    if a.get("import_cache"):
        marks["import_cache"].update(import_cache.report())
    if redux is not None:  # the worker's own phases, and what this process waited for it
        marks["redux_process"] = {"worker": redux.ready, "waited_s": redux.waited, "warm_up_s": redux.warm_up_s}
    marks["imports_by_package"] = _by_package(imports)
    marks["imports_slowest_modules"] = _largest(imports["self"])  # each module's own code, not its imports
    marks["imports_by_package_entered"] = _largest(imports["entered"])  # a package with all it pulled in
    marks["imports_total_s"] = imports["seconds"]  # the first image's imports and those after it
    marks["bytecode"] = bytecode_report(t)
    marks["cache_counters"] = {f"{g}.{k}": v for g in ("inductor", "aot_autograd") for k, v in counters[g].items()
                               if "cache" in k or "hit" in k or "miss" in k}
    try:  # where dynamo/inductor spent the compile phase (function -> seconds)
        from torch._dynamo.utils import compilation_time_metrics

        marks["compile_metrics"] = {k: round(sum(v), 3) for k, v in compilation_time_metrics.items() if sum(v) > 0.05}
    except ImportError:
        pass
    if a.get("artifacts_out"):
        from ..compiling import save_compile_artifacts

        marks["saved"] = save_compile_artifacts(a["artifacts_out"])
    print("COLD " + json.dumps(marks, default=str), flush=True)


def _largest(seconds: dict, n: int = 25) -> dict:
    """The ``n`` largest entries of ``seconds`` (rounded to ms), largest first."""
    return dict(sorted(((k, round(v, 3)) for k, v in seconds.items()), key=lambda kv: -kv[1])[:n])


def _by_package(imports: dict) -> dict:
    return {k: v for k, v in _largest(imports["modules"]).items() if v > 0.05}


def run_case(name: str, case: Case, model_dir: Path, work: Path, base: dict, timeout: float) -> dict:
    """One fresh process for ``case``; its phases, "other" (wall to the first image minus the phases) and status."""
    how, _, which = (case.artifacts or "").partition(":")
    options = {**base.get("options", {}), **case.options}
    art, fp8 = work / f"artifacts{'-' + which if which else ''}.bin", work / FP8_FOLDER.format(options.get("fp8"))
    if case.fp8_weights and not fp8.exists():
        return {"status": "skipped", "reason": f"no saved {fp8.name} (prepare_fp8 did not run for its mode)"}
    cache = work / ("inductor-" + (name if case.cache == "empty" else case.cache).replace(" ", "_").replace(",", ""))
    if case.cache == "empty":
        shutil.rmtree(cache, ignore_errors=True)
    if how == "load" and art.exists():  # a backend with nothing to cache (CPU aot_eager) saves none
        options["compile_artifacts"] = str(art)
    if case.fp8_weights:
        options["fp8_weights"] = str(fp8)
    if case.aot_blocks:  # the folder a deployment would ship beside the weights
        blocks = work / (f"aot-blocks-{options.get('fp8', 'none')}-{options.get('attention', 'native')}"  # per FP8
                         + "-sigmoid-gelu" * bool(options.get("sigmoid_gelu")))  # mode, kernel and GELU
        if case.aot_blocks == "save":
            shutil.rmtree(blocks, ignore_errors=True)
        elif not any(blocks.glob("*.bin")):
            return {"status": "skipped", "reason": "no AOT-compiled blocks (no earlier case saved them)"}
        options.update(compile_aot=str(blocks), compile_backend="inductor")
    if case.aoti and not (work / "aoti" / "transformer_constants.safetensors").exists():
        return {"status": "skipped", "reason": "no AOTInductor packages (prepare_aoti did not run or failed)"}
    args = {**base, "model_dir": str(model_dir), "stock": case.stock, "options": options,
            "cuda_thread": case.cuda_thread, "aoti_dir": str(work / "aoti"),
            "artifacts_out": str(art) if how == "save" else None, "spawned": time.time(),
            "import_cache": str(work / IMPORT_CACHE_FILE) if case.import_cache else None, "leave_out": case.leave_out,
            "redux_process": case.redux_process, "redux_fork": case.redux_fork, "early_reads": case.early_reads}
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    start = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", _AOTI_CHILD if case.aoti else _CHILD, json.dumps(args)],
                           capture_output=True, text=True, env=env, timeout=timeout,
                           cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"did not finish within the {timeout:.0f} s left in the budget"}
    wall = time.perf_counter() - start
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("COLD ")]
    if p.returncode or not lines:
        return {"status": "failed", "reason": p.stderr[-1500:]}
    c = json.loads(lines[-1][5:])
    c.update(status="ok", wall_s=wall, first_image_wall_s=c["to_first_image"],
             other=max(0.0, c["to_first_image"] - sum(c.get(k, 0.0) for k in PHASES)))
    return c


def write_import_cache(work: Path) -> dict:
    """The cases' import cache, written as an image build would (``python -m tryon_lab.import_cache PATH``)."""
    p = subprocess.run([sys.executable, "-m", "tryon_lab.import_cache", str(Path(work) / IMPORT_CACHE_FILE)],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    if p.returncode or not p.stdout.strip():
        return {"status": "failed", "reason": p.stderr[-1500:]}
    return {"status": "ok", **json.loads(p.stdout.strip().splitlines()[-1])}


def run(model_dir: str | Path, cases: dict[str, Case], work: str | Path, steps: int, budget_s: float = 540,
        seed: int = 0, height: int | None = None, width: int | None = None, options: dict | None = None,
        on_case=None) -> dict:
    """Every case in order (savers before loaders) in a fresh process; ``options`` are the base
    ``PipelineOptions`` fields of every case (device, dtype, backend). A case that would not fit the budget is
    skipped with the reason; ``on_case(results)`` after each (write as you go)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("artifacts*.bin"):
        old.unlink()
    base = {"steps": steps, "seed": seed, "height": height, "width": width, "options": dict(options or {})}
    start, res = time.perf_counter(), {}
    for name, case in cases.items():
        left = budget_s - (time.perf_counter() - start)
        if left < 30:
            res[name] = {"status": "skipped", "reason": "no time left in the budget"}
            continue
        res[name] = c = run_case(name, case, Path(model_dir), work, base, left)
        print(f"  cold {name}: " + (f"first image after {c['first_image_wall_s']:.1f} s" if c["status"] == "ok"
                                     else f"{c['status']} {c.get('reason', '')[-300:]}"), flush=True)
        if on_case:
            on_case(res)
    return res


def phase_rows(cases: dict) -> list[dict]:
    """One row per case: every phase in seconds, "other", and the wall time to the first image."""
    rows = []
    for name, c in cases.items():
        if c.get("status") != "ok":
            rows.append({"case": name, "status": c.get("status"), "note": c.get("reason", "")[:80]})
            continue
        rows.append({"case": name, **{p: c.get(p, 0.0) for p in PHASES}, "other": c["other"],
                     "to first image": c["first_image_wall_s"], "steady image": c["steady_image"],
                     # modules compiled from source inside "imports" (no bytecode cache beside them)
                     "modules compiled": c.get("bytecode", {}).get("compiled_here", "")})
    return rows


def variant_cases(options: dict) -> dict[str, Case]:
    """Notebook 03's cases for one variant: eager; the variant with an empty compile cache (saves artefacts);
    with those artefacts in another empty folder; with the first run's local cache folder kept."""
    return {"eager": Case(),
            "cold cache": Case(options=options, artifacts="save"),
            "warm artefacts": Case(options=options, artifacts="load"),
            "warm local cache": Case(options=options, cache="cold cache")}
