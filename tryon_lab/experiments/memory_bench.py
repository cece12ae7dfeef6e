"""GPU memory benchmark: the VRAM budget table, each memory mode's peak and time, capped runs, the hot path.

Full-size FLUX Fill + Redux shapes (``fullsize.slim_pipeline(redux=True)``, random bf16 weights), one try-on of
a 768x1024 person (a 1536x1024 diptych: 6144 image + 1241 text/Redux tokens), ``steps`` steps. Every part runs
in its own process (a clean CUDA context, clean peak counters, its own allocator setting):

    budget      component bytes, one request's activations, VAE decode plain/tiled, a logo batch of 1..n,
                the bf16 / bf16+vae-tiling / fp8 / fp8+vae-tiling modes, the hot path (``loops.hot_path_report``)
    MODE        one memory mode (e.g. bf16+model-offload), applied with ``configure.apply_options``
    expandable  the default mode under PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    cap:GB      the planner's choice for a GB limit (torch.cuda.set_per_process_memory_fraction), one try-on

Peaks are the caching allocator's peak *reserved* bytes (what a per-process cap limits), with peak allocated
beside them. ``run`` merges every part into the raw file, writes the planner's table (``budget_table``) and a
stamped entry in the results file after every part, so a timeout loses only the part that ran out.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import logos, memory, metrics, pipeline
from ..configure import PipelineOptions, apply_options, check_options
from ..provenance import REPO_ROOT, stamp, write_results
from ..quant import weight_bytes
from ..timers import measure, peak_memory_bytes
from . import fullsize, loops

GB = 1e9
DEFAULT_PARTS = ("budget,expandable,bf16+model-offload,bf16+group-offload,bf16+sequential-offload,"
                 "fp8+model-offload,cap:24,cap:16")


@dataclass
class Bench:
    """What every part measures on (travels to each child process as JSON)."""

    steps: int = 8
    width: int = 768  # person size; the diptych is twice as wide
    height: int = 1024
    logos: int = 5
    logo_size: int = 256
    logo_steps: int = 4
    async_requests: int = 4
    tiny: bool = False  # the tiny model on the CPU: the code paths in seconds, no numbers
    config: str = str(fullsize.CONFIG_FILE)
    budget: str = str(memory.BUDGET_FILE)  # the planner's table (read by cap:GB parts)


# ------------------------------------------------------------------------------------------- building
def build(b: Bench, device: str):
    """The slim pipeline with random weights (Fill + Redux + cached embeddings) and each component's bytes."""
    s = fullsize.shape(b.tiny, config=b.config, device=device)
    pipe = fullsize.slim_pipeline(s, redux=True)
    sizes = {"transformer": weight_bytes(pipe.fill.transformer), "vae": weight_bytes(pipe.fill.vae),
             "redux image encoder": weight_bytes(pipe.redux.image_encoder),
             "redux embedder": weight_bytes(pipe.redux.image_embedder),
             "cached text embeddings": sum(t.numel() * t.element_size()
                                           for t in (pipe.prompt_embeds, pipe.pooled_prompt_embeds))}
    return pipe, sizes


def options(pipe, **changes) -> PipelineOptions:
    o = PipelineOptions(device=pipe.device, dtype=str(pipe.dtype).removeprefix("torch."), **changes)
    check_options(o)
    return o


def allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def clear() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peaks(device: str) -> dict:
    """Peak reserved (what a cap limits; CPU: peak RSS) and peak allocated bytes since the last ``measure``."""
    reserved = peak_memory_bytes(device, reserved=True)
    return {"peak_bytes": reserved, "peak_allocated_bytes": peak_memory_bytes(device)}


