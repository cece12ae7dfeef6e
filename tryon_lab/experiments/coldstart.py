"""Cold start: a fresh process from start to its first image, phase by phase, with its own compile cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..compiling import save_compile_artifacts
from ..timers import measure
from .variants import parse_variant

# ------------------------------------------------------------------------------------- cold start
_CHILD = "import time; t0 = time.perf_counter(); import tryon_lab.experiments.coldstart as c; c._cold_child(t0)"


def _cold_child(t0: float) -> None:
    """Subprocess body of ``cold_start``: import, load, (artefacts), compile + first image, steady image."""
    from ..configure import PipelineOptions, build_pipeline
    from ..pipeline import TryOnRequest, TryOnSettings, tryon
    from ..synthetic import make_sample

    a = json.loads(sys.argv[1])
    out = {"import_s": time.perf_counter() - t0}
    v = parse_variant(a["variant"], a["backend"])
    options = PipelineOptions(device=a["device"], dtype=a["dtype"], fp8=v.quant, compile=v.compile,
                              compile_backend=v.backend, compile_artifacts=a.get("artifacts_in"))
    with measure(a["device"]) as m:
        pipe = build_pipeline(a["model_dir"], options)
    if "artifacts" in pipe.build_report:
        out["artifacts"] = pipe.build_report["artifacts"]
    out["load_s"] = m["seconds"]
    s = make_sample(a["seed"], 0)
    req, settings = TryOnRequest(s.person, s.garment, s.mask, seed=a["seed"]), TryOnSettings(a["steps"], progress=False)
    with measure(a["device"]) as m1:
        tryon(pipe, req, settings)
    with measure(a["device"]) as m2:
        tryon(pipe, req, settings)
    out.update(first_image_s=m1["seconds"], image_s=m2["seconds"], compile_s=max(0.0, m1["seconds"] - m2["seconds"]))
    if a.get("artifacts_out"):
        out["saved"] = save_compile_artifacts(a["artifacts_out"])
    print("COLD_START " + json.dumps(out), flush=True)


def cold_start(model_dir, variant: str, inductor_dir, dtype: str = "float32", device: str = "cpu", steps: int = 2,
               seed: int = 0, artifacts_in=None, artifacts_out=None, backend: str = "inductor") -> dict:
    """Time a fresh process from start to its first image (import, load, compile, image) with its own inductor cache."""
    args = dict(model_dir=str(model_dir), variant=variant, dtype=dtype, device=device, steps=steps, seed=seed,
                backend=backend, artifacts_in=str(artifacts_in) if artifacts_in else None,
                artifacts_out=str(artifacts_out) if artifacts_out else None)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir)}
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).resolve().parent.parent)
    wall = time.perf_counter() - start
    line = [x for x in p.stdout.splitlines() if x.startswith("COLD_START ")]
    if p.returncode or not line:
        raise RuntimeError(f"cold-start child failed ({p.returncode}): {p.stderr[-2000:]}")
    out = json.loads(line[-1].split(" ", 1)[1])
    out.update(variant=variant, wall_s=wall, startup_s=max(0.0, wall - out["import_s"] - out["load_s"]
                                                            - out["first_image_s"] - out["image_s"]))
    return out


def cold_start_breakdown(model_dir, variant: str, work_dir, **kw) -> list[dict]:
    """Fresh processes: eager; ``variant`` with a cold compile cache; with the artefacts the cold one saved
    (new inductor folder); and with the cold one's local inductor folder kept (what a warm machine has)."""
    work = Path(work_dir)
    for d in ("inductor-eager", "inductor-cold", "inductor-art"):
        shutil.rmtree(work / d, ignore_errors=True)
    art = work / "compile_artifacts.bin"
    art.unlink(missing_ok=True)
    rows = [{"case": "eager", **cold_start(model_dir, "eager", work / "inductor-eager", **kw)},
            {"case": "cold cache", **cold_start(model_dir, variant, work / "inductor-cold", artifacts_out=art, **kw)},
            {"case": "warm artefacts", **cold_start(model_dir, variant, work / "inductor-art", artifacts_in=art, **kw)},
            {"case": "warm local cache", **cold_start(model_dir, variant, work / "inductor-cold", **kw)}]
    return rows
