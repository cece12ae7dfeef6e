"""Train the toy try-on default model in resumable calls, or assemble the committed checkpoint from a state.

    # on a GPU, first call (VAE, then Fill until the budget): state + log into --out
    python scripts/train_default_model.py train --out OUT --device cuda --time-budget 540 --stages vae,fill
    # every later call: continue the state the previous call wrote (AdamW state too, if it is still on disk)
    python scripts/train_default_model.py train --resume PREV --out OUT --time-budget 540 --stages fill \
        --optim-dir /tmp/optim
    # the last call of a stage: its LR decays linearly to 0 over the steps this call's budget allows
    python scripts/train_default_model.py train --resume PREV --out OUT --time-budget 540 --stages fill --finish
    # the logo adapter on the trained model (a stage of the same trainer)
    python scripts/train_default_model.py train --resume PREV --out OUT --time-budget 540 --stages logo
    # here: factory text encoders + the state's EMA weights -> checkpoints/toy-tryon (+ the logo LoRA beside it)
    python scripts/train_default_model.py assemble --state OUT
    # adapters for a model that is already assembled (checkpoints/toy-tryon-logo-lora was made so, --stages logo)
    python scripts/train_default_model.py train --init-from checkpoints/toy-tryon --stages logo,tryon --out OUT \
        --device cuda --time-budget 330 --set compile=true --set workers=14
    python scripts/train_default_model.py assemble --state OUT --adapters-only
    # a few steps of every stage on the CPU (smoke test)
    python scripts/train_default_model.py train --out /tmp/quick --device cpu --quick --stages vae,fill,logo
"""

from __future__ import annotations

import time

STARTED = time.time()  # --time-budget counts from here: imports and data workers are part of the call

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tryon_lab import checkpoint  # noqa: E402
from tryon_lab.experiments import default_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="one training call: continue or start, then save the state")
    t.add_argument("--out", required=True, help="folder for the state (state.json, weights-*.safetensors), log, LoRA")
    t.add_argument("--resume", help="a state folder a previous call wrote (its --out)")
    t.add_argument("--stages", default="vae,fill", help="comma-separated, in order: vae, fill, logo, tryon")
    t.add_argument("--time-budget", type=float, help="seconds for the whole call, saving included")
    t.add_argument("--save-reserve", type=float, default=default_model.SAVE_RESERVE_S,
                   help="seconds of the budget kept for saving")
    t.add_argument("--optim-dir", help="write the AdamW state here (and read it back when it matches the state)")
    t.add_argument("--init-from", help="start from a model folder's weights (stages not listed are kept as they are; a "
                   "part of a listed stage that --model gives another shape starts fresh)")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--embeddings", help="fp32 prompt embeddings of the factory text encoders (default: the committed "
                   "file for the model's text_tokens, made if missing)")
    t.add_argument("--finish", action="store_true",
                   help="end the stage in this call: its LR falls linearly to 0 over the steps the budget allows "
                   "(measured on the call's first steps); needs --time-budget")
    t.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    t.add_argument("--set", action="append", default=[], help="override a TrainConfig field, e.g. --set fill_lr=3e-4")
    t.add_argument("--model", action="append", default=[],
                   help="a model shape field for a run from scratch, e.g. --model vae_block_out_channels=64,128,128,128")
    a = sub.add_parser("assemble", help="build checkpoints/toy-tryon from a training state")
    a.add_argument("--state", required=True, help="the state folder of the last training call")
    a.add_argument("--out", default=str(checkpoint.TRAINED_DIR))
    a.add_argument("--adapters-only", action="store_true",
                   help="only the adapters of a `--init-from MODEL --stages logo,tryon` state, written beside MODEL")
    a.add_argument("--embeddings", help="the training embeddings (default: the committed file for the model's text_tokens)")
    c = sub.add_parser("ceiling", help="the VAE round trip of a training state on the held-out pairs (PSNR)")
    c.add_argument("--state", required=True, help="a state folder a `train` call wrote")
    c.add_argument("--pairs", type=int, default=8)
    args = p.parse_args(argv)
    if args.cmd == "train" and (bad := [kv for kv in args.set + args.model if "=" not in kv]):
        p.error(f"--set and --model take FIELD=VALUE, got {bad[0]!r}")
    if args.cmd == "train" and args.finish and not args.time_budget:
        p.error("--finish plans the LR decay to end with the call's budget: give --time-budget SECONDS")
    try:
        run(args)
    except FileNotFoundError as e:  # a wrong folder: its message names it and the fix, a traceback adds nothing
        p.exit(2, f"{p.prog} {args.cmd}: error: {e}\n")
    return 0


def run(args) -> None:
    if args.cmd == "ceiling":
        import json

        print(json.dumps(default_model.vae_ceiling_of_state(args.state, count=args.pairs), indent=1))
    elif args.cmd == "train":
        default_model.train_default(args.out, args.device, args.embeddings, args.quick,
                                    dict(kv.split("=", 1) for kv in args.set), args.stages, args.resume,
                                    args.time_budget, args.optim_dir, args.init_from, STARTED, args.save_reserve,
                                    dict(kv.split("=", 1) for kv in args.model), args.finish)
    elif args.adapters_only:
        default_model.assemble_adapters(args.state)
    else:
        default_model.assemble_default(args.state, args.out, args.embeddings)


if __name__ == "__main__":
    raise SystemExit(main())
