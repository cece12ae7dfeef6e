"""Encode the fixed try-on prompt once with a model's own T5 + CLIP and save the embedding cache.

Works for the embedded default and for real FLUX.1-Fill-dev snapshots on disk (which include
text_encoder/ and text_encoder_2/):

    python scripts/compute_embeddings.py --model /data/flux --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab.checkpoint import TRYON_PROMPT  # noqa: E402
from tryon_lab.experiments.assets import compute_embeddings  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'random', 'trained' or a folder holding FLUX.1-Fill-dev/")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompt", default=TRYON_PROMPT)
    p.add_argument("--out", default=None, help="output .safetensors (default: the cache path the loaders look in)")
    args = p.parse_args(argv)
    compute_embeddings(args.model, args.dtype, args.device, args.prompt, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
