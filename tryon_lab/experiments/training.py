"""Training the toy try-on model that ships as the default checkpoint (read top to bottom, like nanoGPT).

Stages on procedural pairs (``synthetic.py``), each resumable and cut into time-limited calls:
1. ``vae``: the ``AutoencoderKL`` (L1 + MSE reconstruction, optionally weighted up inside logo boxes, + a small
   KL), then its latent shift/scale measured on data and written into its config, as FLUX's VAE carries them;
2. ``fill``: the FLUX Fill transformer together with the Redux path (SigLIP encoder + ``ReduxImageEncoder``),
   by rectified-flow (flow-matching) loss on the Fill task exactly as the pipeline runs it: the in-context
   diptych garment | target, the masked diptych and the mask packed by the stock
   ``FluxFillPipeline.prepare_mask_latents``, and conditioning = cached text embeddings followed by Redux
   tokens of the garment; optionally the tokens over the target's logos weigh more;
3. ``logo``: a LoRA on the frozen Fill transformer, same loss, on the logo pass's own diptychs
   (``train_data.make_logo_crops``); saved in the diffusers LoRA format ``lora.load_lora`` reads;
4. ``tryon``: a second LoRA (the try-on adapter, as production runs a realism LoRA on the main pass) on the
   frozen transformer, the Fill stage's loss and weights on try-on pairs. Each adapter stage trains its own
   adapter only, with the other one inactive.

Every stage keeps an EMA (shipped) and draws its noise from a generator seeded by its step, so a run cut into
calls and resumed with its optimiser state gives the weights of one uninterrupted run. A finished stage's parts
are frozen at their EMA rounded to bf16: what ships is exactly what the later stages trained against.
The text encoders are not trained: the fixed prompt's embeddings are an input. The recipes around this
(train, assemble, evaluate) are ``default_model`` and ``default_quality``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Attention kernels for training: flash / memory-efficient (and math on a CPU). cuDNN attention's
# backward failed on the H100 here (CUBLAS_STATUS_EXECUTION_FAILED at the first Fill step).
_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
STAGES = ("vae", "fill", "logo", "tryon")  # the order data seeds follow (data_seed + index): append only
STAGE_PARTS = {"vae": ("vae",), "fill": ("transformer", "image_encoder", "image_embedder"), "logo": ("logo",),
               "tryon": ("tryon",)}
ADAPTER_STAGES = ("logo", "tryon")  # LoRAs on the frozen transformer, each a peft adapter named after its stage
TRAINED_PARTS = ("transformer", "vae", "image_encoder", "image_embedder")


@dataclass
class TrainConfig:
    data_seed: int = 1234  # procedural pairs: stage k draws indices from seed data_seed + k
    model_seed: int = 0  # initial weights (checkpoint factory)
    height: int = 192  # procedural image size
    width: int = 128
    vae_steps: int = 4000
    vae_batch: int = 32  # pairs per step; each gives 3 images (garment, person, target)
    vae_lr: float = 3e-4
    vae_warmup: int = 100
    vae_kl_weight: float = 1e-6
    vae_logo_weight: float = 0.0  # extra pixel-loss weight inside logo boxes (garment and target)
    fill_steps: int = 20000
    fill_batch: int = 64
    fill_lr: float = 4e-4
    fill_warmup: int = 200
    fill_logo_weight: float = 0.0  # extra loss weight of a token by the fraction of it inside a target logo box
    fill_mask_weight: float = 0.0  # extra loss weight of a token by the fraction of it inside the inpainting mask
    fill_encode_bf16: bool = False  # the frozen VAE encodes each Fill batch under bf16 autocast
    fill_noise_draws: int = 1  # noise levels drawn per pair in one step: the VAE encode paid once for each of them
    logo_steps: int = 3000
    logo_batch: int = 64  # logo diptychs per step
    logo_lr: float = 1e-3
    logo_warmup: int = 100
    logo_rank: int = 16
    tryon_steps: int = 2000
    tryon_batch: int = 64  # try-on pairs per step
    tryon_lr: float = 1e-3
    tryon_warmup: int = 100
    tryon_rank: int = 16
    logo_size: int = 64  # the logo pass's crop size (``logos.logo_pass(size=...)``)
    logo_max_blur: float = 1.5  # the pass's input crop is the ground truth blurred by up to this radius (px)
    guidance_min: float = 10.0  # guidance embedding sees a range around FLUX Fill's usual 30
    guidance_max: float = 40.0
    ema_decay: float = 0.999
    rewarm_steps: int = 100  # LR ramp after resuming without the optimiser state (fresh AdamW moments)
    workers: int = 12  # processes generating pairs
    pool_pairs: int = 0  # > 0: generate this many pairs once per call and reuse them across epochs
    call_steps: int = 0  # > 0: stop the call after this many optimiser steps (all stages together)
    log_every: int = 50
    compile: bool = False  # torch.compile the transformer (fewer launches per step for this small model)
    compile_backend: str = "inductor"


def _to_tensor(arr: np.ndarray, device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], as ``VaeImageProcessor.preprocess`` normalises."""
    t = torch.from_numpy(arr).to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    return t / 127.5 - 1.0


