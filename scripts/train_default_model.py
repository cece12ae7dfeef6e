"""Train the toy try-on default model, or assemble the committed checkpoint from trained weights.

    # on a GPU (one call of under 10 minutes): writes trained weights, losses and the curve to --out
    python scripts/train_default_model.py train --out /tmp/trained --device cuda
    # here: factory text encoders + trained weights -> checkpoints/toy-tryon, card, embeddings
    python scripts/train_default_model.py assemble --weights /tmp/trained
    # a few steps of each stage on the CPU (smoke test)
    python scripts/train_default_model.py train --out /tmp/quick --device cpu --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tryon_lab import checkpoint  # noqa: E402
from tryon_lab.experiments import default_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train both stages and write the weights")
    t.add_argument("--out", required=True)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--embeddings", default=str(default_model.TRAINING_EMBEDDINGS),
                   help="fp32 prompt embeddings of the factory text encoders (made if missing)")
    t.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    t.add_argument("--set", action="append", default=[], help="override a TrainConfig field, e.g. --set fill_time_s=300")
    a = sub.add_parser("assemble", help="build checkpoints/toy-tryon from trained weights")
    a.add_argument("--weights", required=True)
    a.add_argument("--out", default=str(checkpoint.TRAINED_DIR))
    a.add_argument("--embeddings", default=str(default_model.TRAINING_EMBEDDINGS))
    args = p.parse_args(argv)
    if args.cmd == "train":
        default_model.train_default(args.out, args.device, args.embeddings, args.quick,
                                    dict(kv.split("=", 1) for kv in args.set))
    else:
        default_model.assemble_default(args.weights, args.out, args.embeddings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
