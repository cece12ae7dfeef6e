"""Probe: what starting the saved FP8 transformer's read at torch's import saves a fresh serving process.

The best serving process (run 20, H200) started its 15.2 GB FP8 read on a worker thread inside ``build_pipeline``,
after torch, the CUDA context and most imports, and waited 1.44 s of the read's 1.9 s. ``configure.start_reads``
starts the read right after ``import torch``. The full cold-start case needs about four minutes of setup (the
full-size snapshot, the FP8 save, the bytecode build); this probe isolates the lever on the same host: one
safetensors file of the FP8 transformer's size, then fresh processes that import what the serving process imports
(diffusers' FLUX classes, torchao, transformers' SigLIP) and read the file onto the device with ``bulk_read``,
the read started either after the imports (``after``: the CUDA context first, as the serving child makes it) or
right after torch's import (``early``: the reader's thread makes the context), alternating, ``--rounds`` each.
Each process reports, in seconds since it started: torch imported, imports done, read done; and the read's own
time. What counts is the wait after the imports (read done - imports done) and whether the imports slow down.

    python scripts/probe_early_reads.py --gb 15.2 --rounds 3 --bytecode --out results.json   # the H200 host
    python scripts/probe_early_reads.py --gb 0.05 --rounds 1 --device cpu                   # the CPU smoke run
    python scripts/probe_early_reads.py --modes after,early,early-chunk256,early-switch0.5 --leave-out --bytecode

Beside the imports run 24's read took 2.4-2.7 s against 1.0-1.2 s alone: its threads wait for the GIL behind the
importing thread at every 64 MiB chunk. ``-chunkN`` (fewer, larger reads in flight) and ``-switchX`` (a shorter GIL
switch interval) are the two knobs to measure against that; ``--leave-out`` imports what a serving process does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# One fresh process: only the standard library before the clock starts; one ``EARLY {json}`` line at the end.
CHILD = """
import time; T = time.time(); import json, sys
a = json.loads(sys.argv[1])
if a["leave_out"]:  # what a serving process leaves out (peft, scipy, sklearn, sentencepiece), as it does first
    from tryon_lab import import_cache; import_cache.leave_out(import_cache.SERVING_LEFT_OUT)
import torch
marks = {"torch": time.time() - T}
from tryon_lab.bulk_read import prefetch
switch = a["switch_ms"] or None  # the GIL handed over sooner while the read runs (bulk_read.SWITCH_INTERVAL)
read = prefetch([a["path"]], a["device"], "fp8-read", a["chunk_mib"], switch) if a["mode"] == "early" else None
if read is None and a["device"] == "cuda":
    torch.cuda.init(); torch.ones(1, device="cuda").sum().item()  # the serving child's CUDA context, made first
marks["cuda"] = time.time() - T
import diffusers, torchao  # what the serving process imports: the FLUX classes, FP8, SigLIP
from diffusers import AutoencoderKL, FluxPriorReduxPipeline, FluxTransformer2DModel
from torchao.quantization import quantize_
from transformers import SiglipVisionModel
marks["imports"] = time.time() - T
read = read or prefetch([a["path"]], a["device"], "fp8-read", a["chunk_mib"], switch)
got = read.result()
if a["device"] == "cuda":
    torch.cuda.synchronize()