def request(b: Bench, seed: int = 0) -> pipeline.TryOnRequest:
    rng = np.random.default_rng(seed)
    w, h = b.width, b.height
    person = Image.fromarray(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
    garment = Image.fromarray(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
    mask = np.zeros((h, w), np.uint8)
    mask[h // 5: 4 * h // 5, w // 6: 5 * w // 6] = 255
    return pipeline.TryOnRequest(person, garment, Image.fromarray(mask, "L"), seed=seed)


def timed_image(pipe, b: Bench, seed: int = 0) -> dict:
    """One try-on after a 1-step warm-up: seconds, stage times, peaks, recoveries (``result``: the TryOnResult)."""
    settings = pipeline.TryOnSettings(steps=b.steps, progress=False)
    pipeline.tryon(pipe, request(b, seed), pipeline.TryOnSettings(steps=1, progress=False))
    clear()
    with measure(pipe.device) as m:
        out = pipeline.tryon(pipe, request(b, seed), settings)
    return {"s_per_image": m["seconds"], "ms_per_step": 1e3 * out.timings["denoise"] / settings.steps,
            **peaks(pipe.device), "timings": out.timings, "recoveries": out.recoveries, "ok": True, "result": out}


def strip_result(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "result"}


# ---------------------------------------------------------------------------------------------- parts
def part_budget(b: Bench, device: str) -> dict:
    pipe, sizes = build(b, device)
    res = {"components": {k: {"bytes": v} for k, v in sizes.items()}, "modes": {}}
    resident = allocated()
    base = timed_image(pipe, b)  # one request's activations (denoise + decode)
    res["modes"]["bf16"] = strip_result(base)
    res["components"]["activations, one request"] = {"bytes": base["peak_allocated_bytes"] - resident}
    out = base["result"]
    w, h = pipeline.prepare([request(b)])[0].diptych.size
    lat = out.latents.to(device, pipe.dtype)
    decoded = {}
    for tiled in (False, True):  # the decode alone, plain and tiled
        pipe.fill.vae.enable_tiling() if tiled else pipe.fill.vae.disable_tiling()
        clear()
        with measure(device) as m:
            decoded[tiled] = pipeline.decode(pipe.fill, lat, h, w)[0]
        res["components"]["vae decode, tiled" if tiled else "vae decode"] = {"bytes": m["memory_bytes"]}
    res["vae_tiling_psnr_db"] = metrics.psnr(np.asarray(decoded[True]), np.asarray(decoded[False]))
    res["modes"]["bf16+vae-tiling"] = strip_result(timed_image(pipe, b))
    pipe.fill.vae.disable_tiling()
    res.update(logo_batches(pipe, b, out.images[0]))
    res["components"]["logo crops, per logo"] = {"bytes": res.pop("per_logo_bytes"), "size_px_per_half": b.logo_size}
    res["hot_path"] = loops.hot_path_report(pipe, request(b), b.steps, b.async_requests)
    # FP8 in place (bf16 weights freed), then its two modes
    before = allocated()
    if device == "cuda":
        apply_options(pipe, options(pipe, memory="fp8"))
    clear()
    res["components"]["transformer, fp8"] = {"bytes": sizes["transformer"] + allocated() - before,
                                             "weight_bytes": weight_bytes(pipe.fill.transformer)}
    resident_fp8 = allocated()
    for name, tile in (("fp8", False), ("fp8+vae-tiling", True)):
        pipe.fill.vae.enable_tiling() if tile else pipe.fill.vae.disable_tiling()
        r = timed_image(pipe, b) if device == "cuda" else {"ok": False, "error": "FP8 needs CUDA"}
        if r.get("ok"):
            r["latent_rel_l2_vs_bf16"] = metrics.rel_l2(r["result"].latents, base["result"].latents)
        res["modes"][name] = strip_result(r)
    res["logo_resident_bytes"] = {"bf16": resident, "bf16+vae-tiling": resident, "fp8": resident_fp8,
                                  "fp8+vae-tiling": resident_fp8}
    return res


def logo_batches(pipe, b: Bench, tryon_image) -> dict:
    """The logo pass (batched) for 1..``b.logos`` logos: bytes and seconds per batch, the fitted bytes per logo."""
    side = b.width // 8  # logo boxes on the garment area, rows of five
    corners = [(int(b.width * (0.1 + 0.16 * (i % 5))), int(b.height * (0.3 + 0.12 * (i // 5)))) for i in range(b.logos)]
    boxes = [(x, y, x + side, y + side) for x, y in corners]
    settings = pipeline.TryOnSettings(steps=b.logo_steps, progress=False)
    per_batch = {}
    for n in range(1, b.logos + 1):
        matches = logos.known_matches(boxes[:n], boxes[:n])
        clear()
        with measure(pipe.device) as m:
            logos.logo_pass(pipe, tryon_image, request(b).garment, matches, settings, batched=True, size=b.logo_size)
        per_batch[n] = {"bytes": m["memory_bytes"], "seconds": m["seconds"]}
    ns = sorted(per_batch)
    slope = float(np.polyfit(ns, [per_batch[n]["bytes"] for n in ns], 1)[0]) if len(ns) > 1 else per_batch[1]["bytes"]
    return {"logo_batches": per_batch, "per_logo_bytes": slope}


def part_mode(b: Bench, device: str, name: str) -> dict:
    pipe, _ = build(b, device)
    o = options(pipe, memory=name)
    if memory.MemoryMode.parse(name).offload != "none":  # offload modes start from weights in CPU memory
        pipe.fill.to("cpu")
        clear()
    apply_options(pipe, o)
    return {"modes": {name: strip_result(timed_image(pipe, b))}}


def part_expandable(b: Bench, device: str) -> dict:
    pipe, _ = build(b, device)
    return {"expandable_segments": strip_result(timed_image(pipe, b))}


def part_cap(b: Bench, device: str, gb: float) -> dict:
    """The planner's choice for ``gb`` from the table so far, then one full try-on under that cap."""
    plan = memory.plan_for_limit(int(gb * GB), memory.load_budget(b.budget), logos=b.logos)
    pipe, _ = build(b, device)
    o = options(pipe, memory=plan.mode.name)
    pipe.fill.to("cpu")  # built on the GPU for speed; the capped run starts from CPU memory
    pipe.redux.to("cpu")
    pipe.prompt_embeds, pipe.pooled_prompt_embeds = pipe.prompt_embeds.cpu(), pipe.pooled_prompt_embeds.cpu()
    clear()
    torch.cuda.set_per_process_memory_fraction(gb * GB / torch.cuda.get_device_properties(0).total_memory)
    apply_options(pipe, o)
    r = timed_image(pipe, b)
    return {"caps": {f"{gb:g} GB": {"mode": plan.mode.name, "logo_batch": plan.logo_batch, "reasons": plan.reasons,
                                    **strip_result(r), "completed": True}}}


@torch.no_grad()  # inference only; restores the caller's grad mode on return
def run_part(part: str, b: Bench) -> dict:
    """One part in this process; an error is recorded (in the part's place), never raised."""
    device = "cuda" if torch.cuda.is_available() and not b.tiny else "cpu"
    try:
        if part == "budget":
            return part_budget(b, device)
        if part == "expandable":
            return part_expandable(b, device)
        if part.startswith("cap:"):
            return part_cap(b, device, float(part[4:]))
        return part_mode(b, device, part)
    except Exception as e:  # recorded, not lost: the parent keeps every other part
        return {**_failed(part, f"{type(e).__name__}: {e}"), "traceback": traceback.format_exc()[-3000:]}


def _failed(part: str, error: str) -> dict:
    if part.startswith("cap:"):
        return {"caps": {f"{float(part[4:]):g} GB": {"completed": False, "error": error}}, "error": error}
    if part not in ("budget", "expandable"):
        return {"modes": {part: {"ok": False, "error": error}}, "error": error}
    return {"error": error}


# ----------------------------------------------------------------------------------------------- parent
def merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v


def budget_table(res: dict) -> dict:
    """The planner's table from everything measured: modes (peak, time), logo resident and per-logo bytes."""
    keys = ("peak_bytes", "peak_allocated_bytes", "s_per_image", "ms_per_step", "ok", "error", "stamp")
    modes = {n: {k: m.get(k) for k in keys if m.get(k) is not None} for n, m in res.get("modes", {}).items()}
    per_logo = res.get("components", {}).get("logo crops, per logo", {}).get("bytes")
    return {"components": res.get("components", {}), "modes": modes,
            "logo": {"per_logo_bytes": per_logo, "resident_bytes": res.get("logo_resident_bytes", {})},
            "request": res.get("request"), "stamp": res.get("stamp")}


def merge_budget(old: dict, new: dict) -> dict:
    """``new`` (this run's table) over ``old`` (the table on disk): modes, components and logo bytes not measured
    again are kept, each mode carrying the stamp of the run that measured it, so a partial run loses nothing."""
    old_stamp = old.get("stamp")
    modes = {n: {**m, "stamp": m.get("stamp", old_stamp)} for n, m in (old.get("modes") or {}).items()}
    modes.update(new.get("modes") or {})
    logo_old, logo_new = old.get("logo") or {}, new.get("logo") or {}
    per_logo = logo_new.get("per_logo_bytes")
    return {**old, **new, "modes": modes,
            "components": {**(old.get("components") or {}), **(new.get("components") or {})},
            "logo": {"per_logo_bytes": per_logo if per_logo is not None else logo_old.get("per_logo_bytes"),
                     "resident_bytes": {**(logo_old.get("resident_bytes") or {}),
                                        **(logo_new.get("resident_bytes") or {})}}}


def _read_table(path: Path) -> dict:
    try:
        table = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        print(f"{path} is not valid JSON; it is replaced by this run's table", file=sys.stderr)
        return {}
    return table if isinstance(table, dict) else {}


def report(res: dict) -> str:
    from ..plots import markdown_table

    gib = lambda b: None if b is None else round(b / 2**30, 2)  # noqa: E731
    lines = [f"# GPU memory: budget, modes, caps, hot path\n\n{res.get('model')}; {res.get('request')}\n"]
    comp = [{"component": k, "GiB": gib(v.get("bytes"))} for k, v in res.get("components", {}).items()]
    lines += ["## Budget (measured)\n", markdown_table(comp)]
    modes = [{"mode": n, "ok": m.get("ok"), "peak reserved GiB": gib(m.get("peak_bytes")),
              "peak allocated GiB": gib(m.get("peak_allocated_bytes")), "s/image": m.get("s_per_image"),
              "ms/step": m.get("ms_per_step"), "error": (m.get("error") or "")[:80]}
             for n, m in sorted(res.get("modes", {}).items(), key=lambda nm: nm[1].get("s_per_image") or 1e9)]
    lines += ["## Modes (one try-on each)\n", markdown_table(modes)]
    caps = [{"cap": k, "mode": c.get("mode"), "completed": c.get("completed"), "peak reserved GiB": gib(c.get("peak_bytes")),
             "s/image": c.get("s_per_image"), "error": c.get("error", "")} for k, c in res.get("caps", {}).items()]
    if caps:
        lines += ["## Capped runs (set_per_process_memory_fraction)\n", markdown_table(caps)]
    if "hot_path" in res:
        lines += ["## Hot path\n", markdown_table([{"measure": k, "value": v} for k, v in res["hot_path"].items()])]
    if "expandable_segments" in res:
        e, d = res["expandable_segments"], res.get("modes", {}).get("bf16", {})
        lines += ["## expandable_segments\n", markdown_table([
            {"allocator": "default", "peak reserved GiB": gib(d.get("peak_bytes")), "s/image": d.get("s_per_image")},
            {"allocator": "expandable_segments:True", "peak reserved GiB": gib(e.get("peak_bytes")),
             "s/image": e.get("s_per_image")}])]
    return "\n".join(lines)


def run(parts: str, b: Bench, raw: str | Path, results: str | Path, part_timeout: float = 240.0) -> int:
    """Each part in a fresh process, merged into ``raw`` (kept across runs), the planner's table written to
    ``b.budget`` and an entry (``memory_gpu``, tiny: ``memory_tiny``) to ``results`` after every part.
    Returns the number of failed parts."""
    raw = Path(raw)
    raw.parent.mkdir(parents=True, exist_ok=True)
    Path(b.budget).parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(raw.read_text()) if raw.exists() else {}
    table = _read_table(Path(b.budget))  # the committed table: merged into, never overwritten by a partial run
    res.update(model="full-size FLUX.1 Fill + Redux shapes, random bf16 weights" if not b.tiny else "tiny CPU smoke config",
               request=f"person {b.width}x{b.height} (diptych {2 * b.width}x{b.height}), {b.steps} steps, "
                       f"logo crops {b.logo_size} px per half")
    failed = 0
    for part in parts.split(","):
        out = raw.with_name(f".part-{os.getpid()}.json")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        if part == "expandable":
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        cmd = [sys.executable, "-m", __name__, part, json.dumps(asdict(b)), str(out)]
        t0 = time.perf_counter()
        try:
            subprocess.run(cmd, env=env, check=False, timeout=part_timeout, cwd=REPO_ROOT)
            new = json.loads(out.read_text()) if out.exists() else _failed(part, f"{part}: child wrote nothing")
        except subprocess.TimeoutExpired:
            new = _failed(part, f"{part}: timed out after {part_timeout:.0f} s")
        out.unlink(missing_ok=True)
        if "error" in new:
            failed += 1
            print(new.pop("traceback", ""), file=sys.stderr)
            res.setdefault("errors", {})[part] = new.pop("error")
        merge(res, new)
        res.setdefault("part_seconds", {})[part] = time.perf_counter() - t0
        res["stamp"] = stamp("cpu" if b.tiny else "cuda")
        res.setdefault("part_stamps", {})[part] = res["stamp"]  # parts may come from several runs
        for name in new.get("modes") or {}:  # each mode says which run measured it
            res["modes"][name]["stamp"] = res["stamp"]
        raw.write_text(json.dumps(res, indent=2, default=str))  # after every part: nothing lost on a timeout
        Path(b.budget).write_text(json.dumps(merge_budget(table, budget_table(res)), indent=2, default=str))
        print(f"{part}: {time.perf_counter() - t0:.0f} s", flush=True)
    md = report(res)
    write_results(results, "memory_gpu" if not b.tiny else "memory_tiny", res, md)
    print(md)
    return failed


if __name__ == "__main__":  # a child of ``run``: part, Bench as JSON, output file
    _part, _bench, _out = sys.argv[1:4]
    Path(_out).write_text(json.dumps(run_part(_part, Bench(**json.loads(_bench))), indent=2, default=str))
