"""Quantize a model's FLUX transformer to FP8 once and save it, so later builds load it without quantizing:

    python scripts/save_fp8.py --model /data/flux --fp8 fp8_dynamic_row --out /data/flux-fp8-row

then build with ``PipelineOptions(fp8="fp8_dynamic_row", fp8_weights="/data/flux-fp8-row")``. Dynamic FP8 needs an
FP8 GPU to quantize as well as to run; ``fp8_weight_only`` works anywhere. ``fp8_static_tensor`` calibrates its
activation scales on a 2-step try-on of the bundled sample (``--calibration-height``: at the height you serve):

    python scripts/save_fp8.py --model /data/flux --fp8 fp8_static_tensor --fuse-qkv --calibration-height 1024 \
        --out /data/flux-fp8-static
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab.checkpoint import resolve_model_dir  # noqa: E402
from tryon_lab.configure import save_fp8_weights  # noqa: E402
from tryon_lab.quant import QUANT_MODES  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'trained' or a folder holding FLUX.1-Fill-dev/")
    p.add_argument("--fp8", required=True, choices=QUANT_MODES[1:])
    p.add_argument("--out", required=True, help="folder to write (config.json + fp8_transformer.safetensors)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--fuse-qkv", action="store_true", help="fuse QKV first (then build with fuse_qkv=True too)")
    p.add_argument("--calibration-height", type=int, default=None,
                   help="fp8_static_tensor: the bundled sample's height for the calibration try-on (default: as stored)")
    a = p.parse_args(argv)
    info = save_fp8_weights(resolve_model_dir(a.model), a.out, a.fp8, device=a.device, dtype=a.dtype,
                            fuse_qkv=a.fuse_qkv, calibration=a.calibration_height)
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
