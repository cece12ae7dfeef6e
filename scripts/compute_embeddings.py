"""Encode the fixed try-on prompt once with a model's own T5 + CLIP and save the embedding cache.

Works for the embedded default and for real FLUX.1-Fill-dev snapshots on disk (which include
text_encoder/ and text_encoder_2/):

    python scripts/compute_embeddings.py --model /data/flux --dtype bfloat16 --device cuda

A model folder without text encoders (no text_encoder*/, tokenizer*/ or model_index.json in FLUX.1-Fill-dev/):

    python scripts/compute_embeddings.py --model /data/flux --from-tensors my_prompt.safetensors
        your own encoder outputs: a .safetensors holding prompt_embeds (1, seq, joint_attention_dim) and
        pooled_prompt_embeds (1, pooled_projection_dim), checked against the transformer config
    python scripts/compute_embeddings.py --model /data/flux --shape-only
        zeros of those shapes, for smoke runs only: the file's metadata says kind=shape-only and every result's
        model description says SHAPE-ONLY
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
    src = p.add_mutually_exclusive_group()
    src.add_argument("--from-tensors", default=None, metavar="FILE",
                     help="a .safetensors of your own encoder outputs (prompt_embeds, pooled_prompt_embeds)")
    src.add_argument("--shape-only", action="store_true", help="zeros of the right shapes: smoke runs only")
    args = p.parse_args(argv)
    compute_embeddings(args.model, args.dtype, args.device, args.prompt, args.out, args.from_tensors, args.shape_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
