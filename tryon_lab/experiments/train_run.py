"""One training call: restore the state, run the requested stages until done or out of time, save the state.

    train_call(out, cfg, small, text, device, stages, resume=..., optim_dir=..., deadline=...)

A stage in progress is continued from its step with its EMA and LR-schedule position; its data stream continues
at its next unused index. With the AdamW state (``optim_dir``, same step) the continuation is exact; without
it the moments start fresh and the LR ramps up again over ``cfg.rewarm_steps``. Starting a stage closes any
earlier one still in progress (its EMA becomes its final weights), so ``--stages logo`` after an unfinished
``fill`` adapts the model as it is.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint import SmallModelConfig, build_models
from ..provenance import CONFIG_FILE
from ..synthetic import SyntheticConfig
from . import train_data, train_state
from .training import (
    ADAPTER_STAGES,
    STAGE_PARTS,
    STAGES,
    TRAINED_PARTS,
    TrainConfig,
    add_stage_adapter,
    run_stage,
    set_latent_scale,
    stage_params,
)

# A state travels to the next GPU call inside its 64 MiB with the tracked tree (30.4 MiB without the committed
# state it replaces) and the training wheels (diffusers + huggingface-hub, 6.9 MiB): a Fill state fits.
MAX_STATE_BYTES = 26 * 2**20


def new_stage(cfg: TrainConfig, stage: str) -> dict:
    return {"step": 0, "total": getattr(cfg, f"{stage}_steps"), "done": False, "losses": [], "data_next": 0,
            "seconds": 0.0}


def new_record(cfg: TrainConfig, small: SmallModelConfig) -> dict:
    return {"config": asdict(cfg), "model": asdict(small), "active": None, "calls": [],
            "vae_shift_factor": None, "vae_scaling_factor": None, "stages": {s: new_stage(cfg, s) for s in STAGES}}


def _load_parts(models: dict, tensors: dict[str, torch.Tensor]) -> None:
    """``part.key`` tensors into the TRAINED_PARTS they name (whole parts, strictly)."""
    for part in TRAINED_PARTS:
        sd = {k[len(part) + 1:]: v.float() for k, v in tensors.items() if k.startswith(part + ".")}
        if sd:
            models[part].load_state_dict(sd, strict=True)


def _set_params(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ValueError(f"the saved {what} lack {len(missing)} parameter(s), e.g. {missing[0]}: the state was "
                         "written for another model size or rank; resume with the same --set values.")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])


def _frozen_of(models: dict, stage: str) -> dict[str, torch.Tensor]:
    """A finished stage's weights as they ship: bf16 model parts; an adapter in fp32 (it is tiny)."""
    if stage in ADAPTER_STAGES:
        return {k: p.detach().float().cpu().clone() for k, p in stage_params(models, stage).items()}
    return {f"{part}.{k}": v.detach().to(torch.bfloat16).cpu()
            for part in STAGE_PARTS[stage] for k, v in models[part].state_dict().items()}


def init_from_checkpoint(model_dir: Path, models: dict, record: dict, stages: list[str], log=print
                         ) -> dict[str, torch.Tensor]:
    """The trained parts of a model folder that fit this run's ``models``; stages not requested count as done
    (kept). A part of a requested stage that the folder lacks (a folder holding a VAE alone), or that ``--model``
    gives another shape, starts from fresh weights, and the log says so; a kept part must be there and fit."""
    from ..loading import COMPONENTS, load_component

    frozen = {}
    for part in TRAINED_PARTS:
        stage = next(s for s, parts in STAGE_PARTS.items() if part in parts)
        trained = stage in stages
        if not (Path(model_dir) / COMPONENTS[part][0] / part).is_dir():
            if not trained:
                raise FileNotFoundError(f"--init-from: {model_dir} holds no {part}, and stage {stage} is not trained "
                                        f"in this run: add {stage} to --stages, or start from a folder that holds one.")
            log(f"--init-from: {model_dir} holds no {part}: it starts from fresh weights, trained by stage {stage}")
            continue
        weights = load_component(part, Path(model_dir), torch.float32, "cpu", slim=True)[0]
        if {k: v.shape for k, v in weights.state_dict().items()} != \
                {k: v.shape for k, v in models[part].state_dict().items()}:
            if not trained:
                raise ValueError(f"--init-from: the folder's {part} has another shape than this run's model, and "
                                 f"stage {stage} is not trained in this run: give the folder's shape with --model "
                                 f"(its {CONFIG_FILE}), or add {stage} to --stages to train a new {part}.")
            log(f"--init-from: the folder's {part} has another shape than this run's model (--model): it starts "
                f"from fresh weights, trained by stage {stage}")
            continue
        frozen.update({f"{part}.{k}": v.to(torch.bfloat16) for k, v in weights.state_dict().items()})
        if part == "vae":
            record["vae_shift_factor"] = weights.config.shift_factor
            record["vae_scaling_factor"] = weights.config.scaling_factor
    for s in ("vae", "fill"):
        if s not in stages:
            record["stages"][s].update(done=True, source=str(model_dir))
    return frozen


