"""Where a Fill training step's time goes: samples/s, the frozen VAE's share and the top kernels, per setting.

A sample is one (pair, noise level) the transformer trains on: ``two_noise_draws`` gives each encoded pair two.

    python scripts/probe_train_step.py --device cuda --batches 128,512 --settings default,encode_bf16 \
        --set compile=true --set workers=14 --model vae_block_out_channels=32,64,128 \
        --model vae_layers_per_block=2 --model text_tokens=32 --out benchmarks/probe_train_step.json

Random weights of the given shape (timings only); the step is the trainer's own (``training.stage_loss``, AdamW,
EMA), on batches from the trainer's data workers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tryon_lab import provenance  # noqa: E402
from tryon_lab.checkpoint import build_models  # noqa: E402
from tryon_lab.experiments import default_model, train_data, train_run, train_state, training  # noqa: E402
from tryon_lab.synthetic import SyntheticConfig  # noqa: E402

SETTINGS = {"default": {}, "encode_bf16": {"fill_encode_bf16": True}, "two_noise_draws": {"fill_noise_draws": 2}}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def probe(cfg: training.TrainConfig, models: dict, text, dev: torch.device, steps: int, warm: int) -> dict:
    """Warm-up, then ``steps`` timed training steps, the VAE encode alone over as many batches, a profile of 3."""
    fill_pipe = train_run.fill_pipeline(models)
    params = list(training.stage_params(models, "fill").values())
    opt = torch.optim.AdamW(params, lr=1e-4)
    ema = train_state.make_ema(params, cfg.ema_decay)
    batches, _ = train_data.source("pairs", cfg.data_seed, 0, cfg.fill_batch, SyntheticConfig(cfg.height, cfg.width),
                                   cfg.workers)
    waited = 0.0

    def step(i: int) -> None:
        nonlocal waited
        t = time.perf_counter()
        b = next(batches)
        waited += time.perf_counter() - t
        training.train_step("fill", models, fill_pipe, text, b, cfg, dev, opt, ema, params,
                            training.generator(0, i, dev))

    try:
        for i in range(warm):
            step(i)
        _sync(dev)
        waited, t0 = 0.0, time.perf_counter()
        for i in range(steps):
            step(warm + i)
        _sync(dev)
        step_s = (time.perf_counter() - t0) / steps
        data_s = waited / steps
        b = next(batches)
        training.encode_batch(fill_pipe, b, cfg, dev)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            training.encode_batch(fill_pipe, b, cfg, dev)
        _sync(dev)
        encode_s = (time.perf_counter() - t0) / steps
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda"
                                                        else [])
        with torch.profiler.profile(activities=acts) as prof:
            for i in range(3):
                step(warm + steps + i)
            _sync(dev)
    finally:
        batches.close()
    key = "device_time_total" if dev.type == "cuda" else "cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    kernels = [{"name": e.key[:120], "ms_per_step": getattr(e, key) / 3e3, "calls_per_step": e.count / 3}
               for e in rows if dev.type != "cuda" or e.device_type == torch.autograd.DeviceType.CUDA][:15]
    return {"batch": cfg.fill_batch, "noise_draws": cfg.fill_noise_draws, "step_s": step_s,
            "pairs_per_s": cfg.fill_batch / step_s, "samples_per_s": cfg.fill_batch * cfg.fill_noise_draws / step_s,
            "data_wait_s_per_step": data_s, "vae_encode_s_per_step": encode_s,
            "vae_encode_share": encode_s / step_s, "top_kernels": kernels,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="128,512", help="comma-separated Fill batch sizes")
    p.add_argument("--settings", default="default,encode_bf16", help=f"comma-separated, from {', '.join(SETTINGS)}")
    p.add_argument("--steps", type=int, default=20, help="timed steps per batch size and setting")
    p.add_argument("--warm", type=int, default=5, help="untimed steps first (compile, autotune, workers)")
    p.add_argument("--set", action="append", default=[], help="a TrainConfig field, e.g. --set workers=14")
    p.add_argument("--model", action="append", default=[], help="a model shape field, e.g. --model text_tokens=32")
    p.add_argument("--out", help="write the results here (JSON)")
    args = p.parse_args(argv)
    bad = [s for s in args.settings.split(",") if s not in SETTINGS]
    if bad:
        p.error(f"unknown setting(s) {bad}: choose from {', '.join(SETTINGS)}")
    dev = torch.device(args.device)
    cfg = default_model.train_config(None, False, dict(kv.split("=", 1) for kv in args.set))
    small = default_model.model_config(dict(kv.split("=", 1) for kv in args.model))
    torch.manual_seed(0)
    models = build_models(small)
    train_run.place_models(models, dev, cfg)
    for prm in training.stage_params(models, "fill").values():
        prm.requires_grad_(True)
    train_run.models_train(models, "fill", True)
    text = tuple(t.to(dev, torch.float32) for t in default_model.load_text(None, small.text_tokens))
    runs = []
    result = {"stamp": provenance.stamp(args.device), "model": f"random weights, shape {vars(small)}",
              "config": {k: v for k, v in vars(cfg).items() if k in ("compile", "workers", "height", "width")},
              "runs": runs}
    for batch in (int(b) for b in args.batches.split(",")):
        for name in args.settings.split(","):
            run = {"setting": name, **probe(replace(cfg, fill_batch=batch, **SETTINGS[name]), models, text, dev,
                                             args.steps, args.warm)}
            print(f"batch {batch} {name}: {run['samples_per_s']:.0f} samples/s ({run['pairs_per_s']:.0f} pairs/s), "
                  f"step {run['step_s'] * 1e3:.0f} ms, "
                  f"VAE encode {run['vae_encode_s_per_step'] * 1e3:.0f} ms ({run['vae_encode_share']:.0%}), "
                  f"data wait {run['data_wait_s_per_step'] * 1e3:.0f} ms", flush=True)
            runs.append(run)
            if args.out:  # after every run: a call stopped part-way keeps what it measured
                Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
