"""The prompt's padded length against speed and quality, on the CPU.

FLUX pads the prompt to 512 T5 tokens. The toy model's try-on has about 200 image tokens and a logo diptych 32,
so most of each transformer pass is text padding. For each length: the model's own text encoders run at that
length (``encode_prompt(max_sequence_length=n)``), then a try-on at the notebooks' size and steps and a batched
logo pass are timed (median after a warm-up), and the held-out pairs give the masked PSNR / SSIM against ground
truth and the masked PSNR against the same model's try-on at the first length (how much the output moves).
A model trained at 512 tokens and run at fewer measures what trimming costs without retraining; a model
trained at a length (``train_default_model.py --model text_tokens=N``) carries it in its config.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint, embeddings, logos, pipeline, samples
from ..configure import build_pipeline
from ..metrics import psnr, ssim
from ..plots import markdown_table
from ..provenance import REPO_ROOT, portable, stamp, write_results
from ..synthetic import make_sample
from ..timers import kernel_ms

COLUMNS = ["text_tokens", "tryon_s", "tryon_speedup", "logo_pass_s", "logo_pass_speedup", "masked_psnr",
           "masked_ssim", "masked_psnr_vs_first"]
RESULTS = REPO_ROOT / "benchmarks" / "results.json"
NAME = "text_tokens_cpu"


def _median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls after a warm-up call (the one kernel timer, on the CPU)."""
    return kernel_ms(fn, (), repeats, "cpu")[2] / 1000


def measure(pipe, n: int, steps: int, height: int, repeats: int, pairs: int, eval_steps: int) -> tuple[dict, list]:
    """One length, the model's own text encoders run at it in place of the pipeline's cached embeddings: (row
    without the comparisons, the held-out try-ons)."""
    pipe.prompt_embeds, pipe.pooled_prompt_embeds = embeddings.encode_prompt(
        pipe.model_dir, dtype=torch.float32, max_sequence_length=n)
    s = samples.load_sample(0, height=height)
    fast = pipeline.TryOnSettings(steps=steps, progress=False)
    request = pipeline.TryOnRequest(s.person, s.garment, s.mask, seed=0)
    known = logos.known_matches(s.garment_logo_boxes, s.target_logo_boxes)
    row = {"text_tokens": n, "tryon_s": _median_seconds(lambda: pipeline.tryon(pipe, request, fast), repeats),
           "logos": len(known),
           "logo_pass_s": _median_seconds(lambda: logos.logo_pass(pipe, s.target, s.garment, known, fast), repeats)}
    settings = pipeline.TryOnSettings(steps=eval_steps, progress=False)
    outs, psnrs, ssims = [], [], []
    for i in range(pairs):
        p = make_sample(999, i)
        img = pipeline.tryon(pipe, pipeline.TryOnRequest(p.person, p.garment, p.mask, seed=i), settings).images[0]
        mask = np.asarray(p.mask) > 127
        outs.append((img, mask))
        psnrs.append(psnr(img, p.target, mask=mask))
        ssims.append(ssim(img, p.target, mask=mask))
    row.update(masked_psnr=float(np.mean(psnrs)), masked_ssim=float(np.mean(ssims)))
    return row, outs


def run(model: str = "default", lengths: tuple[int, ...] = (512, 64, 32), steps: int = 12, height: int = 192,
        repeats: int = 3, pairs: int = 8, eval_steps: int = 20, threads: int = 2,
        results: str | Path = RESULTS) -> list[dict]:
    """Every length in ``lengths`` (the first is the reference), written as ``text_tokens_cpu`` with a table."""
    torch.set_num_threads(threads)
    model_dir = checkpoint.resolve_model_dir(model)
    start = time.perf_counter()
    pipe = build_pipeline(model_dir, device="cpu", dtype="float32")
    rows, first = [], None
    for n in lengths:
        row, outs = measure(pipe, n, steps, height, repeats, pairs, eval_steps)
        first = first or (row, outs)
        row["tryon_speedup"] = first[0]["tryon_s"] / row["tryon_s"]
        row["logo_pass_speedup"] = first[0]["logo_pass_s"] / row["logo_pass_s"]
        row["masked_psnr_vs_first"] = float(np.mean([min(100.0, psnr(a, b, mask=m))
                                                     for (a, m), (b, _) in zip(outs, first[1], strict=True)]))
        rows.append(row)
        print(row, flush=True)
    trained_at = checkpoint.text_tokens(model_dir)
    meta = {"model": portable(checkpoint.describe_model(model_dir)), "trained_text_tokens": trained_at,
            "steps": steps, "height": height, "repeats": repeats, "threads": threads,
            "heldout": {"seed": 999, "pairs": pairs, "steps": eval_steps}}
    out = {"stamp": stamp("cpu"), **meta, "rows": rows, "wall_s": time.perf_counter() - start}
    title = (f"# Text tokens against speed and quality ({NAME})\n\n{meta['model']} (trained with its prompt padded "
             f"to {trained_at} T5 tokens); try-on: sample s000 at height {height}, {steps} steps; logo pass: its "
             f"{rows[0]['logos']} known logos, batched; medians of {repeats} after a warm-up, {threads} threads. "
             f"Quality: {pairs} held-out pairs (seed 999), {eval_steps} steps; masked_psnr_vs_first: against the "
             f"try-on at {lengths[0]} tokens. {out['stamp']['device']}, {out['stamp']['date']}.\n\n")
    write_results(results, NAME, out, title + markdown_table(rows, COLUMNS))
    return rows
