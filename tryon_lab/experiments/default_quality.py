"""Held-out quality of the default model, and what limits it.

    evaluate_model    per held-out pair: the try-on's masked PSNR / SSIM against ground truth; the logos the
                      matcher finds on it (default threshold, search inside the mask, as ``flow`` does); logo-box
                      PSNR before and after the logo pass (at the matched boxes, and at the known boxes); the
                      pass on the ground truth itself (a good pass keeps a crisp logo crisp); the VAE's
                      reconstruction PSNR of the target (mask, logo boxes): the ceiling the Fill model can reach
    blur_reference    the ground truth blurred inside the mask (Gaussian, sigma in px), scored the same way: what a
                      model that puts every colour and edge in the right place but blurs them by sigma would get
    placement_reference  the ground truth redrawn with the torso's corners moved by up to j px: how exactly a model
                      must place the garment (pattern, logos) to reach a score
    mask_pinned_placement  how far the corners can move with the mask unchanged: what the inputs leave open
    conditioning_probe  what the model takes from each input: the pairs scored with another pair's garment or a grey
                      one, with the other garment in one path only (Redux tokens, or the diptych's garment half),
                      with fewer steps (1 step: the model's own estimate of the mean image), and with the
                      sampler's sigma shift fixed instead of following the sequence length
    evaluate_default  the trained model (with its logo LoRA when there is one) and random weights on the same
                      pairs, the data generator's throughput, one stamp -> ``benchmarks/default_model_quality.json``
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import checkpoint, provenance
from ..configure import build_pipeline
from ..images import image_hash
from ..logos import known_matches, locate_logos, logo_pass
from ..metrics import psnr, ssim
from ..pipeline import TryOnRequest, TryOnSettings, encode_garment, tryon
from ..synthetic import make_sample
from . import train_data

RESULTS = provenance.REPO_ROOT / "benchmarks" / "default_model_quality.json"
H100_FILL_PAIRS_PER_S = 550.0  # 8.5 Fill steps/s x batch 64 measured on the H100 (14 data workers)


MATCH_IOU = 0.5  # a found logo counts as matched only where the ground truth puts it


def box_iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


@torch.no_grad()
def _roundtrip(vae, processor, image: Image.Image) -> Image.Image:
    x = processor.preprocess(image).to(vae.device, vae.dtype)
    z = vae.encode(x).latent_dist.mode()
    return processor.postprocess(vae.decode(z).sample.float(), output_type="pil")[0]


def vae_roundtrip(pipe, image: Image.Image) -> Image.Image:
    """Encode (posterior mode) and decode one image with the pipeline's VAE: the best any latent can give."""
    return _roundtrip(pipe.fill.vae, pipe.fill.image_processor, image)


