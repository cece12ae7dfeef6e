"""Probe: FP8 attention at the full-size FLUX shape, against cuDNN SDPA in bf16: torch's FlexAttention, and
FlashAttention-3's forward kernels where the ``fa3-fwd`` wheel is installed.

Attention is about a third of a compiled FP8 step (57 calls of 0.45 ms with cuDNN at 1 x 24 x 4313 x 128), and the
FP8 kernels tried so far were slower (SageAttention 0.92 ms, FlexAttention 2.15 ms). FlexAttention takes FP8 query,
key and value (Triton kernels written by inductor): the scales of Q and K fold into the softmax scale, V's scale
multiplies the output. FA3 (the Hopper kernels, forward only: PyPI ``fa3-fwd``, 27.6 MB, built on torch's stable
ABI against CUDA 13) takes FP8 Q, K, V with per-(batch, head) descales, in its own (B, S, H, D) layout: the rows
convert the layout before timing, as the FLUX attention processor makes Q, K, V in that layout already. Each kernel
is timed with CUDA events and compared with fp32 SDPA (rel-L2); a kernel that fails says why instead of ending the
probe.

    python scripts/probe_attention_fp8.py --out results.json            # the H200 shape
    python scripts/probe_attention_fp8.py --tokens 300 --heads 2        # a small shape (the CPU runs the bf16 rows)
    # FA3 on the GPU machine: pip download --no-deps --only-binary=:all: --python-version 3.12 \
    #   --platform manylinux_2_24_x86_64 -d .whl fa3-fwd==0.0.3, carried and installed like the other wheels
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


def to_fp8(x: torch.Tensor, per_head: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (B, H, S, D) in FP8 and its scale (per tensor, or per head: shape (H,)), x ~= fp8 * scale."""
    amax = x.abs().amax(dim=(0, 2, 3) if per_head else None).float().clamp(min=1e-12)
    scale = amax / torch.finfo(FP8).max
    view = scale.view(1, -1, 1, 1) if per_head else scale
    return (x / view).to(FP8), scale


def attend_fp8(q8, k8, v8, sq, sk, sv, per_head: bool):
    """FlexAttention on FP8 Q, K, V with their scales: the logits rescaled in the kernel, the output after it."""
    from torch.nn.attention.flex_attention import flex_attention

    if per_head:
        qk = sq * sk  # (H,): each head's logits rescaled in the kernel

        def score_mod(score, b, h, q_idx, kv_idx):
            return score * qk[h]

        out = flex_attention(q8, k8, v8, score_mod=score_mod)
        return out.to(torch.bfloat16) * sv.view(1, -1, 1, 1).to(torch.bfloat16)
    out = flex_attention(q8, k8, v8, score_mod=lambda s, b, h, qi, ki: s * (sq * sk))
    return out.to(torch.bfloat16) * sv.to(torch.bfloat16)


def flex_fp8(per_head: bool):
    """FP8 FlexAttention as two compiled calls, both timed: the quantize of Q, K and V, then the attention.
    Inductor lowers ``flex_attention`` only on inputs it has already laid out in memory, so a quantize in the
    same graph fails ("convert FlexibleLayout to FixedLayout first", H200, torch 2.11): the graph is cut there."""
    quantize = torch.compile(lambda q, k, v: [x for t in (q, k, v) for x in to_fp8(t, per_head)], fullgraph=True,
                             dynamic=False)
    attend = torch.compile(attend_fp8, fullgraph=True, dynamic=False)

    def run(q, k, v):
        q8, sq, k8, sk, v8, sv = quantize(q, k, v)
        return attend(q8, k8, v8, sq, sk, sv, per_head)
    return run