def train_call(out: Path, cfg: TrainConfig, small: SmallModelConfig, text: tuple[torch.Tensor, torch.Tensor],
               device: str, stages: list[str], resume: Path | None = None, optim_dir: Path | None = None,
               deadline: float | None = None, init_from: Path | None = None, log=print,
               max_state_bytes: int = MAX_STATE_BYTES, finish: bool = False) -> dict:
    """Continue (or start) training; writes the state to ``out`` and, with ``optim_dir``, the AdamW state there.
    ``finish``: a stage this call cannot complete by ``deadline`` ends at it, its LR decayed to 0 (``run_stage``)."""
    if finish and deadline is None:
        raise ValueError("finishing a stage in this call needs its time budget (--time-budget): the LR decay is "
                         "planned to end when the budget does.")
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"unknown stage(s) {bad or stages}: choose from {', '.join(STAGES)}, e.g. --stages vae,fill.")
    stages = sorted(stages, key=STAGES.index)
    dev = torch.device(device)
    call_start = time.time()
    if resume is not None:
        record, ema_t, raw_t, frozen = train_state.load_state(Path(resume))
        for s in STAGES:  # a state written before a stage existed gets it fresh; a finishing plan keeps its end
            rec = record["stages"].setdefault(s, new_stage(cfg, s))
            rec["total"] = rec["decay"]["to"] if rec.get("decay") else getattr(cfg, f"{s}_steps")
    else:
        record, ema_t, raw_t, frozen = new_record(cfg, small), {}, {}, {}
    record["config"] = asdict(cfg)
    torch.manual_seed(cfg.model_seed)
    models = build_models(small)
    if init_from is not None and resume is None:
        frozen = init_from_checkpoint(init_from, models, record, stages, log)
    _load_parts(models, frozen)
    place_models(models, dev, cfg)
    if record["vae_shift_factor"] is not None:
        models["vae"].register_to_config(shift_factor=record["vae_shift_factor"],
                                         scaling_factor=record["vae_scaling_factor"])
    recs = record["stages"]
    for s in ADAPTER_STAGES:
        if recs[s]["step"] > 0:  # the adapter exists from an earlier call
            _add_adapter(models, cfg, frozen, s)
    text = tuple(t.to(dev, torch.float32) for t in text)
    syn = SyntheticConfig(height=cfg.height, width=cfg.width)
    fill_pipe = fill_pipeline(models)
    steps_this_call = 0
    active = record["active"]
    for stage in stages:
        rec = recs[stage]
        if rec["done"]:
            continue
        for earlier in (s for s in STAGES[:STAGES.index(stage)] if s not in ADAPTER_STAGES):
            if not recs[earlier]["done"] and earlier != active:
                raise ValueError(f"stage {stage} needs stage {earlier} trained first: add it to --stages, or start "
                                 "from a trained model with --init-from.")
        if active is not None and active != stage:  # close the earlier stage still in progress at its EMA
            _set_params(stage_params(models, active), ema_t, f"EMA of stage {active}")
            frozen.update(_finish(active, models, record, syn, cfg, dev, log))
            active, ema_t, raw_t = None, {}, {}
        if stage in ADAPTER_STAGES:  # only now: the Fill stage trains and saves the transformer without it
            _add_adapter(models, cfg, frozen, stage)
            models["transformer"].set_adapter(stage)  # the other adapter stays out of this stage's passes
        params = stage_params(models, stage)
        for k in params:  # in the models now; saved as this stage's EMA (+ raw), not a second time as kept weights
            frozen.pop(k, None)
        for p in params.values():
            p.requires_grad_(True)
        models_train(models, stage, True)
        opt = torch.optim.AdamW(list(params.values()), lr=getattr(cfg, f"{stage}_lr"),
                                weight_decay=0.0 if stage == "vae" else 0.01,
                                betas=(0.9, 0.999) if stage == "vae" else (0.9, 0.99))
        ema = train_state.make_ema(list(params.values()), cfg.ema_decay)
        if active == stage:  # continue where the last call stopped
            _set_params(params, raw_t or ema_t, f"weights of stage {stage}")
            ema.shadow_params = [ema_t[k].to(dev).float().clone() for k in params]
            ema.optimization_step = rec["step"]
            exact = _load_optim(opt, list(params), optim_dir, stage, rec["step"])
            rec["resumed_at"] = None if exact else rec["step"]
            log(f"{stage}: resuming at step {rec['step']} ({'exact, with AdamW state' if exact else 'fresh AdamW, LR re-warm'})")
        kind = "logos" if stage == "logo" else "pairs"
        batch = getattr(cfg, f"{stage}_batch")
        batches, next_start = train_data.source(kind, cfg.data_seed + STAGES.index(stage), rec["data_next"], batch,
                                                syn, cfg.workers, cfg.pool_pairs, cfg.logo_size, cfg.logo_max_blur)

        def should_stop(done: int, before: int = steps_this_call) -> bool:
            return (cfg.call_steps > 0 and before + done >= cfg.call_steps) or \
                (deadline is not None and time.time() > deadline)

        try:
            n = run_stage(stage, models, fill_pipe, text, batches, rec, cfg, dev, opt, ema, should_stop, log,
                          deadline if finish else None)
        finally:
            batches.close()
        steps_this_call += n
        rec["data_next"] = next_start(n)
        models_train(models, stage, False)
        ema_t = {k: s.detach().float().cpu() for k, s in zip(params, ema.shadow_params, strict=True)}
        raw_t = {k: p.detach().float().cpu() for k, p in params.items()}
        active = stage
        if rec["step"] >= rec["total"]:
            _set_params(params, ema_t, f"EMA of stage {stage}")
            frozen.update(_finish(stage, models, record, syn, cfg, dev, log))
            active, ema_t, raw_t = None, {}, {}
        else:
            if optim_dir is not None:
                _save_optim(opt, list(params), raw_t, Path(optim_dir), stage, rec["step"])
            break
    record["active"] = active
    record["calls"].append({"started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(call_start)),
                            "seconds": time.time() - call_start, "steps": steps_this_call, "device": device})
    record = train_state.save_state(Path(out), record, ema_t, raw_t, frozen, max_state_bytes)
    for s in ADAPTER_STAGES:
        if any(k.startswith(f"{s}.") for k in (*frozen, *ema_t)):
            write_stage_lora(models, {**frozen, **ema_t}, s, Path(out) / f"{s}_lora")
    log(f"state saved to {out}: {record['state_bytes'] / 2**20:.1f} MiB in {len(record['shards'])} shard(s), "
        f"EMA {record['ema_weights']}, raw weights {record['raw_weights']}"
        + (f"; over the {max_state_bytes / 2**20:.0f} MiB a device call can carry back in" if record["over_budget"]
           else ""))
    return record