marks["read_done"] = time.time() - T
marks["read_s"] = got["read_s"]
marks["bytes"] = sum(t.numel() * t.element_size() for t in got["tensors"].values())
print("EARLY " + json.dumps(marks), flush=True)
"""


def write_file(path: Path, gb: float, pieces: int = 16) -> int:
    """One safetensors file of ``gb`` GB in ``pieces`` uint8 tensors (what bulk_read reads, whatever the bytes; on
    the CPU each tensor is one read, so ``pieces`` sets how often a reader takes the GIL back)."""
    import torch
    from safetensors.torch import save_file

    n = int(gb * 1e9) // pieces
    save_file({f"t{i:02d}": torch.empty(n, dtype=torch.uint8) for i in range(pieces)}, str(path))
    return path.stat().st_size


def parse_mode(mode: str) -> dict:
    """``after`` or ``early``, with optional ``-chunkN`` (MiB a read in flight; 64 by default) and ``-switchX``
    (the interpreter's GIL switch interval in ms; Python's 5 by default), e.g. ``early-chunk256-switch0.5``."""
    base, *mods = mode.split("-")
    out = {"mode": base, "chunk_mib": 64, "switch_ms": 0.0}
    for m in mods:
        if m.startswith("chunk"):
            out["chunk_mib"] = int(m[5:])
        elif m.startswith("switch"):
            out["switch_ms"] = float(m[6:])
        else:
            raise ValueError(f"mode {mode!r}: {m!r} is neither chunkN nor switchX")
    if base not in ("after", "early"):
        raise ValueError(f"mode {mode!r} starts with neither 'after' nor 'early'")
    return out


def run_child(path: Path, mode: str, device: str, leave_out: bool = False) -> dict:
    args = {"path": str(path), "device": device, "leave_out": leave_out, **parse_mode(mode)}
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("EARLY ")]
    if p.returncode or not lines:
        return {"status": "failed", "returncode": p.returncode, "stderr": p.stderr[-2000:]}
    m = json.loads(lines[-1][6:])
    return {**m, "status": "ok", "import_s": m["imports"] - m["cuda"], "waited_s": max(0.0, m["read_done"] - m["imports"])}


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per mode: the medians of the processes' marks, and their ranges."""
    out = {}
    for mode, rows in runs.items():
        ok = [r for r in rows if r["status"] == "ok"]
        out[mode] = {k: {"median": statistics.median(r[k] for r in ok), "min": min(r[k] for r in ok),
                         "max": max(r[k] for r in ok)}
                     for k in ("torch", "cuda", "imports", "import_s", "read_done", "read_s", "waited_s")} if ok else {}
    if out.get("early") and out.get("after"):  # the lever itself, at the reader's defaults
        out["read_done_saved_s"] = out["after"]["read_done"]["median"] - out["early"]["read_done"]["median"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=15.2, help="the file's size (the FP8 transformer: 15.2 GB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pieces", type=int, default=16, help="tensors in the file (on the CPU: one read each)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bytecode", action="store_true", help="write the imported packages' bytecode caches first")
    ap.add_argument("--work", default=None, help="local disk for the file (default: a temporary folder)")
    ap.add_argument("--leave-out", action="store_true", help="leave out what a serving process leaves out")
    ap.add_argument("--modes", default="after,early", help="comma-separated: after|early[-chunkN][-switchX] "
                    "(MiB a read in flight, the GIL switch interval in ms), run in turn each round")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from tryon_lab.provenance import report_probe

    res: dict = {"what": "fresh processes: imports + the FP8-sized read onto the device, read started after the "
                         "imports or at torch's import", "gb": a.gb, "pieces": a.pieces, "device": a.device,
                         "leave_out": a.leave_out}
    if a.bytecode:
        from tryon_lab.experiments.bytecode import compile_bytecode

        res["bytecode_build"] = compile_bytecode(("diffusers", "transformers", "torchao", "huggingface_hub",
                                                  "safetensors", "accelerate", "tryon_lab"))
        print(f"bytecode written in {res['bytecode_build']['seconds']:.0f} s", flush=True)
    modes = a.modes.split(",")
    try:
        [parse_mode(m) for m in modes]  # a typo fails before 15 GB are written
    except ValueError as e:
        ap.error(str(e))
    with tempfile.TemporaryDirectory(dir=a.work) as work:
        path = Path(work) / "fp8-sized.safetensors"
        start = time.perf_counter()
        res["bytes"] = write_file(path, a.gb, a.pieces)
        res["write_s"] = time.perf_counter() - start
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(a.rounds):
            for mode in modes:
                runs[mode].append(run_child(path, mode, a.device, a.leave_out))
                print(f"round {r + 1} {mode}: {json.dumps(runs[mode][-1])[:400]}", flush=True)
        res["runs"], res["summary"] = runs, summarize(runs)
    report_probe(res, a.device, a.out)
    return 0 if all(r["status"] == "ok" for rows in runs.values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
