"""Probe: a FLUX single-stream block's two input GEMMs (fused Q/K/V, 3072 -> 9216, and the MLP's first layer,
3072 -> 12288) against one fused 3072 -> 21504 GEMM, as black-forest-labs' reference block computes them
(``linear1``), in bf16 and in the two FP8 forms the workbench runs, at the full-size shape.

Both GEMMs read the same normalised activation, so fusing them reads it once, quantizes it once (the per-row
dynamic form's amax pass over 4313 x 3072 values) and launches one wider GEMM. In the profile of the best variant
the FP8 GEMMs take 40.0 ms of an 88 ms step; 38 single-stream blocks each run this pair. Each form is timed with
CUDA events: the quantize of the activation, the two GEMMs and the fused one, and the fused output's error
against the two separate outputs (rel-L2; per-tensor FP8 shares one weight scale across the fused weight).

    python scripts/probe_single_block_gemm.py --out results.json    # the H200 shape
    python scripts/probe_single_block_gemm.py --tokens 64 --dim 64  # a small shape (the CPU runs the bf16 rows)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab.metrics import rel_l2  # noqa: E402
from tryon_lab.provenance import report_probe  # noqa: E402
from tryon_lab.timers import kernel_ms  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 (torchao's dynamic per-row form): x ~= x8 * scale, scale of shape (rows, 1), fp32."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 with a fixed (calibrated) scale: the static form's activation quantize."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def forms(x: torch.Tensor, w_qkv: torch.Tensor, w_mlp: torch.Tensor, dev: str) -> dict[str, dict]:
    """Per form: the activation quantize, the separate pair and the fused GEMM as callables, with their inputs."""
    w_fused = torch.cat([w_qkv, w_mlp])
    out = {"bf16": {"separate": (lambda a: (F.linear(a, w_qkv), F.linear(a, w_mlp)), (x,)),
                    "fused": (lambda a: F.linear(a, w_fused), (x,))}}
    if dev != "cuda":
        return out
    mm = torch._scaled_mm
    rows = {n: quantize_rows(w) for n, w in (("qkv", w_qkv), ("mlp", w_mlp), ("fused", w_fused))}
    x8, sx = quantize_rows(x)

    def row_gemm(name, a8, sa):
        w8, sw = rows[name]
        return mm(a8, w8.t(), scale_a=sa, scale_b=sw.t(), out_dtype=torch.bfloat16, use_fast_accum=True)

    out["fp8_row"] = {"quantize": (torch.compile(quantize_rows, dynamic=False), (x,)),
                      "separate": (lambda a8, sa: (row_gemm("qkv", a8, sa), row_gemm("mlp", a8, sa)), (x8, sx)),
                      "fused": (lambda a8, sa: row_gemm("fused", a8, sa), (x8, sx))}
    sx_t = (x.abs().amax().float() / FP8_MAX).reshape(())
    tens = {n: (quantize_tensor(w, s), s) for n, w in (("qkv", w_qkv), ("mlp", w_mlp), ("fused", w_fused))
            for s in [(w.abs().amax().float() / FP8_MAX).reshape(())]}
    xt8 = quantize_tensor(x, sx_t)

    def tensor_gemm(name, a8):
        w8, sw = tens[name]
        return mm(a8, w8.t(), scale_a=sx_t, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=True)

    out["fp8_tensor"] = {"quantize": (torch.compile(quantize_tensor, dynamic=False), (x, sx_t)),
                         "separate": (lambda a8: (tensor_gemm("qkv", a8), tensor_gemm("mlp", a8)), (xt8,)),
                         "fused": (lambda a8: tensor_gemm("fused", a8), (xt8,))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4313, help="image + text tokens (3072 + 1241 at 1024x768)")
    ap.add_argument("--dim", type=int, default=3072, help="the model width (Q/K/V: 3 x dim, MLP: 4 x dim)")
    ap.add_argument("--blocks", type=int, default=38, help="single-stream blocks a step runs (for the per-step sum)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", help="write the results here as JSON")
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(dev).manual_seed(0)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    x = torch.randn(a.tokens, a.dim, device=dev, generator=g)
    x[:, :8] *= 8  # a few large channels, as a block's normalised activations have
    w_qkv, w_mlp = (torch.randn(n * a.dim, a.dim, device=dev, generator=g) / a.dim**0.5 for n in (3, 4))
    x, w_qkv, w_mlp = (t.to(dtype) for t in (x, w_qkv, w_mlp))
    rows = {}
    for form, parts in forms(x, w_qkv, w_mlp, dev).items():
        row, outs = {}, {}
        for part, (fn, args) in parts.items():
            try:
                outs[part], _, row[f"{part}_ms"] = kernel_ms(fn, args, a.reps, dev)
            except Exception as e:  # noqa: BLE001 - a kernel that does not run here is a result, not the end
                row[f"{part}_failed"] = f"{type(e).__name__}: {str(e)[:400]}"
        if "separate" in outs and "fused" in outs:
            row["fused_rel_l2_vs_separate"] = rel_l2(outs["fused"], torch.cat(outs["separate"], dim=1))
            row["saved_ms_per_block"] = row["separate_ms"] - row["fused_ms"] + row.get("quantize_ms", 0.0)
            row["saved_ms_per_step"] = a.blocks * row["saved_ms_per_block"]
        rows[form] = row
        print(f"  {form}: {row}", flush=True)
    report_probe({"shape": {"tokens": a.tokens, "dim": a.dim, "blocks": a.blocks}, "forms": rows,
                  "what": "median of CUDA-event timings (wall clock on the CPU); saved = two GEMMs + one more "
                          "activation quantize (each separate Linear quantizes its own input) - the fused GEMM"},
                 dev, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
