"""The toy try-on default model: train it in resumable calls, assemble the committed checkpoint.

    train_default     one training call (``train_run.train_call``): resume, stages, time budget; the state,
                      its log and (after an adapter stage) its LoRA (logo_lora/, tryon_lora/) into a folder
    assemble_default  factory text encoders + the state's shipped weights -> ``checkpoints/toy-tryon``, card,
                      embeddings, loss curve; its adapters beside it (``checkpoints/toy-tryon-logo-lora``)

Held-out quality (masked PSNR / SSIM, logo matching and the logo pass, the VAE's ceiling, data throughput)
is ``default_quality``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint, embeddings, lora, provenance
from . import train_run, train_state, training

TRAINING_EMBEDDINGS = provenance.REPO_ROOT / "embeddings" / "training-text-float32.safetensors"
SAVE_RESERVE_S = 25.0  # of --time-budget, kept for closing the data workers and writing the state


def plot_losses(record: dict, path: Path | None = None):
    """Loss curves of every stage that has steps (smoothed), saved when ``path`` is given."""
    import matplotlib

    matplotlib.use("Agg") if path else None
    import matplotlib.pyplot as plt

    stages = [(s, r["losses"]) for s, r in record["stages"].items() if r["losses"]]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(5 * max(1, len(stages)), 3.5), squeeze=False)
    for ax, (stage, losses) in zip(axes[0], stages, strict=False):
        y = np.asarray(losses)
        k = max(1, len(y) // 100)
        ax.plot(y, alpha=0.3, lw=0.5)
        ax.plot(np.convolve(y, np.ones(k) / k, mode="valid"), lw=1.5)
        ax.set_yscale("log")
        ax.set_title(f"{stage} ({len(y)} steps)")
        ax.set_xlabel("step")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=100)
    return fig


def write_card(out_root: Path, record: dict, extra: dict) -> Path:
    """The card: exactly how the weights were trained (data seed, steps, batch, time per call, device, commit)."""
    card = {k: v for k, v in record.items() if k != "stages"}
    card["stages"] = {s: {k: v for k, v in r.items() if k != "losses"} | {
        "final_loss": float(np.mean(r["losses"][-50:])) if r["losses"] else None} for s, r in record["stages"].items()}
    card.update(extra)
    path = out_root / provenance.CARD_FILE
    path.write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
    return path


def training_embeddings(text_tokens: int) -> Path:
    """The committed training embeddings for a prompt padded to ``text_tokens`` T5 tokens."""
    if text_tokens == checkpoint.FLUX_TEXT_TOKENS:
        return TRAINING_EMBEDDINGS
    return TRAINING_EMBEDDINGS.with_name(f"training-text-{text_tokens}tok-float32.safetensors")


def load_text(embeddings_file: str | Path | None, text_tokens: int = checkpoint.FLUX_TEXT_TOKENS
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 prompt embeddings of the factory text encoders, ``text_tokens`` long (made first if the file is missing;
    ``None``: the committed file for that length)."""
    from safetensors.torch import load_file

    emb_file = Path(embeddings_file) if embeddings_file else training_embeddings(text_tokens)
    if not emb_file.exists():
        print(f"{emb_file} missing: encoding the prompt with the factory checkpoint's text encoders")
        embeddings.build_embeddings(checkpoint.random_checkpoint(checkpoint.SmallModelConfig()), torch.float32,
                                    path=emb_file, max_sequence_length=text_tokens)
    text = load_file(str(emb_file))
    if text["prompt_embeds"].shape[1] != text_tokens:
        raise ValueError(f"{emb_file} holds {text['prompt_embeds'].shape[1]} text tokens but the model is padded to "
                         f"{text_tokens} (--model text_tokens): leave out --embeddings to use (or make) "
                         f"{training_embeddings(text_tokens).name}.")
    return text["prompt_embeds"].float(), text["pooled_prompt_embeds"].float()