def fa3_kernels() -> dict:
    """FA3's forward in bf16 and in FP8 (scales per tensor or per head), each taking (B, S, H, D) inputs; an FA3
    that cannot be imported gives one row that raises its import error when run."""
    try:
        import fa3_fwd_interface as fa3
    except Exception as e:  # noqa: BLE001 - not installed here, or built for another torch: a result
        error = f"{type(e).__name__}: {e}"

        def unavailable(q, k, v):
            raise RuntimeError(f"fa3-fwd not usable here ({error})")
        return {"fa3": unavailable}

    def quantize(q, k, v, per_head: bool):  # (B, S, H, D): the per-head scales are over dims 0, 1, 3
        parts = [to_fp8(t.transpose(1, 2), per_head) for t in (q, k, v)]
        b, h = q.shape[0], q.shape[2]
        return [x.transpose(1, 2) for x, _ in parts] + [sc.float().expand(b, h).contiguous() for _, sc in parts]

    def attend(q8, k8, v8, dq, dk, dv):
        return fa3.flash_attn_func(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv)

    def fp8(per_head: bool, compiled: bool = False):
        quant = torch.compile(quantize, fullgraph=True, dynamic=False) if compiled else quantize
        return lambda q, k, v: attend(*quant(q, k, v, per_head))

    def kernel_only(per_head: bool):  # the inputs quantized once, outside the timing: the kernel's own time
        held: list = []

        def run(q, k, v):
            if not held:
                held.extend(quantize(q, k, v, per_head))
            return attend(*held)
        return run

    return {"fa3_bf16": lambda q, k, v: fa3.flash_attn_func(q, k, v), "fa3_fp8_per_tensor": fp8(False),
            "fa3_fp8_per_head": fp8(True), "fa3_fp8_per_tensor_compiled_quantize": fp8(False, compiled=True),
            "fa3_fp8_per_tensor_kernel_only": kernel_only(False), "fa3_fp8_per_head_kernel_only": kernel_only(True)}


def kernels(dev: str) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    out = {"sdpa_math_bf16": sdpa(SDPBackend.MATH)} if dev == "cpu" else {
        "cudnn_bf16": sdpa(SDPBackend.CUDNN_ATTENTION), "flash_bf16": sdpa(SDPBackend.FLASH_ATTENTION)}
    out["flex_bf16"] = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    out["flex_fp8_per_tensor"], out["flex_fp8_per_head"] = flex_fp8(False), flex_fp8(True)
    if dev != "cpu":
        out.update(fa3_kernels())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4313, help="image + text tokens (3072 + 1241 at 1024x768)")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", help="write the results here as JSON")
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(dev).manual_seed(0)
    shape = (1, a.heads, a.tokens, a.head_dim)
    # activations like a FLUX block's after RMSNorm and RoPE: unit scale, a few larger channels
    q, k, v = (torch.randn(shape, device=dev, generator=g, dtype=torch.float32) for _ in range(3))
    q[..., :4] *= 8
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    flops = 4 * a.heads * a.tokens * a.tokens * a.head_dim
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    rows = {}
    bshd = tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))  # FA3's layout, made before timing
    for name, fn in kernels(dev).items():
        try:
            fa3 = name.startswith("fa3")
            out, first, ms = kernel_ms(fn, bshd if fa3 else (q, k, v), a.reps, dev)
            out = out.transpose(1, 2) if fa3 else out
            rows[name] = {"status": "ok", "ms": ms, "tflops": flops / ms / 1e9, "first_call_s": first,
                          "rel_l2_vs_fp32": rel_l2(out.float(), reference)}
        except Exception as e:  # noqa: BLE001 - a kernel that does not run here is a result, not the end
            rows[name] = {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:600]}"}
        print(f"  {name}: {rows[name]}", flush=True)
    report_probe({"shape": {"batch": 1, "heads": a.heads, "tokens": a.tokens, "head_dim": a.head_dim},
                  "kernels": rows, "what": "one attention call, CUDA events (wall time on the CPU), rel-L2 against "
                                           "fp32 SDPA; the FP8 rows include quantizing Q, K and V (eager, or "
                                           "compiled), except the kernel_only rows"}, dev, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
