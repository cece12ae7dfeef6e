"""Train the toy try-on default model, or assemble the committed checkpoint from trained weights.

    # on a GPU (one call of under 10 minutes): writes trained weights, losses and the curve to --out
    python scripts/train_default_model.py train --out /tmp/trained --device cuda
    # here: factory text encoders + trained weights -> checkpoints/toy-tryon, card, embeddings
    python scripts/train_default_model.py assemble --weights /tmp/trained
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab import bench, checkpoint, embeddings, training  # noqa: E402


def cmd_train(args) -> int:
    small = checkpoint.SmallModelConfig()
    cfg = training.TrainConfig()
    if args.quick:  # a smoke test of the whole path on a CPU
        cfg.vae_steps, cfg.fill_steps, cfg.vae_batch, cfg.fill_batch, cfg.workers, cfg.log_every = 3, 3, 2, 2, 0, 1
    for kv in args.set or []:
        k, v = kv.split("=", 1)
        setattr(cfg, k, type(getattr(cfg, k))(v))
    emb_file = Path(args.embeddings)
    if not emb_file.exists():
        print(f"{emb_file} missing: encoding the prompt with the factory checkpoint's text encoders")
        embeddings.build_embeddings(checkpoint.random_checkpoint(small), torch.float32, path=emb_file)
    from safetensors.torch import load_file

    text = load_file(str(emb_file))
    text = (text["prompt_embeds"].float(), text["pooled_prompt_embeds"].float())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "train_log.txt", "w")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    start = time.time()
    models, record = training.train(cfg, small, text, args.device, log)
    record["wall_seconds"] = time.time() - start
    record["stamp"] = bench.stamp(args.device)
    record["embeddings_file"] = emb_file.name
    training.save_trained_weights(models, out)
    (out / "record.json").write_text(json.dumps(record, default=str))
    training.plot_losses(record, out / "loss_curve.png")
    log(f"done in {record['wall_seconds']:.0f}s: vae {record['vae_steps_done']} steps, fill {record['fill_steps_done']} steps")
    return 0


def cmd_assemble(args) -> int:
    weights = Path(args.weights)
    record = json.loads((weights / "record.json").read_text())
    small = checkpoint.SmallModelConfig()
    base = checkpoint.random_checkpoint(small)
    out = Path(args.out)
    training.assemble_checkpoint(weights, record, out, base_dir=base)
    training.check_text_embeddings(out, Path(args.embeddings))
    for dtype in (torch.float32, torch.bfloat16):
        embeddings.build_embeddings(out, dtype, path=embeddings.embeddings_path(out, dtype))
    training.plot_losses(record, out / "loss_curve.png")
    extra = {"fingerprint": checkpoint.fingerprint(out), "weights_from": str(weights.name),
             "assembled": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    training.write_card(out, record, extra)
    print(f"checkpoint at {out}, fingerprint {extra['fingerprint'][:16]}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train both stages and write the weights")
    t.add_argument("--out", required=True)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--embeddings", default="embeddings/training-text-float32.safetensors",
                   help="fp32 prompt embeddings of the factory text encoders (made if missing)")
    t.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    t.add_argument("--set", action="append", help="override a TrainConfig field, e.g. --set fill_time_s=300")
    a = sub.add_parser("assemble", help="build checkpoints/toy-tryon from trained weights")
    a.add_argument("--weights", required=True)
    a.add_argument("--out", default=str(checkpoint.TRAINED_DIR))
    a.add_argument("--embeddings", default="embeddings/training-text-float32.safetensors")
    args = p.parse_args(argv)
    return cmd_train(args) if args.cmd == "train" else cmd_assemble(args)


if __name__ == "__main__":
    raise SystemExit(main())
