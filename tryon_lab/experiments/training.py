"""Training the toy try-on model that ships as the default checkpoint (read top to bottom, like nanoGPT).

Two stages on procedural pairs (``synthetic.py``):
1. the ``AutoencoderKL`` (L1 + MSE reconstruction + a small KL), then its latent shift/scale
   measured on data and written into its config, as FLUX's VAE carries them;
2. the FLUX Fill transformer together with the Redux path (SigLIP encoder + ``ReduxImageEncoder``),
   by rectified-flow (flow-matching) loss on the Fill task exactly as the pipeline runs it: the
   in-context diptych garment | target, the masked diptych and the mask packed by the stock
   ``FluxFillPipeline.prepare_mask_latents``, and conditioning = cached text embeddings followed by
   Redux tokens of the garment.

The text encoders are not trained: the fixed prompt's embeddings are an input (the same file the
slim pipeline loads), so the trained transformer and the committed embeddings agree exactly.
The recipes around it (train and save, assemble the checkpoint, held-out quality) are ``default_model``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..checkpoint import SmallModelConfig, build_models, save_checkpoint

# Attention kernels for training: flash / memory-efficient (and math on a CPU). cuDNN attention's
# backward failed on the H100 here (CUBLAS_STATUS_EXECUTION_FAILED at the first Fill step).
_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class TrainConfig:
    data_seed: int = 1234  # procedural pairs: training draws indices from this seed
    model_seed: int = 0  # initial weights (checkpoint factory)
    vae_steps: int = 4000
    vae_batch: int = 32  # pairs per step; each gives 3 images (garment, person, target)
    vae_lr: float = 3e-4
    vae_kl_weight: float = 1e-6
    vae_time_s: float = 120.0  # stop early when the time budget is spent (fits one device call)
    fill_steps: int = 20000
    fill_batch: int = 64
    fill_lr: float = 4e-4
    fill_warmup: int = 200
    fill_time_s: float = 330.0
    guidance_min: float = 10.0  # guidance embedding sees a range around FLUX Fill's usual 30
    guidance_max: float = 40.0
    workers: int = 12  # processes generating pairs
    log_every: int = 50


def _to_tensor(arr: np.ndarray, device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], as ``VaeImageProcessor.preprocess`` normalises."""
    t = torch.from_numpy(arr).to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    return t / 127.5 - 1.0


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _step(opt, loss: torch.Tensor, params, losses: list[float], step: int, log_every: int, what: str,
          start: float, log) -> None:
    """One optimiser step with gradient clipping at 1.0; the loss is kept and logged every ``log_every`` steps."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    losses.append(loss.item())
    if step % log_every == 0:
        log(f"{what} loss {np.mean(losses[-log_every:]):.4f} ({time.time() - start:.0f}s)")


def train_vae(vae, batches, cfg: TrainConfig, device, log=print) -> list[float]:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    losses, start = [], time.time()
    for step in range(cfg.vae_steps):
        b = next(batches)
        x = _to_tensor(np.concatenate([b["garment"], b["person"], b["target"]]), device)
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr, 100)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        rec = rec.float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.vae_kl_weight * post.kl().mean()
        _step(opt, loss, vae.parameters(), losses, step, cfg.log_every, f"vae step {step}", start, log)
        if time.time() - start > cfg.vae_time_s:
            break
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def set_latent_scale(vae, batches, device, n_batches: int = 8) -> tuple[float, float]:
    """Measure latent mean/std on data and store them as the VAE's ``shift_factor`` / ``scaling_factor``."""
    zs = []
    for _ in range(n_batches):
        b = next(batches)
        x = _to_tensor(np.concatenate([b["person"], b["target"]]), device)
        zs.append(vae.encode(x).latent_dist.sample().float())
    z = torch.cat(zs)
    shift = z.mean().item()
    scale = 1.0 / (z - shift).std().item()
    vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(scale, 6))
    return shift, scale


