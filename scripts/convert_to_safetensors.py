"""Convert a component folder's pickle weights (.bin/.pt/.ckpt) to safetensors, once.

Pickle files can run code when loaded, so they are opened with ``weights_only=True`` (plain tensors only) and
rewritten as safetensors beside them; the pickle is renamed ``*.pickle-backup``
(``tryon_lab.experiments.assets.convert_to_safetensors``).

    python scripts/convert_to_safetensors.py /data/flux/FLUX.1-Fill-dev/vae
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tryon_lab.experiments.assets import convert_to_safetensors  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path)
    args = p.parse_args(argv)
    for f in args.folders:
        convert_to_safetensors(f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