def _mask(arr: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(arr).to(device).float()[:, None]


def lr_at(step: int, total: int, base: float, warmup: int, resumed_at: int | None = None, rewarm: int = 0,
          decay: dict | None = None) -> float:
    """Linear warm-up then cosine to 0 at ``total``; from ``decay["from"]`` on (a finishing call's plan), linear
    from ``decay["lr"]`` to 0 at ``decay["to"]``; times a ramp over ``rewarm`` steps after ``resumed_at``."""
    if decay is not None and step >= decay["from"]:
        lr = decay["lr"] * max(0, decay["to"] - step) / max(1, decay["to"] - decay["from"])
    else:
        lr = base * (step + 1) / warmup if step < warmup else \
            base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    if resumed_at is not None and rewarm > 0:
        lr *= min(1.0, (step - resumed_at + 1) / rewarm)
    return lr


# A finishing call measures its speed between these two of its steps (the first ones hold compiling), then plans.
FINISH_PROBE = (10, 40)


def finish_plan(step: int, steps_per_s: float, seconds_left: float, lr: float, total: int) -> dict | None:
    """The LR decay a finishing call runs: linear from ``lr`` at ``step`` to 0 at the step its speed reaches by its
    deadline (95 % of the way: the pace varies); None when the stage's own ``total`` comes first."""
    end = step + int(0.95 * steps_per_s * max(0.0, seconds_left))
    return None if end >= total else {"from": step, "to": max(step + 1, end), "lr": lr}


def generator(seed: int, step: int, device) -> torch.Generator:
    """The noise of step ``step``: independent of where a call started, so resumed runs draw the same."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def weighted_mean(err: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``err`` with ``weight`` broadcast over it, normalised so the loss keeps its scale."""
    if weight is None:
        return err.mean()
    weight = weight.expand_as(err)
    return (err * weight).sum() / weight.sum()


def vae_loss(vae, b: dict, cfg: TrainConfig, device, gen: torch.Generator) -> torch.Tensor:
    x = _to_tensor(np.concatenate([b["garment"], b["person"], b["target"]]), device)
    weight = None
    if cfg.vae_logo_weight and "target_logo" in b:
        logo = np.concatenate([b["garment_logo"], np.zeros_like(b["garment_logo"]), b["target_logo"]])
        weight = 1 + cfg.vae_logo_weight * _mask(logo, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
    d = rec.float() - x
    return weighted_mean(d.abs() + d**2, weight) + cfg.vae_kl_weight * post.kl().mean()


@torch.no_grad()
def set_latent_scale(vae, batches, device, n_batches: int = 8, seed: int = 0) -> tuple[float, float]:
    """Measure latent mean/std on data and store them as the VAE's ``shift_factor`` / ``scaling_factor``."""
    zs = []
    for i in range(n_batches):
        b = next(batches)
        x = _to_tensor(np.concatenate([b["person"], b["target"]]), device)
        zs.append(vae.encode(x).latent_dist.sample(generator=generator(seed, i, device)).float())
    z = torch.cat(zs)
    shift = z.mean().item()
    scale = 1.0 / (z - shift).std().item()
    vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(scale, 6))
    return vae.config.shift_factor, vae.config.scaling_factor  # as stored: a resumed run must use the same


def siglip_pixels(garment: torch.Tensor, size: int) -> torch.Tensor:
    """Garment batch in [-1, 1] -> SigLIP input (resize; mean/std 0.5 keeps [-1, 1])."""
    return F.interpolate(garment, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


def fill_batch_inputs(fill_pipe, b: dict, device, dtype=torch.float32, gen: torch.Generator | None = None):
    """Pack one batch exactly as ``FluxFillPipeline`` does: returns (x0, cond, img_ids, garment)."""
    garment, person, target = (_to_tensor(b[k], device) for k in ("garment", "person", "target"))
    mask = (_mask(b["mask"], device) / 255.0 >= 0.5).float()  # the pipeline's mask processor binarises
    n, _, h, w = person.shape
    dip_person = torch.cat([garment, person], dim=3)
    dip_target = torch.cat([garment, target], dim=3)
    mask_full = torch.cat([torch.zeros_like(mask), mask], dim=3)
    masked = dip_person * (1 - mask_full)
    vae = fill_pipe.vae
    c = vae.config.latent_channels
    mask_packed, masked_latents = fill_pipe.prepare_mask_latents(
        mask_full, masked, n, c, 1, h, 2 * w, dtype, device, gen)  # it samples the masked latents
    z = vae.encode(dip_target).latent_dist.sample(generator=gen)
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    lh, lw = z.shape[2], z.shape[3]
    x0 = fill_pipe._pack_latents(z, n, c, lh, lw)
    cond = torch.cat((masked_latents, mask_packed), dim=-1)
    img_ids = fill_pipe._prepare_latent_image_ids(n, lh // 2, lw // 2, device, dtype)
    return x0, cond, img_ids, garment


def token_weights(b: dict, patch: int, device, logo_weight: float = 0.0, mask_weight: float = 0.0
                  ) -> torch.Tensor | None:
    """Per-token loss weight (N, tokens, 1): 1 + ``logo_weight`` x the token's area inside a target logo box +
    ``mask_weight`` x its area inside the inpainting mask (the only tokens the try-on draws), in ``_pack_latents``
    order (row-major over the diptych's ``patch`` x ``patch`` pixel cells); None when both weights are 0."""
    weight = None
    for extra, key, region in ((logo_weight, "target_logo", lambda m: m), (mask_weight, "mask", lambda m: m >= 127.5)):
        if extra and key in b:
            person = region(_mask(b[key], device)).float()
            frac = F.avg_pool2d(torch.cat([torch.zeros_like(person), person], dim=3), patch).flatten(1)[..., None]
            weight = (1 if weight is None else weight) + extra * frac
    return weight


def sample_sigmas(n: int, image_seq_len: int, scheduler_config: dict, device,
                  gen: torch.Generator | None = None) -> torch.Tensor:
    """Logit-normal times, shifted like the inference schedule for this sequence length."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(image_seq_len, scheduler_config["base_image_seq_len"], scheduler_config["max_image_seq_len"],
                         scheduler_config["base_shift"], scheduler_config["max_shift"])
    t = torch.sigmoid(torch.randn(n, device=device, generator=gen))
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


@torch.no_grad()
def encode_batch(fill_pipe, b: dict, cfg: TrainConfig, device, gen: torch.Generator | None = None):
    """``fill_batch_inputs`` through the frozen VAE, under bf16 autocast when ``cfg.fill_encode_bf16``; fp32 out."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.fill_encode_bf16):
        x0, cond, img_ids, garment = fill_batch_inputs(fill_pipe, b, device, gen=gen)
    return x0.float(), cond.float(), img_ids, garment


def fill_loss(models: dict, fill_pipe, text, b: dict, cfg: TrainConfig, device, gen: torch.Generator,
              logo_weight: float = 0.0, mask_weight: float = 0.0, draws: int = 1) -> torch.Tensor:
    """Flow-matching loss of a batch; ``draws`` > 1 repeats each encoded pair with that many (sigma, noise) draws."""
    transformer, encoder, embedder = models["transformer"], models["image_encoder"], models["image_embedder"]
    prompt_embeds, pooled = text
    x0, cond, img_ids, garment = encode_batch(fill_pipe, b, cfg, device, gen)

    def per_draw(t: torch.Tensor | None) -> torch.Tensor | None:  # each pair's rows once per noise draw
        return t.repeat_interleave(draws, 0) if t is not None and draws > 1 else t

    x0, cond = per_draw(x0), per_draw(cond)
    n, seq = x0.shape[0], x0.shape[1]
    sigma = sample_sigmas(n, seq, dict(fill_pipe.scheduler.config), device, gen)
    noise = torch.randn(x0.shape, device=device, generator=gen)
    xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    guidance = torch.rand(n, device=device, generator=gen) * (cfg.guidance_max - cfg.guidance_min) + cfg.guidance_min
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), sdpa_kernel(_SDPA):
        hidden = encoder(pixel_values=siglip_pixels(garment, encoder.config.image_size)).last_hidden_state
        tokens = per_draw(embedder(hidden).image_embeds)
        enc = torch.cat([prompt_embeds.repeat(n, 1, 1), tokens.to(prompt_embeds.dtype)], dim=1)
        txt_ids = torch.zeros(enc.shape[1], 3, device=device)
        pred = transformer(hidden_states=torch.cat([xt, cond], dim=2), timestep=sigma, guidance=guidance,
                           pooled_projections=pooled.repeat(n, 1), encoder_hidden_states=enc, txt_ids=txt_ids,
                           img_ids=img_ids, return_dict=False)[0]
    weight = per_draw(token_weights(b, 2 * fill_pipe.vae_scale_factor, device, logo_weight, mask_weight))
    return weighted_mean((pred.float() - (noise - x0)) ** 2, weight)


def add_stage_adapter(transformer, stage: str, rank: int, seed: int):
    """A peft LoRA named ``stage`` on the attention projections ``lora.load_lora`` targets, made the active one;
    returns its config."""
    from peft import LoraConfig

    from ..lora import DEFAULT_TARGETS

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(DEFAULT_TARGETS))
    torch.manual_seed(seed)
    transformer.add_adapter(config, adapter_name=stage)
    return config


def stage_params(models: dict, stage: str) -> dict[str, torch.nn.Parameter]:
    """``part.key`` -> trainable parameter of a stage (an adapter stage: its own adapter's tensors only)."""
    if stage in ADAPTER_STAGES:
        return {f"{stage}.{k}": p for k, p in models["transformer"].named_parameters()
                if "lora_" in k and f".{stage}." in k}
    return {f"{part}.{k}": p for part in STAGE_PARTS[stage] for k, p in models[part].named_parameters()}


def stage_loss(stage: str, models: dict, fill_pipe, text, b: dict, cfg: TrainConfig, device, gen) -> torch.Tensor:
    if stage == "vae":
        return vae_loss(models["vae"], b, cfg, device, gen)
    if stage in ("fill", "tryon"):
        return fill_loss(models, fill_pipe, text, b, cfg, device, gen, cfg.fill_logo_weight, cfg.fill_mask_weight,
                         cfg.fill_noise_draws)
    return fill_loss(models, fill_pipe, text, b, cfg, device, gen)


def train_step(stage: str, models: dict, fill_pipe, text, b: dict, cfg: TrainConfig, device,
               opt: torch.optim.Optimizer, ema, params: list[torch.nn.Parameter], gen: torch.Generator) -> torch.Tensor:
    """One optimiser step of ``stage`` on batch ``b`` (clipped at norm 1, then the EMA); returns the loss."""
    loss = stage_loss(stage, models, fill_pipe, text, b, cfg, device, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    ema.step(params)
    return loss


@torch.enable_grad()  # training, whatever grad mode the caller left set
def run_stage(stage: str, models: dict, fill_pipe, text, batches, rec: dict, cfg: TrainConfig, device,
              opt: torch.optim.Optimizer, ema, should_stop, log=print, finish_deadline: float | None = None) -> int:
    """Optimiser steps from ``rec['step']`` until the stage's total or ``should_stop(steps_this_call)``.

    ``rec`` (the stage's record: step, total, losses, resumed_at, decay) is updated in place; returns steps done.
    With ``finish_deadline`` (a call that ends the stage), the speed of the call's first steps plans a linear LR
    decay to 0 by then, and the stage's total becomes the step it ends at (``rec["decay"]``; kept on resume).
    """
    params = [p for g in opt.param_groups for p in g["params"]]
    base, warmup = getattr(cfg, f"{stage}_lr"), getattr(cfg, f"{stage}_warmup")
    seed = cfg.data_seed + STAGES.index(stage)
    done, start, waited, probe_start = 0, time.time(), 0.0, 0.0
    while rec["step"] < rec["total"] and not should_stop(done):
        step = rec["step"]
        lr = lr_at(step, rec["total"], base, warmup, rec.get("resumed_at"), cfg.rewarm_steps, rec.get("decay"))
        if finish_deadline is not None and done in FINISH_PROBE:
            if done == FINISH_PROBE[0]:
                probe_start = time.time()
            else:
                rate = (FINISH_PROBE[1] - FINISH_PROBE[0]) / max(1e-9, time.time() - probe_start)
                plan = finish_plan(step, rate, finish_deadline - time.time(), lr, rec["total"])
                if plan is not None:
                    rec["decay"], rec["total"] = plan, plan["to"]
                    log(f"{stage}: finishing in this call: LR {lr:.3g} -> 0 linearly over steps {step}-{plan['to']} "
                        f"({rate:.2f} steps/s, {finish_deadline - time.time():.0f} s left)")
        for g in opt.param_groups:
            g["lr"] = lr
        before = time.time()
        batch = next(batches)  # the time waited here says whether the data workers or the device set the pace
        waited += time.time() - before
        loss = train_step(stage, models, fill_pipe, text, batch, cfg, device, opt, ema, params,
                          generator(seed, step, device))
        rec["losses"].append(float(f"{loss.item():.5g}"))
        rec["step"], done = step + 1, done + 1
        if rec["step"] % cfg.log_every == 0:
            log(f"{stage} step {rec['step']}/{rec['total']} loss {np.mean(rec['losses'][-cfg.log_every:]):.4f} "
                f"({time.time() - start:.0f}s, {done / max(1e-9, time.time() - start):.2f} steps/s, "
                f"{100 * waited / max(1e-9, time.time() - start):.0f}% waiting for data)")
    rec["seconds"] = rec.get("seconds", 0.0) + time.time() - start
    rec["data_wait_s"] = rec.get("data_wait_s", 0.0) + waited
    return done
