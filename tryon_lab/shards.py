"""A safetensors shard checked from its header before anything loads it: truncated, corrupt, or missing from its
index, each named with the fix (the loader's first check on every weighted component)."""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import ModelFolderError


class CorruptCheckpointError(ModelFolderError):
    """A safetensors shard that is truncated or corrupt (checked from its header, before loading)."""


REDOWNLOAD = ("Download or copy that file again from its source (an interrupted download or copy leaves it short; "
              "compare its size with the source's), then load again.")


def check_safetensors_file(path: Path) -> None:
    """A safetensors file's 8-byte header length, JSON header and tensor data size against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path} is truncated: {size} bytes, shorter than the 8-byte safetensors "
                                         f"header length. {REDOWNLOAD}")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CorruptCheckpointError(
                f"{path} is truncated or corrupt: its header length field says {n} bytes but the file holds only "
                f"{size} bytes ({'not a safetensors file?' if n > 100_000_000 else 'cut off in the header'}). "
                f"{REDOWNLOAD}")
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise CorruptCheckpointError(f"{path} is corrupt: its safetensors header cannot be read ({e}). "
                                         f"{REDOWNLOAD}") from e
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise CorruptCheckpointError(
            f"{path} is truncated: its header describes {expected} bytes of tensors but the file holds {size} "
            f"({expected - size} missing). {REDOWNLOAD}")
    if size > expected:
        raise CorruptCheckpointError(f"{path} is corrupt: {size - expected} bytes follow the tensor data its header "
                                     f"describes ({expected} bytes). {REDOWNLOAD}")


def check_shards(folder: Path) -> None:
    """Every safetensors file in ``folder`` readable from its header, every shard an index names present."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{index} is corrupt ({e}). {REDOWNLOAD}") from e
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise CorruptCheckpointError(f"{index} names shards that are not in {folder}: {', '.join(missing)}. "
                                         "Download the missing shards (a partial download), then load again.")
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(path)
