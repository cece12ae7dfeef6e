"""Probe: torch's experimental module AOT compile on full-size FLUX blocks (compile and save in one process, load
in a fresh one), the lever after the compile-artefact cache for the cold start.

    python scripts/probe_aot_compile.py save bf16 --dir ART   # then, in a fresh process with an empty inductor cache:
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python scripts/probe_aot_compile.py load bf16 --dir ART

The loading process builds blocks from another seed, so the compiled code runs on that process's own weights.
Prints one ``PROBE {json}`` line: seconds to compile or load, first and steady call, rel-L2 against own eager.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def blocks(seed: int, quant: str, dev: str, dt: torch.dtype, dim: int = 3072, heads: int = 24, head_dim: int = 128):
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    torch.manual_seed(seed)
    out = [FluxTransformerBlock(dim, heads, head_dim).to(dev, dt).eval(),
           FluxSingleTransformerBlock(dim, heads, head_dim).to(dev, dt).eval()]
    if quant == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        for b in out:
            quantize_(b, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("save", "load"))
    ap.add_argument("quant", choices=("bf16", "fp8"))
    ap.add_argument("--dir", required=True, help="folder for the compiled blocks")
    ap.add_argument("--image-tokens", type=int, default=3072)
    ap.add_argument("--text-tokens", type=int, default=1241)
    a = ap.parse_args(argv)
    from torch._dynamo import config
    from torch._dynamo.aot_compile import ModelInput

    from tryon_lab.aot_blocks import compile_options

    config.enable_aot_compile = True

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt, dim, head_dim = torch.bfloat16, 3072, 128
    g = torch.Generator(dev).manual_seed(1)
    s, t = a.image_tokens, a.text_tokens
    kw = dict(hidden_states=torch.randn(1, s, dim, device=dev, dtype=dt, generator=g),
              encoder_hidden_states=torch.randn(1, t, dim, device=dev, dtype=dt, generator=g),
              temb=torch.randn(1, dim, device=dev, dtype=dt, generator=g),
              image_rotary_emb=(torch.randn(s + t, head_dim, device=dev, generator=g),
                                torch.randn(s + t, head_dim, device=dev, generator=g)))
    os.makedirs(a.dir, exist_ok=True)
    out: dict = {"mode": a.mode, "quant": a.quant, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                 "torch": torch.__version__}

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        for name, block in zip(("double", "single"), blocks(0 if a.mode == "save" else 2, a.quant, dev, dt),
                                   strict=True):
            path = os.path.join(a.dir, f"{a.quant}-{name}.bin")
            try:
                ref = block(**kw)
                start = time.perf_counter()
                compiled = torch.compile(block, fullgraph=True, backend="inductor", options=compile_options())
                if a.mode == "save":
                    compiled._aot_compile([ModelInput(args=(), kwargs=kw, contexts=[])])
                    out[f"{name}_compile_s"] = time.perf_counter() - start
                    compiled._save_aot_compiled_module(path)
                    out[f"{name}_bytes"] = os.path.getsize(path)
                else:
                    with open(path, "rb") as f:
                        compiled._load_aot_compiled_module(f.read())
                    out[f"{name}_load_s"] = time.perf_counter() - start
                start = time.perf_counter()
                got = compiled(**kw)
                sync()
                out[f"{name}_first_call_s"] = time.perf_counter() - start
                start = time.perf_counter()
                compiled(**kw)
                sync()
                out[f"{name}_steady_ms"] = 1e3 * (time.perf_counter() - start)
                got, ref = (got[-1], ref[-1]) if isinstance(got, tuple) else (got, ref)
                out[f"{name}_rel_l2_vs_own_eager"] = float((got.float() - ref.float()).norm() / ref.float().norm())
            except Exception as e:  # noqa: BLE001 -- a probe reports each block's failure and goes on
                out[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:600]}"
            print(f"PROBE {json.dumps(out)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
