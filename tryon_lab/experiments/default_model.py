"""The toy try-on default model: train it, assemble the committed checkpoint, score it on held-out pairs.

    train_default     both training stages (``training.train``), weights + record + loss curve into a folder
    assemble_default  factory text encoders + trained weights -> ``checkpoints/toy-tryon``, card, embeddings
    evaluate_default  masked PSNR / SSIM against ground truth, trained against random weights, and the grid
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint, embeddings, provenance
from ..configure import build_pipeline
from ..metrics import psnr, ssim
from ..pipeline import TryOnRequest, TryOnSettings, tryon
from ..synthetic import make_sample
from . import training

TRAINING_EMBEDDINGS = provenance.REPO_ROOT / "embeddings" / "training-text-float32.safetensors"


def plot_losses(record: dict, path: Path | None = None):
    """Loss curves of both stages (smoothed), saved when ``path`` is given."""
    import matplotlib

    matplotlib.use("Agg") if path else None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, title in ((axes[0], "vae_losses", "VAE reconstruction"), (axes[1], "fill_losses", "Fill flow matching")):
        y = np.asarray(record[key])
        k = max(1, len(y) // 100)
        ax.plot(y, alpha=0.3, lw=0.5)
        ax.plot(np.convolve(y, np.ones(k) / k, mode="valid"), lw=1.5)
        ax.set_yscale("log")
        ax.set_title(f"{title} ({len(y)} steps)")
        ax.set_xlabel("step")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=100)
    return fig


def write_card(out_root: Path, record: dict, extra: dict) -> Path:
    """The card: exactly how the weights were trained (data seed, steps, batch, time, device, commit)."""
    card = {k: v for k, v in record.items() if not k.endswith("_losses")}
    card["final_vae_loss"] = float(np.mean(record["vae_losses"][-50:]))
    card["final_fill_loss"] = float(np.mean(record["fill_losses"][-50:]))
    card.update(extra)
    path = out_root / "tryon_lab_card.json"
    path.write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
    return path


def train_default(out: str | Path, device: str, embeddings_file: str | Path = TRAINING_EMBEDDINGS, quick: bool = False,
                  overrides: dict[str, str] | None = None) -> dict:
    """Train both stages and write the weights, ``record.json``, ``train_log.txt`` and the loss curve to ``out``.

    ``embeddings_file``: fp32 prompt embeddings of the factory text encoders (made if missing); ``quick``: a few
    steps of each stage (a smoke test of the whole path on a CPU); ``overrides``: ``TrainConfig`` fields as text.
    """
    small = checkpoint.SmallModelConfig()
    cfg = training.TrainConfig()
    if quick:
        cfg.vae_steps, cfg.fill_steps, cfg.vae_batch, cfg.fill_batch, cfg.workers, cfg.log_every = 3, 3, 2, 2, 0, 1
    for k, v in (overrides or {}).items():
        setattr(cfg, k, type(getattr(cfg, k))(v))
    emb_file = Path(embeddings_file)
    if not emb_file.exists():
        print(f"{emb_file} missing: encoding the prompt with the factory checkpoint's text encoders")
        embeddings.build_embeddings(checkpoint.random_checkpoint(small), torch.float32, path=emb_file)
    from safetensors.torch import load_file

    text = load_file(str(emb_file))
    text = (text["prompt_embeds"].float(), text["pooled_prompt_embeds"].float())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train_log.txt", "w") as log_file:
        def log(msg):
            print(msg, flush=True)
            log_file.write(msg + "\n")
            log_file.flush()

        start = time.time()
        models, record = training.train(cfg, small, text, device, log)
        record.update(wall_seconds=time.time() - start, stamp=provenance.stamp(device), embeddings_file=emb_file.name)
        training.save_trained_weights(models, out)
        (out / "record.json").write_text(json.dumps(record, default=str))
        plot_losses(record, out / "loss_curve.png")
        log(f"done in {record['wall_seconds']:.0f}s: vae {record['vae_steps_done']} steps, "
            f"fill {record['fill_steps_done']} steps")
    return record


def assemble_default(weights: str | Path, out: str | Path = checkpoint.TRAINED_DIR,
                     embeddings_file: str | Path = TRAINING_EMBEDDINGS) -> Path:
    """Factory text encoders + trained weights -> a checkpoint at ``out`` with its card, loss curve and the
    float32 / bfloat16 embedding caches; refuses text encoders that do not reproduce the training embeddings."""
    weights, out = Path(weights), Path(out)
    record = json.loads((weights / "record.json").read_text())
    base = checkpoint.random_checkpoint(checkpoint.SmallModelConfig())
    training.assemble_checkpoint(weights, record, out, base_dir=base)
    training.check_text_embeddings(out, Path(embeddings_file))
    for dtype in (torch.float32, torch.bfloat16):
        embeddings.build_embeddings(out, dtype, path=embeddings.embeddings_path(out, dtype))
    plot_losses(record, out / "loss_curve.png")
    extra = {"fingerprint": provenance.fingerprint(out), "weights_from": str(weights.name),
             "assembled": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    write_card(out, record, extra)
    print(f"checkpoint at {out}, fingerprint {extra['fingerprint'][:16]}")
    return out


def evaluate_heldout(model_dir: Path, seed: int = 999, count: int = 8, steps: int = 20, dtype=torch.float32,
                     device: str = "cpu", progress: bool = False) -> tuple[dict, list]:
    """Masked-region PSNR / SSIM of try-ons against ground truth on pairs from a seed never used in training.

    Returns (summary, rows) where each row holds the images (garment, person, try-on, target) for a grid.
    """
    pipe = build_pipeline(model_dir, device=device, dtype=str(dtype).removeprefix("torch."))
    rows = []
    for i in range(count):
        s = make_sample(seed, i)
        out = tryon(pipe, TryOnRequest(s.person, s.garment, s.mask, seed=i), TryOnSettings(steps=steps, progress=progress))
        m = np.asarray(s.mask) > 127
        rows.append({"index": i, "psnr_masked": psnr(out.images[0], s.target, mask=m),
                     "ssim_masked": ssim(out.images[0], s.target, mask=m),
                     "images": [s.garment, s.person, out.images[0], s.target]})
    summary = {"seed": seed, "count": count, "steps": steps,
               "psnr_masked_mean": float(np.mean([r["psnr_masked"] for r in rows])),
               "ssim_masked_mean": float(np.mean([r["ssim_masked"] for r in rows]))}
    return summary, rows


def grid_image(rows: list):
    """garment | person | try-on | ground truth, one row per pair, as one PIL image."""
    from PIL import Image

    w, h = rows[0]["images"][0].size
    grid = Image.new("RGB", (4 * w, len(rows) * h), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, img in enumerate(row["images"]):
            grid.paste(img.convert("RGB"), (c * w, r * h))
    return grid


def evaluate_default(seed: int = 999, count: int = 8, steps: int = 20,
                     results: str | Path = provenance.REPO_ROOT / "benchmarks" / "results.json",
                     grid: str | Path | None = provenance.REPO_ROOT / "docs" / "heldout_grid.png") -> dict:
    """The trained default model and the random-weights one on the same held-out pairs; writes entry
    ``heldout_quality`` to ``results`` and the trained model's grid to ``grid``."""
    res = {"stamp": provenance.stamp("cpu")}
    for name, model_dir in (("trained", checkpoint.TRAINED_DIR), ("random", checkpoint.random_checkpoint())):
        summary, rows = evaluate_heldout(model_dir, seed, count, steps)
        summary["model"] = checkpoint.describe_model(model_dir)
        res[name] = summary
        print(f"{name}: masked PSNR {summary['psnr_masked_mean']:.2f} dB, masked SSIM {summary['ssim_masked_mean']:.3f}")
        if name == "trained" and grid:
            grid_image(rows).save(grid)
    provenance.write_results(results, "heldout_quality", res)
    return res