def vae_ceiling(vae, seed: int = 999, count: int = 8) -> dict:
    """A bare VAE's round trip on the held-out targets (masked, logo-box and whole-image PSNR, means), with the
    image processing the Fill pipeline uses: what a VAE lets the Fill model reach, before training Fill on it."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=2 ** len(vae.config.block_out_channels))  # Fill's: 2 x the VAE's
    rows = []
    for i in range(count):
        s = make_sample(seed, i)
        rec = _roundtrip(vae, processor, s.target)
        rows.append({"vae_recon_psnr": psnr(rec, s.target, mask=np.asarray(s.mask) > 127),
                     "vae_recon_psnr_logo": psnr(rec, s.target,
                                                 mask=train_data.box_mask(s.target_logo_boxes, s.target.size)),
                     "vae_recon_psnr_image": psnr(rec, s.target)})
    return {k: float(np.mean([min(r[k], 100.0) for r in rows])) for k in rows[0]}


def evaluate_pair(pipe, s, index: int, settings: TryOnSettings, logo_lora=None) -> dict:
    """Every number of one held-out pair (see the module docstring); ``images`` for the grid."""
    out = tryon(pipe, TryOnRequest(s.person, s.garment, s.mask, seed=index), settings)
    img = out.images[0]
    m, logo = np.asarray(s.mask) > 127, train_data.box_mask(s.target_logo_boxes, s.target.size)
    matches = locate_logos(s.garment, s.garment_logo_boxes, img, search_mask=s.mask)
    known = known_matches(s.garment_logo_boxes, s.target_logo_boxes)
    row = {"index": index, "masked_psnr": psnr(img, s.target, mask=m), "masked_ssim": ssim(img, s.target, mask=m),
           "logos": len(matches), "logos_found": sum(x.found for x in matches),
           "logos_matched": sum(x.found and box_iou(x.box, t) >= MATCH_IOU for x, t in zip(matches, s.target_logo_boxes,
                                                                                          strict=True)),
           "logo_scores": [round(x.confidence, 3) for x in matches], "logo_psnr_before": psnr(img, s.target, mask=logo)}
    for name, lora in (("plain", None), ("lora", logo_lora)) if logo_lora else (("plain", None),):
        matched = logo_pass(pipe, img, s.garment, matches, settings, lora=lora, seed=index).image
        at_known = logo_pass(pipe, img, s.garment, known, settings, lora=lora, seed=index).image
        on_truth = logo_pass(pipe, s.target, s.garment, known, settings, lora=lora, seed=index).image
        suffix = "" if name == ("lora" if logo_lora else "plain") else "_plain"
        row[f"logo_psnr_after{suffix}"] = psnr(matched, s.target, mask=logo)
        row[f"logo_psnr_after_known_boxes{suffix}"] = psnr(at_known, s.target, mask=logo)
        row[f"logo_psnr_pass_on_truth{suffix}"] = psnr(on_truth, s.target, mask=logo)
    rec = vae_roundtrip(pipe, s.target)
    row.update(vae_recon_psnr=psnr(rec, s.target, mask=m), vae_recon_psnr_logo=psnr(rec, s.target, mask=logo),
               vae_recon_psnr_image=psnr(rec, s.target), images=[s.garment, s.person, img, s.target])
    return row


def summarise(rows: list[dict]) -> dict:
    """Means over pairs (PSNR in dB averaged, identical images counted at 100 dB); match rate over all logos."""
    keys = [k for k in rows[0] if k.startswith(("masked_", "logo_psnr", "vae_recon"))]
    out = {k: float(np.mean([min(r[k], 100.0) for r in rows])) for k in keys}
    n = max(1, sum(r["logos"] for r in rows))
    out["logo_match_rate"] = sum(r["logos_matched"] for r in rows) / n  # found where the logo really is
    out["logo_found_rate"] = sum(r["logos_found"] for r in rows) / n  # above the threshold anywhere
    out["logos"] = sum(r["logos"] for r in rows)
    return out


def evaluate_model(model_dir: Path, seed: int = 999, count: int = 8, steps: int = 20, logo_lora=None,
                   device: str = "cpu") -> tuple[dict, list[dict]]:
    """Held-out pairs from a seed never used in training (training uses 1234..1236); returns (summary, rows)."""
    pipe = build_pipeline(model_dir, device=device, dtype="float32")
    settings = TryOnSettings(steps=steps, progress=False)
    rows = [evaluate_pair(pipe, make_sample(seed, i), i, settings, logo_lora) for i in range(count)]
    return summarise(rows), rows


def _truth_references(seed: int, count: int, variants: dict) -> dict[str, dict]:
    """Mean masked PSNR / SSIM over the held-out pairs of images made from each pair by ``variants`` (name ->
    ``fn(index, sample, mask) -> image``), scored against its ground truth; each pair is rendered once."""
    scores: dict[str, list] = {name: [] for name in variants}
    for i in range(count):
        s = make_sample(seed, i)
        m = np.asarray(s.mask) > 127
        for name, make in variants.items():
            image = make(i, s, m)
            scores[name].append((psnr(image, s.target, mask=m), ssim(image, s.target, mask=m)))
    return {name: {"masked_psnr": float(np.mean([a for a, _ in v])), "masked_ssim": float(np.mean([b for _, b in v]))}
            for name, v in scores.items()}


def blur_reference(seed: int = 999, count: int = 8, sigmas: tuple[float, ...] = (1, 2, 4, 8)) -> dict[str, dict]:
    """Masked PSNR / SSIM of each held-out target with its masked region blurred by ``sigma`` px (no model)."""
    import cv2

    def blurred(sigma: float):
        def make(i, s, m):
            target = np.asarray(s.target)
            return Image.fromarray(np.where(m[..., None], cv2.GaussianBlur(target, (0, 0), sigma), target))
        return make

    return _truth_references(seed, count, {f"sigma_{sigma:g}px": blurred(sigma) for sigma in sigmas})


def placement_reference(seed: int = 999, count: int = 8, jitters: tuple[float, ...] = (0.5, 1, 2, 4)) -> dict[str, dict]:
    """Masked PSNR / SSIM of each held-out target redrawn with its torso corners moved by up to ``jitter`` px
    (uniform per corner and axis, fixed draws; no model): how exactly a try-on must place the garment to score
    what. The body's corner jitter (up to 2.3 px at 192 px) is inside the mask: a model must infer it."""
    from ..synthetic import misplaced_pair

    def moved(jitter: float):
        draws = np.random.default_rng(0)  # one stream per jitter, drawn pair after pair
        return lambda i, s, m: misplaced_pair(seed, i, draws.uniform(-jitter, jitter, (4, 2)))[0]

    return _truth_references(seed, count, {f"corners_{jitter:g}px": moved(jitter) for jitter in jitters})