def siglip_pixels(garment: torch.Tensor, size: int) -> torch.Tensor:
    """Garment batch in [-1, 1] -> SigLIP input (resize; mean/std 0.5 keeps [-1, 1])."""
    return F.interpolate(garment, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


def fill_batch_inputs(fill_pipe, b: dict, device, dtype=torch.float32):
    """Pack one batch exactly as ``FluxFillPipeline`` does: returns (x0, cond, img_ids, garment)."""
    garment, person, target = (_to_tensor(b[k], device) for k in ("garment", "person", "target"))
    mask = torch.from_numpy(b["mask"]).to(device).float()[:, None] / 255.0
    mask = (mask >= 0.5).float()  # the pipeline's mask processor binarises
    n, _, h, w = person.shape
    dip_person = torch.cat([garment, person], dim=3)
    dip_target = torch.cat([garment, target], dim=3)
    mask_full = torch.cat([torch.zeros_like(mask), mask], dim=3)
    masked = dip_person * (1 - mask_full)
    vae = fill_pipe.vae
    c = vae.config.latent_channels
    mask_packed, masked_latents = fill_pipe.prepare_mask_latents(
        mask_full, masked, n, c, 1, h, 2 * w, dtype, device, None)
    z = vae.encode(dip_target).latent_dist.sample()
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    lh, lw = z.shape[2], z.shape[3]
    x0 = fill_pipe._pack_latents(z, n, c, lh, lw)
    cond = torch.cat((masked_latents, mask_packed), dim=-1)
    img_ids = fill_pipe._prepare_latent_image_ids(n, lh // 2, lw // 2, device, dtype)
    return x0, cond, img_ids, garment


def sample_sigmas(n: int, image_seq_len: int, scheduler_config: dict, device) -> torch.Tensor:
    """Logit-normal times, shifted like the inference schedule for this sequence length."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(image_seq_len, scheduler_config["base_image_seq_len"], scheduler_config["max_image_seq_len"],
                         scheduler_config["base_shift"], scheduler_config["max_shift"])
    t = torch.sigmoid(torch.randn(n, device=device))
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def train_fill(models: dict, fill_pipe, text: tuple[torch.Tensor, torch.Tensor], batches, cfg: TrainConfig,
               small: SmallModelConfig, device, log=print) -> list[float]:
    transformer, encoder, embedder = models["transformer"], models["image_encoder"], models["image_embedder"]
    params = [*transformer.parameters(), *encoder.parameters(), *embedder.parameters()]
    for m in (transformer, encoder, embedder):
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.fill_lr, weight_decay=0.01, betas=(0.9, 0.99))
    prompt_embeds, pooled = (t.to(device, torch.float32) for t in text)
    sched_cfg = dict(fill_pipe.scheduler.config)
    losses, start = [], time.time()
    for step in range(cfg.fill_steps):
        b = next(batches)
        with torch.no_grad():
            x0, cond, img_ids, garment = fill_batch_inputs(fill_pipe, b, device)
        n, seq = x0.shape[0], x0.shape[1]
        sigma = sample_sigmas(n, seq, sched_cfg, device)
        noise = torch.randn_like(x0)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        guidance = torch.empty(n, device=device).uniform_(cfg.guidance_min, cfg.guidance_max)
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.fill_steps, cfg.fill_lr, cfg.fill_warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), sdpa_kernel(_SDPA):
            hidden = encoder(pixel_values=siglip_pixels(garment, small.siglip_image_size)).last_hidden_state
            tokens = embedder(hidden).image_embeds
            enc = torch.cat([prompt_embeds.repeat(n, 1, 1), tokens.to(prompt_embeds.dtype)], dim=1)
            txt_ids = torch.zeros(enc.shape[1], 3, device=device)
            pred = transformer(hidden_states=torch.cat([xt, cond], dim=2), timestep=sigma, guidance=guidance,
                               pooled_projections=pooled.repeat(n, 1), encoder_hidden_states=enc, txt_ids=txt_ids,
                               img_ids=img_ids, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        _step(opt, loss, params, losses, step, cfg.log_every, f"fill step {step}", start, log)
        if time.time() - start > cfg.fill_time_s:
            break
    for m in (transformer, encoder, embedder):
        m.eval().requires_grad_(False)
    return losses


def train(cfg: TrainConfig, small: SmallModelConfig, text: tuple[torch.Tensor, torch.Tensor], device: str,
          log=print) -> tuple[dict, dict]:
    """Both stages; returns (models, record of losses / steps / times)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline

    from ..checkpoint import SCHEDULER_CONFIG
    from ..synthetic import SyntheticConfig, iter_batches

    dev = torch.device(device)
    torch.manual_seed(cfg.model_seed)
    models = build_models(small)
    for m in models.values():
        m.to(dev)
    syn = SyntheticConfig()
    t0 = time.time()
    vae_batches = iter_batches(cfg.data_seed, cfg.vae_batch, syn, workers=cfg.workers)
    vae_losses = train_vae(models["vae"], vae_batches, cfg, dev, log)
    shift, scale = set_latent_scale(models["vae"], vae_batches, dev)
    log(f"vae latent shift {shift:.4f} scale {scale:.4f}")
    t1 = time.time()
    fill_pipe = FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=models["vae"],
                                 transformer=models["transformer"], text_encoder=None, tokenizer=None,
                                 text_encoder_2=None, tokenizer_2=None)
    # a different seed stream from the VAE stage's, so the two stages see different pairs
    fill_batches = iter_batches(cfg.data_seed + 1, cfg.fill_batch, syn, workers=cfg.workers)
    fill_losses = train_fill(models, fill_pipe, text, fill_batches, cfg, small, dev, log)
    t2 = time.time()
    record = {"config": asdict(cfg), "model": asdict(small), "vae_losses": vae_losses, "fill_losses": fill_losses,
              "vae_steps_done": len(vae_losses), "fill_steps_done": len(fill_losses), "vae_seconds": t1 - t0,
              "fill_seconds": t2 - t1, "vae_shift_factor": shift, "vae_scaling_factor": scale}
    return models, record


TRAINED_PARTS = ("transformer", "vae", "image_encoder", "image_embedder")


def save_trained_weights(models: dict, out_dir: Path, max_file_bytes: int = 15 * 2**20) -> list[Path]:
    """Trained parts as bf16 safetensors files of at most ``max_file_bytes`` each (``part.N.safetensors``)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for part in TRAINED_PARTS:
        state = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in models[part].state_dict().items()}
        shard, size, idx = {}, 0, 0
        for k, v in state.items():
            nb = v.numel() * v.element_size()
            if shard and size + nb > max_file_bytes:
                paths.append(out_dir / f"{part}.{idx}.safetensors")
                save_file(shard, str(paths[-1]))
                shard, size, idx = {}, 0, idx + 1
            shard[k], size = v, size + nb
        paths.append(out_dir / f"{part}.{idx}.safetensors")
        save_file(shard, str(paths[-1]))
    return paths


def assemble_checkpoint(weights_dir: Path, record: dict, out_root: Path, base_dir: Path | None = None) -> Path:
    """Build the committed checkpoint: factory models (same text encoders) + trained weights, in bf16.

    ``base_dir``: the random checkpoint whose text encoders made the embeddings used in training.
    """
    from safetensors.torch import load_file

    small = SmallModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["model"].items()})
    models = build_models(small)
    if base_dir is not None:  # reuse the exact text encoders the training embeddings came from
        from transformers import CLIPTextModel, T5EncoderModel

        models["text_encoder"] = CLIPTextModel.from_pretrained(base_dir / "FLUX.1-Fill-dev" / "text_encoder")
        models["text_encoder_2"] = T5EncoderModel.from_pretrained(base_dir / "FLUX.1-Fill-dev" / "text_encoder_2")
    for part in TRAINED_PARTS:
        state = {}
        for p in sorted(Path(weights_dir).glob(f"{part}.*.safetensors")):
            state.update(load_file(str(p)))
        models[part].load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    models["vae"].register_to_config(shift_factor=round(record["vae_shift_factor"], 6),
                                     scaling_factor=round(record["vae_scaling_factor"], 6))
    for part in TRAINED_PARTS:  # trained weights ship in bf16; the tiny text encoders stay fp32 so that the
        models[part].to(torch.bfloat16)  # committed fp32 embeddings are exactly what training saw
    save_checkpoint(models, small, out_root)
    return out_root


def check_text_embeddings(model_dir: Path, training_embeddings: Path) -> None:
    """The shipped text encoders must reproduce, bit for bit, the embeddings the transformer was trained on."""
    from safetensors.torch import load_file

    from ..embeddings import encode_prompt

    prompt_embeds, pooled = encode_prompt(model_dir, dtype=torch.float32)
    ref = load_file(str(training_embeddings))
    if not (torch.equal(prompt_embeds, ref["prompt_embeds"]) and torch.equal(pooled, ref["pooled_prompt_embeds"])):
        raise RuntimeError(f"the text encoders in {model_dir} do not reproduce {training_embeddings}: the trained "
                           "transformer would see other conditioning than in training. Assemble from the same factory "
                           "checkpoint the training embeddings came from.")