def train_config(resume: Path | None, quick: bool, overrides: dict[str, str] | None) -> training.TrainConfig:
    """The resumed run's config (or the defaults), then ``quick`` sizes, then ``overrides`` (fields as text)."""
    cfg = training.TrainConfig()
    if resume is not None:
        cfg = training.TrainConfig(**_record(resume)["config"])
    if quick:
        cfg.vae_steps, cfg.fill_steps, cfg.logo_steps, cfg.tryon_steps = 3, 3, 3, 3
        cfg.vae_batch, cfg.fill_batch, cfg.logo_batch, cfg.tryon_batch, cfg.workers, cfg.log_every = 2, 2, 2, 2, 0, 1
    for k, v in (overrides or {}).items():
        if not hasattr(cfg, k):
            raise ValueError(f"--set {k}={v}: TrainConfig has no field {k!r}; fields: "
                             f"{', '.join(training.TrainConfig.__dataclass_fields__)}.")
        kind = type(getattr(cfg, k))
        if kind is bool and v.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--set {k}={v}: {k} is true or false.")
        setattr(cfg, k, v.lower() in ("true", "1") if kind is bool else kind(v))
    if cfg.fill_noise_draws < 1:
        raise ValueError(f"--set fill_noise_draws={cfg.fill_noise_draws}: each pair needs at least 1 noise draw.")
    return cfg


def model_config(overrides: dict[str, str] | None = None) -> checkpoint.SmallModelConfig:
    """The toy model's shape with ``overrides`` (field -> text; tuples comma-separated, e.g.
    ``vae_block_out_channels=64,128,128,128``), checked against the fields that exist."""
    small = checkpoint.SmallModelConfig()
    fields = {k: getattr(small, k) for k in checkpoint.SmallModelConfig.__dataclass_fields__ if k != "extra"}
    values = {}
    for k, v in (overrides or {}).items():
        if k not in fields:
            raise ValueError(f"--model {k}={v}: SmallModelConfig has no field {k!r}; fields: {', '.join(fields)}.")
        default = fields[k]
        values[k] = tuple(int(x) for x in v.split(",")) if isinstance(default, tuple) else type(default)(v)
    return dataclasses.replace(small, **values)


def recorded_model(record: dict) -> checkpoint.SmallModelConfig:
    """The model shape a training record holds (JSON lists back to the config's tuples)."""
    return checkpoint.SmallModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["model"].items()})


def _record(folder: Path) -> dict:
    path = Path(folder) / train_state.STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {train_state.STATE_FILE} in {folder}: --resume needs the folder a previous "
                                "`train` wrote (its --out).")
    return json.loads(path.read_text())


def train_default(out: str | Path, device: str, embeddings_file: str | Path | None = None, quick: bool = False,
                  overrides: dict[str, str] | None = None, stages: str = "vae,fill", resume: str | Path | None = None,
                  time_budget: float | None = None, optim_dir: str | Path | None = None,
                  init_from: str | Path | None = None, started: float | None = None,
                  save_reserve: float = SAVE_RESERVE_S, model_overrides: dict[str, str] | None = None,
                  finish: bool = False) -> dict:
    """One training call: the state, ``train_log.txt`` (this call's lines after the earlier calls') and, once
    the logo stage has run, ``logo_lora/`` into ``out``.

    ``time_budget``: seconds for the whole call from ``started`` (default: now), of which ``save_reserve`` is
    kept for saving; ``optim_dir``: where the AdamW state is written and, if it matches, read back;
    ``model_overrides``: ``SmallModelConfig`` fields (as text) of a model trained from scratch; ``finish``: a
    stage the budget cannot complete ends with it, its LR decayed linearly to 0 (``training.finish_plan``).
    """
    started = time.time() if started is None else started
    resume = Path(resume) if resume else None
    cfg = train_config(resume, quick, overrides)
    small = model_config(model_overrides)
    if resume is not None and model_overrides:
        raise ValueError(f"--model {sorted(model_overrides)}: a resumed run keeps the model of the state it resumes; "
                         "start a new run (no --resume) to train another shape.")
    if resume is not None:
        small = recorded_model(_record(resume))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    earlier = (resume / "train_log.txt").read_text() if resume and (resume / "train_log.txt").exists() else ""
    deadline = started + time_budget - save_reserve if time_budget else None
    with open(out / "train_log.txt", "w") as log_file:
        log_file.write(earlier)

        def log(msg: str) -> None:
            print(msg, flush=True)
            log_file.write(msg + "\n")
            log_file.flush()

        log(f"call from {resume or 'scratch'}: stages {stages}, budget {time_budget or 'none'} s, device {device}")
        record = train_run.train_call(out, cfg, small, load_text(embeddings_file, small.text_tokens), device,
                                      [s.strip() for s in stages.split(",") if s.strip()], resume,
                                      Path(optim_dir) if optim_dir else None, deadline,
                                      Path(init_from) if init_from else None, log, finish=finish)
        record["calls"][-1]["stamp"] = provenance.stamp(device)
        (out / train_state.STATE_FILE).write_text(json.dumps(record, default=str))
        log("; ".join(f"{s} {r['step']}/{r['total']}{' done' if r['done'] else ''}"
                      for s, r in record["stages"].items()) + f" ({time.time() - started:.0f}s in this call)")
    return record