def mask_pinned_placement(seed: int = 999, count: int = 8, steps: int = 1000, step_px: float = 0.05) -> dict:
    """How exactly the inputs pin the garment's place: a random walk over the torso corners' offsets that accepts
    only moves whose mask is pixel-identical to the pair's (the model sees the mask, not what lies under it),
    started at the true corners; every 10th step's position is a draw. Per pair: accepted moves, the draws' corner
    spread (px), and the masked PSNR (of their pooled error) / mean SSIM of their targets against the truth: what a
    try-on that draws the garment anywhere the mask allows would score. Slowly mixing: a lower bound on what the
    mask leaves open."""
    from ..synthetic import misplaced_pair

    pairs = []
    for i in range(count):
        s = make_sample(seed, i)
        mask, target = np.asarray(s.mask), np.asarray(s.target)
        walk, at, here, accepted, draws = np.random.default_rng(i), np.zeros((4, 2)), target, 0, []
        for step in range(steps):
            proposal = at + walk.normal(0.0, step_px, (4, 2))
            moved, moved_mask = misplaced_pair(seed, i, proposal)
            if np.array_equal(moved_mask, mask):
                at, here, accepted = proposal, moved, accepted + 1
            if step % 10 == 9:
                draws.append((at, here))
        n, m = len(draws), mask > 127
        pooled = psnr(np.stack([t for _, t in draws]), np.stack([target] * n), mask=np.stack([m] * n))
        pairs.append({"accepted": accepted, "corner_spread_px": float(np.std([c for c, _ in draws], 0).mean()),
                      "masked_psnr": float(pooled) if np.isfinite(pooled) else None,  # None: every draw the truth
                      "masked_ssim": float(np.mean([ssim(t, target, mask=m) for _, t in draws]))})
    finite = [p["masked_psnr"] for p in pairs if p["masked_psnr"] is not None]
    return {"pairs": pairs, "steps": steps, "step_px": step_px, "lowest_masked_psnr": min(finite) if finite else None}


def conditioning_probe(model_dir: Path, seed: int = 999, count: int = 8, steps: int = 20,
                       fewer_steps: tuple[int, ...] = (1, 2, 4), shifts: tuple[float, ...] = (1, 3, 6)) -> dict[str, float]:
    """Masked PSNR on the held-out pairs (as ``evaluate_model``) with the garment changed in both paths, in one path
    only, with fewer steps, and with the sampler's sigmas shifted by a fixed ``shifts`` factor instead of the
    shipped one that follows the sequence length; a model that ignores an input scores the same without it."""
    pipe = build_pipeline(model_dir, device="cpu", dtype="float32")
    pairs = [make_sample(seed, i) for i in range(count)]

    def score(i: int, garment: Image.Image, redux_from: Image.Image | None = None, n: int = steps) -> float:
        s = pairs[i]
        pipe.redux_cache.clear()
        if redux_from is not None:  # the Redux tokens of another garment under this garment's key
            pipe.redux_cache[image_hash(garment)] = encode_garment(pipe.redux, redux_from)
        out = tryon(pipe, TryOnRequest(s.person, garment, s.mask, seed=i), TryOnSettings(steps=n, progress=False))
        if redux_from is not None and out.redux_cache_hits != 1:
            raise RuntimeError("the swapped Redux tokens were not used (the garment was changed before encoding)")
        return psnr(out.images[0], s.target, mask=np.asarray(s.mask) > 127)

    def other(i: int) -> Image.Image:
        return pairs[(i + 1) % count].garment

    def shifted(i: int, shift: float) -> float:  # the scheduler's own option; the shipped one is put back after
        shipped = pipe.fill.scheduler
        pipe.fill.scheduler = type(shipped).from_config(shipped.config, use_dynamic_shifting=False, shift=shift)
        try:
            return score(i, pairs[i].garment)
        finally:
            pipe.fill.scheduler = shipped

    cases = {"own garment": lambda i: score(i, pairs[i].garment),
             "next pair's garment": lambda i: score(i, other(i)),
             "grey garment": lambda i: score(i, Image.new("RGB", pairs[i].garment.size, (128, 128, 128))),
             "next pair's Redux tokens, own diptych half": lambda i: score(i, pairs[i].garment, redux_from=other(i)),
             "own Redux tokens, next pair's diptych half": lambda i: score(i, other(i), redux_from=pairs[i].garment),
             **{f"{n} step{'s' if n > 1 else ''}": lambda i, n=n: score(i, pairs[i].garment, n=n) for n in fewer_steps},
             **{f"sigma shift {s:g}": lambda i, s=s: shifted(i, s) for s in shifts}}
    out = {name: float(np.mean([f(i) for i in range(count)]))
           for name, f in tqdm(cases.items(), desc="conditioning probe", unit="case")}
    pipe.redux_cache.clear()
    return out


