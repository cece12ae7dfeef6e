"""Where a denoising step's time goes: the torch profiler over denoising steps only, device time by kernel kind,
busy time, and how far the GPU runs behind the host. Shared by the one- and multi-GPU benchmarks."""

from __future__ import annotations

import statistics
import time

import torch

TRITON = "fused elementwise / norm / quantize (Triton)"
KIND_RULE = 2  # profiles that file Triton kernels by their prefix (before: by the words in their names)


def kernel_kind(name: str) -> str:
    """The kind of a profiled kernel, read from its name. Inductor names a Triton kernel after the ops it fuses
    (``triton_red_fused__scaled_mm_..._amax``: the activation quantization before an FP8 GEMM;
    ``..._all_to_all_single_clone``: the copy before a collective), so for Triton the prefix decides: a GEMM only
    as a template (``triton_tem``)."""
    n = name.lower()
    if n.startswith("triton_"):
        return "GEMM" if n.startswith("triton_tem") else TRITON
    return _kind_by_words(n)


def _kind_by_words(n: str) -> str:
    if "nccl" in n or "all_to_all" in n or "alltoall" in n or "allgather" in n:
        return "communication (NCCL)"
    if "flash" in n or "fmha" in n:  # before GEMM: FA3's kernels are CUTLASS templates ("cutlass::device_kernel<flash::")
        return "attention"
    if any(k in n for k in ("gemm", "scaled_mm", "cutlass", "sm90_xmma", "matmul", "nvjet")):
        return "GEMM"
    if any(k in n for k in ("flash", "fmha", "cudnn", "attention", "sdpa")):
        return "attention"
    if "triton" in n or "fused" in n:
        return TRITON
    return "other"


def refiled(by_kind: dict[str, float], top_kernels: dict[str, float]) -> dict[str, float]:
    """Time per step by kind of a profile filed before ``KIND_RULE`` 2, when the words in a Triton kernel's name
    decided (fused quantize kernels went under GEMM, fused RoPE under attention): each listed top kernel moves to
    its kind now; kernels outside the list stay where they were filed."""
    out = dict(by_kind)
    for name, ms in top_kernels.items():
        old, new = _kind_by_words(name.lower()), kernel_kind(name)
        if old != new and old in out:
            out[old] -= ms
            out[new] = out.get(new, 0.0) + ms
    return out


def time_by_kind(prof, cuda: bool, steps: int, top: int = 8) -> list[dict]:
    """A profile's time per step by ``kernel_kind``, most first (on CUDA: kernels only, none counted twice), each
    kind with its ``top`` kernels (ms and calls per step): what a lever on that kind would have to change."""
    kinds: dict[str, dict] = {}
    for e in prof.key_averages():
        if (cuda and e.device_type != torch.autograd.DeviceType.CUDA) or e.key.startswith("ProfilerStep"):
            continue  # the schedule's own step markers are not work
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        if not t:
            continue
        k = kinds.setdefault(kernel_kind(e.key), {"kind": kernel_kind(e.key), "ms_per_step": 0.0, "kernels": 0,
                                                   "all": []})
        k["ms_per_step"] += t / 1e3 / steps
        k["kernels"] += e.count // steps
        k["all"].append((t / 1e3 / steps, e.count / steps, e.key[:120]))
    rows = []
    for r in sorted(kinds.values(), key=lambda r: -r["ms_per_step"]):
        ranked = sorted(r.pop("all"), reverse=True)
        rows.append({**r, "top": ranked[0][2][:60],
                     "top_kernels": [{"kernel": n, "ms_per_step": ms, "calls_per_step": c} for ms, c, n in ranked[:top]]})
    return rows


def profile_window(fill, x: dict, steps: int, cuda: bool):
    """The torch profiler over ``steps`` denoising steps of one ``fill`` call and nothing else: it waits out the
    first step (and what comes before it: image preparation, the VAE encode of the masked image) and warms up
    on the second. Returns the profile and the profiled wall time per step (ms)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    started: list[float] = []

    def step_end(_p, i, _t, kw):
        if i == 1:  # the steps before the window are done before it opens
            if cuda:
                torch.cuda.synchronize()
            started.append(time.perf_counter())
        prof.step()
        return kw

    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU],
                 schedule=schedule(wait=1, warmup=1, active=steps, repeat=1)) as prof:
        fill(**x, num_inference_steps=steps + 2, generator=torch.Generator("cpu").manual_seed(0),
             callback_on_step_end=step_end)
        if cuda:
            torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - started[0]) / steps
    return prof, wall_ms


def busy_ms(prof) -> float:
    """Device time covered by at least one kernel or copy (the union of their intervals, every stream), ms."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    total, end = 0.0, float("-inf")
    for a, b in spans:
        total += max(0.0, b - max(a, end))
        end = max(end, b)
    return total / 1e3


def device_lag(fill, x: dict, steps: int) -> dict:
    """How far the device runs behind the host at each step's end (ms, CUDA only). Near zero: the GPU waits for
    the host to issue its kernels (host-bound: CUDA graphs or fewer launches help); growing: the host is ahead
    and the GPU is the limit."""
    start, marks = torch.cuda.Event(enable_timing=True), []

    def mark(_p, _i, _t, kw):
        marks.append((time.perf_counter(), torch.cuda.Event(enable_timing=True)))
        marks[-1][1].record()
        return kw

    torch.cuda.synchronize()
    start.record()
    h0 = time.perf_counter()
    fill(**x, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=mark)
    torch.cuda.synchronize()
    lag = [start.elapsed_time(ev) - 1e3 * (h - h0) for h, ev in marks]
    host = [1e3 * (b[0] - a[0]) for a, b in zip(marks, marks[1:], strict=False)]
    return {"host_ms_per_step": statistics.median(host), "device_lag_ms": [round(v, 2) for v in lag]}