def _add_adapter(models: dict, cfg: TrainConfig, frozen: dict[str, torch.Tensor], stage: str) -> None:
    """An adapter stage's LoRA on the transformer (once), with its finished weights when ``frozen`` holds them."""
    if stage in (getattr(models["transformer"], "peft_config", None) or {}):
        return
    add_stage_adapter(models["transformer"], stage, getattr(cfg, f"{stage}_rank"), cfg.model_seed)
    models["transformer"].to(next(models["vae"].parameters()).device)
    done = {k: v for k, v in frozen.items() if k.startswith(f"{stage}.")}
    if done:
        _set_params(stage_params(models, stage), done, f"{stage} adapter")


def place_models(models: dict, dev: torch.device, cfg: TrainConfig) -> None:
    """Every part on ``dev``, frozen and in eval mode (a stage unfreezes its own), the transformer compiled if asked."""
    for m in models.values():
        m.to(dev).eval().requires_grad_(False)
    if cfg.compile:  # in place: parameter names, and so the saved state, stay as they are
        models["transformer"].compile(backend=cfg.compile_backend)


def models_train(models: dict, stage: str, on: bool) -> None:
    for part in ("transformer",) if stage in ADAPTER_STAGES else STAGE_PARTS[stage]:
        models[part].train(on)