def grid_image(rows: list):
    """garment | person | try-on | ground truth, one row per pair, as one PIL image."""
    w, h = rows[0]["images"][0].size
    grid = Image.new("RGB", (4 * w, len(rows) * h), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, img in enumerate(row["images"]):
            grid.paste(img.convert("RGB"), (c * w, r * h))
    return grid


def data_throughput(seconds: float = 3.0, demand: float = H100_FILL_PAIRS_PER_S) -> dict:
    """Pairs/s of one generator process here, and how many such processes a GPU consuming ``demand`` needs."""
    rates = train_data.throughput(seconds)
    slow = min(rates.values())
    return {**rates, "gpu_fill_pairs_per_s": demand, "processes_needed": demand / slow,
            "cores_here": os.cpu_count()}


def evaluate_default(seed: int = 999, count: int = 8, steps: int = 20, results: str | Path = RESULTS,
                     grid: str | Path | None = None, model: str | Path = checkpoint.TRAINED_DIR,
                     logo_lora: str | Path | None = None, data_seconds: float = 3.0, probe: bool = False) -> dict:
    """Trained (``model``, with ``logo_lora`` when given) and random weights on the same held-out pairs, the
    data throughput and a stamp, written to ``results``; the trained model's grid to ``grid`` when given;
    ``probe``: the trained model's ``conditioning_probe`` too."""
    model_dir = checkpoint.check_model_dir(model)
    res: dict = {"settings": {"seed": seed, "pairs": count, "steps": steps, "match_threshold": "locate_logos default",
                              "logo_lora": provenance.portable(str(logo_lora)) if logo_lora else None}}
    for name, folder, lora in (("trained", model_dir, logo_lora), ("random", checkpoint.random_checkpoint(), None)):
        summary, rows = evaluate_model(folder, seed, count, steps, lora)
        summary["model"] = provenance.portable(checkpoint.describe_model(folder))
        res[name] = summary
        print(f"{name}: masked PSNR {summary['masked_psnr']:.2f} dB, SSIM {summary['masked_ssim']:.3f}, logos matched "
              f"{summary['logo_match_rate']:.0%} (found anywhere {summary['logo_found_rate']:.0%}), logo PSNR {summary['logo_psnr_before']:.2f} -> "
              f"{summary['logo_psnr_after']:.2f} dB, VAE ceiling {summary['vae_recon_psnr']:.2f} dB", flush=True)
        if name == "trained" and grid:
            grid_image(rows).save(grid)
        if name == "trained" and probe:
            summary["conditioning_probe"] = conditioning_probe(model_dir, seed, count, steps)
            print(f"  what it takes from its inputs (masked PSNR, dB): {summary['conditioning_probe']}", flush=True)
    res["blurred_truth"] = blur_reference(seed, count)
    res["misplaced_truth"] = placement_reference(seed, count)
    res["mask_pinned_placement"] = mask_pinned_placement(seed, count)
    if data_seconds > 0:
        res["data"] = data_throughput(data_seconds)
    res["stamp"] = {**provenance.stamp("cpu"), "model_fingerprint": provenance.fingerprint(model_dir)}
    Path(results).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(results).with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2, sort_keys=True, default=str))
    os.replace(tmp, results)
    return res
