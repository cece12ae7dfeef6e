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

from tryon_lab import checkpoint, embeddings, loading  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'random', 'trained' or a folder holding FLUX.1-Fill-dev/")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompt", default=checkpoint.TRYON_PROMPT)
    p.add_argument("--out", default=None, help="output .safetensors (default: the cache path the loaders look in)")
    args = p.parse_args(argv)
    device, dtype = loading.resolve_device_dtype(args.device, args.dtype)
    model_dir = checkpoint.resolve_model_dir(args.model)
    path = embeddings.build_embeddings(model_dir, dtype, device, args.out, prompt=args.prompt)
    meta = embeddings.read_metadata(path)
    print(f"wrote {path}: prompt_embeds {meta['prompt_embeds_shape']}, pooled {meta['pooled_prompt_embeds_shape']}, "
          f"{meta['dtype']}, encoders {meta['encoder_fingerprint'][:16]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