def shipped_weights(state_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(record, ``part.key`` weights as they ship): a stage in progress gives its EMA, a finished one its frozen."""
    record, ema, _, frozen = train_state.load_state(state_dir)
    return record, {**frozen, **ema}


def vae_ceiling_of_state(state_dir: str | Path, seed: int = 999, count: int = 8) -> dict:
    """``default_quality.vae_ceiling`` of the VAE a training state holds (its EMA while the stage runs), with the
    state's model shape and step: how far a VAE run got, without assembling a checkpoint."""
    from .default_quality import vae_ceiling

    record, weights = shipped_weights(Path(state_dir))
    small = recorded_model(record)
    vae = checkpoint.build_models(small)["vae"]
    vae.load_state_dict({k.removeprefix("vae."): v for k, v in weights.items() if k.startswith("vae.")}, strict=True)
    stage = record["stages"].get("vae", {})
    return {"step": stage.get("step"), "done": stage.get("done"), "vae_block_out_channels": small.vae_block_out_channels,
            "vae_layers_per_block": small.vae_layers_per_block, **vae_ceiling(vae.eval(), seed, count)}


def assemble_checkpoint(weights: dict[str, torch.Tensor], record: dict, out_root: Path,
                        base_dir: Path | None = None) -> Path:
    """Build the committed checkpoint: factory models (same text encoders) + trained weights, in bf16.

    ``base_dir``: the random checkpoint whose text encoders made the embeddings used in training.
    """
    small = recorded_model(record)
    models = checkpoint.build_models(small)
    if base_dir is not None:  # reuse the exact text encoders the training embeddings came from
        from transformers import CLIPTextModel, T5EncoderModel

        models["text_encoder"] = CLIPTextModel.from_pretrained(base_dir / checkpoint.FILL_SUBDIR / "text_encoder")
        models["text_encoder_2"] = T5EncoderModel.from_pretrained(base_dir / checkpoint.FILL_SUBDIR / "text_encoder_2")
    for part in training.TRAINED_PARTS:
        state = {k[len(part) + 1:]: v.float() for k, v in weights.items() if k.startswith(part + ".")}
        if not state:
            raise ValueError(f"the state has no weights for {part}: train stage "
                             f"{'vae' if part == 'vae' else 'fill'} first (or start it with --init-from).")
        models[part].load_state_dict(state, strict=True)
    models["vae"].register_to_config(shift_factor=round(record["vae_shift_factor"], 6),
                                     scaling_factor=round(record["vae_scaling_factor"], 6))
    for part in training.TRAINED_PARTS:  # trained weights ship in bf16; the tiny text encoders stay fp32 so that
        models[part].to(torch.bfloat16)  # the committed fp32 embeddings are exactly what training saw
    checkpoint.save_checkpoint(models, small, out_root)
    return out_root


def check_text_embeddings(model_dir: Path, embeddings_file: Path, rounding: float = 1e-5) -> None:
    """The shipped text encoders must reproduce the embeddings the transformer was trained on: bit for bit, or within
    float rounding (rel-L2 <= ``rounding``: another torch build or CPU computes T5 a few ulps apart), which is said."""
    from safetensors.torch import load_file

    from ..embeddings import encode_prompt
    from ..metrics import rel_l2

    prompt_embeds, pooled = encode_prompt(model_dir, dtype=torch.float32)
    ref = load_file(str(embeddings_file))
    if torch.equal(prompt_embeds, ref["prompt_embeds"]) and torch.equal(pooled, ref["pooled_prompt_embeds"]):
        return
    err = max(rel_l2(prompt_embeds, ref["prompt_embeds"]), rel_l2(pooled, ref["pooled_prompt_embeds"]))
    if err > rounding:
        raise RuntimeError(f"the text encoders in {model_dir} do not reproduce {embeddings_file} (rel-L2 {err:.2e}): "
                           "the trained transformer would see other conditioning than in training. Assemble from the "
                           "same factory checkpoint the training embeddings came from.")
    print(f"note: the text encoders reproduce {embeddings_file.name} within float rounding (rel-L2 {err:.1e}), "
          "not bit for bit: this torch build computes them a few ulps apart")


def write_adapter(state_dir: Path, record: dict, model_dir: Path, out: Path, stage: str) -> Path:
    """The state's ``stage`` LoRA -> ``out`` with a card: its training record and the fingerprint of ``model_dir``,
    the weights it was trained on (``lora.adapter_for`` checks it)."""
    if not (state_dir / f"{stage}_lora" / lora.WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"{state_dir} holds no {stage} adapter: run a training call with --stages {stage} "
                                "first.")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(state_dir / f"{stage}_lora" / lora.WEIGHT_NAME, out / lora.WEIGHT_NAME)
    write_card(out, {**record, "stages": {stage: record["stages"][stage]}},
               {"adapter_of": provenance.portable(str(model_dir)), "base_fingerprint": provenance.fingerprint(model_dir)})
    return out


def adapters_beside(state_dir: Path, record: dict, model_dir: Path) -> list[Path]:
    """Every adapter the state trained, written beside ``model_dir`` (``<model>-logo-lora``, ``<model>-tryon-lora``)."""
    return [write_adapter(state_dir, record, model_dir, lora.adapter_dir(model_dir, stage), stage)
            for stage in lora.ADAPTER_SUFFIXES if (state_dir / f"{stage}_lora").is_dir()]


def assemble_adapters(state_dir: str | Path) -> list[Path]:
    """Only the adapters of a ``--init-from MODEL --stages logo,tryon`` state, written beside MODEL."""
    state_dir = Path(state_dir)
    record = train_state.load_record(state_dir)
    source = record["stages"]["fill"].get("source")
    if not source:
        raise ValueError(f"{state_dir} trained its own Fill transformer: assemble the whole model (without "
                         "--adapters-only), which writes its adapters beside it.")
    model_dir = provenance.REPO_ROOT / source if not Path(source).is_absolute() else Path(source)
    written = adapters_beside(state_dir, record, model_dir)
    if not written:
        raise FileNotFoundError(f"{state_dir} holds no adapter: run a training call with --stages logo or tryon.")
    print("adapters of " + source + ": " + ", ".join(str(w) for w in written))
    return written


def assemble_default(state_dir: str | Path, out: str | Path = checkpoint.TRAINED_DIR,
                     embeddings_file: str | Path | None = None) -> Path:
    """A training state -> a checkpoint at ``out`` with its card, loss curve and the float32 / bfloat16 embedding
    caches (text encoders that do not reproduce the training embeddings are refused); its trained adapters beside it
    (``<out>-logo-lora``, ``<out>-tryon-lora``)."""
    state_dir, out = Path(state_dir), Path(out)
    record, weights = shipped_weights(state_dir)
    base = checkpoint.random_checkpoint(checkpoint.SmallModelConfig())
    assemble_checkpoint(weights, record, out, base_dir=base)
    check_text_embeddings(out, Path(embeddings_file or training_embeddings(recorded_model(record).text_tokens)))
    for dtype in (torch.float32, torch.bfloat16):
        embeddings.build_embeddings(out, dtype, path=embeddings.embeddings_path(out, dtype))
    plot_losses(record, out / "loss_curve.png")
    extra = {"fingerprint": provenance.fingerprint(out), "weights_from": state_dir.name,
             "assembled": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    write_card(out, record, extra)
    adapters_beside(state_dir, record, out)
    print(f"checkpoint at {out}, fingerprint {extra['fingerprint'][:16]}")
    return out
