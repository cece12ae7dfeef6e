"""How large the default model can grow: each candidate shape's bytes and its CPU cost, before training it.

The committed model (2 double + 4 single blocks, 256 wide, a VAE of 8x down, prompts padded to FLUX's 512 T5
tokens) reaches 16.5 dB held-out against the 22 dB target, and its Fill loss stopped falling, so the next training
needs a larger shape; the README's main command must stay within ~10 minutes on a 2-core CPU and the checkpoint
under ~60 MB. The cost of a shape does not depend on its weights, so each candidate is built with random weights
and measured here: parameters and bf16 bytes, and one try-on at the notebooks' default size (192 px high, 12 steps)
on this machine, with the committed shape as the yardstick. Shorter prompts (``text_tokens``, measured on the
trained model in ``text_tokens_cpu.md``: 32 tokens cost 0.3 dB) make room for a larger transformer.

    results = measure_sizes(CANDIDATES)   # {name: {params, checkpoint_mb, tryon_s, vs_committed, ...}}
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .. import checkpoint, configure
from ..pipeline import TryOnRequest, TryOnSettings, tryon
from ..plots import markdown_table
from ..provenance import REPO_ROOT, stamp, write_results
from ..samples import load_sample
from ..timers import kernel_ms

RESULTS = REPO_ROOT / "benchmarks" / "results.json"
NAME = "default_model_sizes_cpu"
DEMO_MINUTES = 8.0  # the README's main command on the committed model, 2 cores (2026-11-30: 8:02)

COMMITTED = "committed: 2+4 blocks, 256 wide, VAE 8x, 512 text tokens"
VAE_4X = {"vae_block_out_channels": (32, 64, 128), "vae_layers_per_block": 2}  # the fourteenth session's candidate
CANDIDATES: dict[str, dict] = {
    COMMITTED: {},
    "32 text tokens": {"text_tokens": 32},
    "32 text tokens, 384 wide": {"text_tokens": 32, "num_attention_heads": 6},
    "32 text tokens, 4+8 blocks": {"text_tokens": 32, "num_layers": 4, "num_single_layers": 8},
    "32 text tokens, 4+8 blocks, 384 wide": {"text_tokens": 32, "num_layers": 4, "num_single_layers": 8,
                                             "num_attention_heads": 6},
    "32 text tokens, 3+6 blocks, 512 wide": {"text_tokens": 32, "num_layers": 3, "num_single_layers": 6,
                                             "num_attention_heads": 8},
    "32 text tokens, VAE 4x": {"text_tokens": 32, **VAE_4X},
    "32 text tokens, VAE 4x, 384 wide": {"text_tokens": 32, "num_attention_heads": 6, **VAE_4X},
}


def committed_shape() -> checkpoint.SmallModelConfig:
    """The committed model's shape, as its folder records it."""
    import json

    from .default_model import recorded_model

    return recorded_model({"model": json.loads((checkpoint.TRAINED_DIR / checkpoint.CONFIG_FILE).read_text())})


def part_sizes(cfg: checkpoint.SmallModelConfig) -> dict:
    """Parameters per shipped part and the checkpoint's bf16 bytes (the shipped dtype of every part)."""
    with torch.device("meta"):
        models = checkpoint.build_models(cfg)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    return {"params": params, "checkpoint_mb": 2 * sum(params.values()) / 1e6}


def time_tryon(model_dir: Path, height: int, steps: int, repeats: int) -> dict:
    """One warm-up try-on of the bundled sample, then the median of ``repeats`` (seconds: total and denoise)."""
    pipe = configure.build_pipeline(model_dir, device="cpu", dtype="float32")
    s = load_sample(0, height=height)
    request, settings = TryOnRequest(s.person, s.garment, s.mask, seed=0), TryOnSettings(steps=steps, progress=False)
    denoise = []

    def run():
        with torch.no_grad():
            result = tryon(pipe, request, settings)
        denoise.append(result.timings.get("denoise", 0.0))
        return result

    result, _, ms = kernel_ms(run, (), repeats, "cpu")  # the one timer: a warm-up call, then the median
    return {"tryon_s": ms / 1000, "denoise_s": statistics.median(denoise[1:]),
            "tokens": int(result.latents.shape[1]) + pipe.prompt_embeds.shape[1]}


def measure_sizes(candidates: dict[str, dict] | None = None, height: int = 192, steps: int = 12, repeats: int = 3,
                  base: checkpoint.SmallModelConfig | None = None, on_row=None) -> dict:
    """Each candidate (changes to ``base``, the committed shape by default) with random weights: sizes, and the
    try-on seconds on this machine against the first candidate's."""
    base = base or committed_shape()
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as work:
        for name, changes in (candidates or CANDIDATES).items():
            cfg = dataclasses.replace(base, **changes)
            model_dir = checkpoint.random_checkpoint(cfg, Path(work) / f"m{len(out)}")
            row = {"changes": {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()},
                   **part_sizes(cfg), **time_tryon(model_dir, height, steps, repeats)}
            first = next(iter(out.values()), row)
            row["vs_first"] = row["tryon_s"] / first["tryon_s"]
            out[name] = row
            if on_row:
                on_row(name, row)
    return out


def table_rows(results: dict, demo_minutes: float | None = None) -> list[dict]:
    """One row per candidate; ``demo_minutes``: the main command's measured minutes on the first candidate, scaled
    by each one's try-on time (an upper bound: not all of the command is try-ons)."""
    rows = []
    for name, r in results.items():
        p = r["params"]
        rows.append({"shape": name, "Fill transformer M params": p["transformer"] / 1e6,
                     "VAE M params": p["vae"] / 1e6, "checkpoint MB (bf16)": r["checkpoint_mb"],
                     "sequence tokens": r["tokens"], "try-on s": r["tryon_s"], "denoise s": r["denoise_s"],
                     "x first": r["vs_first"],
                     **({"main command min (scaled)": demo_minutes * r["vs_first"]} if demo_minutes else {})})
    return rows


def run(candidates: dict[str, dict] | None = None, height: int = 192, steps: int = 12, repeats: int = 3,
        threads: int = 2, results: str | Path = RESULTS) -> list[dict]:
    """Every candidate measured and written as ``default_model_sizes_cpu`` with a table."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    measured = measure_sizes(candidates, height, steps, repeats,
                             on_row=lambda name, row: print(f"{name}: {row['tryon_s']:.2f} s, "
                                                            f"{row['checkpoint_mb']:.1f} MB", flush=True))
    rows = table_rows(measured, DEMO_MINUTES)
    out = {"stamp": stamp("cpu"), "height": height, "steps": steps, "repeats": repeats, "threads": threads,
           "weights": "random (a shape's cost does not depend on its values)", "candidates": measured,
           "wall_s": time.perf_counter() - start}
    title = (f"# The default model's shape against its size and CPU cost ({NAME})\n\nEach candidate built with "
             f"random weights from the committed model's shape; one try-on of the bundled sample s000 at height "
             f"{height}, {steps} steps, fp32, median of {repeats} after a warm-up, {threads} threads; checkpoint MB: "
             f"every shipped part in bf16. 'main command min (scaled)': the README's main command ({DEMO_MINUTES:.0f} "
             f"min on the committed model) times the try-on ratio, an upper bound. {out['stamp']['device']}, "
             f"{out['stamp']['date']}.\n\n")
    write_results(results, NAME, out, title + markdown_table(rows))
    return rows