def fill_pipeline(models: dict):
    """The stock ``FluxFillPipeline`` around the models being trained (no text encoders): its packing helpers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline

    from ..checkpoint import SCHEDULER_CONFIG

    return FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=models["vae"],
                            transformer=models["transformer"], text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None)


def _finish(stage: str, models: dict, record: dict, syn: SyntheticConfig, cfg: TrainConfig, dev, log) -> dict:
    """Freeze a stage at its EMA (bf16-rounded, as it ships); the VAE also gets its latent shift/scale."""
    rec = record["stages"][stage]
    with torch.no_grad():
        for p in stage_params(models, stage).values():
            p.requires_grad_(False)
            if stage not in ADAPTER_STAGES:
                p.copy_(p.to(torch.bfloat16).float())
    if stage == "vae":
        batches, _ = train_data.source("pairs", cfg.data_seed, rec["data_next"], cfg.vae_batch, syn)
        shift, scale = set_latent_scale(models["vae"], batches, dev, seed=cfg.data_seed)
        batches.close()
        record["vae_shift_factor"], record["vae_scaling_factor"] = shift, scale
        log(f"vae latent shift {shift:.4f} scale {scale:.4f}")
    rec["done"] = True
    log(f"{stage} done at step {rec['step']}")
    return _frozen_of(models, stage)


def _save_optim(opt, names: list[str], raw: dict, folder: Path, stage: str, step: int) -> None:
    tensors = {**{f"raw.{k}": v for k, v in raw.items()}, **train_state.optimizer_tensors(opt, names)}
    train_state.save_shards(tensors, folder, "optim")
    (folder / "optim.json").write_text(json.dumps({"stage": stage, "step": step}))


def _load_optim(opt, names: list[str], folder: Path | None, stage: str, step: int) -> bool:
    """AdamW state (and the fp32 raw weights, into the parameters) when ``folder`` holds this stage's step."""
    if folder is None or not (Path(folder) / "optim.json").exists():
        return False
    if json.loads((Path(folder) / "optim.json").read_text()) != {"stage": stage, "step": step}:
        return False
    tensors = train_state.load_shards(Path(folder), "optim")
    params = dict(zip(names, (p for g in opt.param_groups for p in g["params"]), strict=True))
    _set_params(params, {k[4:]: v for k, v in tensors.items() if k.startswith("raw.")}, "optimiser weights")
    return train_state.load_optimizer_tensors(opt, names, tensors)


def write_stage_lora(models: dict, tensors: dict[str, torch.Tensor], stage: str, folder: Path) -> Path:
    """An adapter stage's LoRA (``stage.*`` tensors) in the diffusers Flux LoRA format, as ``lora.make_lora``
    writes one."""
    from diffusers import FluxFillPipeline
    from peft import get_peft_model_state_dict

    from ..lora import WEIGHT_NAME

    transformer, params = models["transformer"], stage_params(models, stage)
    saved = {k: p.detach().clone() for k, p in params.items()}
    _set_params(params, {k: v for k, v in tensors.items() if k.startswith(f"{stage}.")}, "adapter")
    state = {k: v.detach().float().cpu().clone()  # a copy: the parameters are put back below
             for k, v in get_peft_model_state_dict(transformer, adapter_name=stage).items()}
    _set_params(params, saved, "adapter")
    config = transformer.peft_config[stage]
    FluxFillPipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                       transformer_lora_adapter_metadata=config.to_dict(), weight_name=WEIGHT_NAME)
    return folder
