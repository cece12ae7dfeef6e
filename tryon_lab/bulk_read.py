"""Read a whole safetensors file onto a device in one pass, several reads in flight at once.

``safetensors.torch.load_file(path, device="cuda")`` copies tensor by tensor out of the memory map, from pageable
memory, one at a time: on the H200 host the 16.2 GiB FP8 transformer took 7.5 s that way (about 2.2 GB/s). Here
the file's data block is read in chunks by a few threads (``os.preadv`` releases the GIL), each into its own
pinned buffer, and copied from there to one device buffer on its own CUDA stream; every tensor is then a view of
that buffer. On the CPU each tensor is read straight into its own allocation (aligned, as ``load_file`` plus a
copy gives), so CPU kernels see the same memory layout.

safetensors writes its tensors sorted by alignment, so each offset suits its dtype; a view must also start on a
16-byte boundary, as its own allocation would (inductor's compiled code assumes 16-byte aligned inputs), so a
tensor whose offset does not gets a copy of its own instead of a view.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

ALIGN = 16  # bytes: what a view's start must be a multiple of (as torch._inductor assumes of its inputs)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(path: str | Path) -> tuple[dict, int]:
    """(the header: name -> dtype, shape, data_offsets; "__metadata__" too), and where the data block begins."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise OSError(f"file ended {len(view) - got} bytes early at offset {offset + got}: truncated?")
        got += n


def _dtype(name: str, h: dict) -> torch.dtype:
    if h["dtype"] not in DTYPES:
        raise ValueError(f"{name}: safetensors dtype {h['dtype']} is not supported by this reader; read the file "
                         "with safetensors.torch.load_file instead")
    return DTYPES[h["dtype"]]


def tensor_views(header: dict, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each tensor of ``header`` as a view of ``data`` (the file's data block, uint8)."""
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        dtype, (begin, end) = _dtype(name, h), h["data_offsets"]
        raw = data[begin:end]
        if begin % ALIGN:  # a view here would be misaligned: a copy of its own
            raw = raw.clone()
        out[name] = raw.view(dtype).reshape(h["shape"])
    return out


def read_safetensors(path: str | Path, device: str | torch.device = "cpu", workers: int = 4,
                     chunk_mib: int = 64) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of the file on ``device`` and the file's ``__metadata__``; values equal ``load_file``'s."""
    device = torch.device(device)
    header, start = read_header(path)
    metadata = header.get("__metadata__") or {}
    size = max((h["data_offsets"][1] for k, h in header.items() if k != "__metadata__"), default=0)
    fd = os.open(path, os.O_RDONLY)
    try:
        if device.type != "cuda":  # the CPU, or another device through the CPU
            tensors = _read_each(fd, header, start, workers)
            return (tensors if device.type == "cpu" else {k: v.to(device) for k, v in tensors.items()}), metadata
        data = torch.empty(size, dtype=torch.uint8, device=device)
        chunk = chunk_mib << 20
        slots: queue.Queue = queue.Queue()  # a pinned buffer and a stream per read in flight
        for _ in range(max(1, min(workers, -(-size // chunk)))):
            slots.put((torch.empty(chunk, dtype=torch.uint8, pin_memory=True), torch.cuda.Stream(device)))

        def copy_chunk(offset: int) -> None:
            n = min(chunk, size - offset)
            buf, stream = slots.get()
            try:
                _pread_into(fd, memoryview(buf.numpy())[:n], start + offset)
                with torch.cuda.stream(stream):
                    data[offset:offset + n].copy_(buf[:n], non_blocking=True)
                stream.synchronize()  # the buffer is free again only once its copy is done
            finally:
                slots.put((buf, stream))

        with ThreadPoolExecutor(workers, thread_name_prefix="bulk-read") as pool:
            list(pool.map(copy_chunk, range(0, size, chunk)))
        return tensor_views(header, data), metadata
    finally:
        os.close(fd)


def _read_each(fd: int, header: dict, start: int, workers: int) -> dict[str, torch.Tensor]:
    """CPU: each tensor read into its own allocation, several at once."""
    out = {name: torch.empty(h["shape"], dtype=_dtype(name, h)) for name, h in header.items()
           if name != "__metadata__"}

    def read_one(name: str) -> None:
        begin, end = header[name]["data_offsets"]
        if end > begin:
            _pread_into(fd, memoryview(out[name].view(-1).view(torch.uint8).numpy()), start + begin)

    with ThreadPoolExecutor(workers, thread_name_prefix="bulk-read") as pool:
        list(pool.map(read_one, out))
    return out


def read_files(paths: list[str | Path], device: str | torch.device = "cpu", chunk_mib: int = 64) -> dict:
    """Every tensor of ``paths`` (safetensors files) on ``device``, merged: {"tensors", "metadata" (the first
    file's), "read_s", "thread" (the one that read them)}; ``chunk_mib``: each read in flight (GPU)."""
    import time

    start, tensors, metadata = time.perf_counter(), {}, None
    for path in paths:
        more, meta = read_safetensors(path, device, chunk_mib=chunk_mib)
        tensors.update(more)
        metadata = meta if metadata is None else metadata
    return {"tensors": tensors, "metadata": metadata or {}, "read_s": time.perf_counter() - start,
            "thread": threading.current_thread().name}


class _SwitchInterval:
    """The interpreter's GIL switch interval, shortened while any read asks for it and put back after the last.

    A reader thread takes the GIL back a few times a chunk (its Python between the calls that release it); while
    another thread runs Python (a cold process importing diffusers), each take waits for that thread to drop the
    GIL, at most the switch interval (5 ms by default) later. Beside the imports of a cold H200 process the FP8 read
    took 2.4-2.7 s against 1.0-1.2 s alone (run 24); on a 2-core CPU 0.5 ms took such a read from 1.30 to 1.00 s
    (``scripts/probe_early_reads.py --modes early,early-switch0.5``, ``benchmarks/probe_early_reads_cpu.json``).
    """

    def __init__(self) -> None:
        self.lock, self.users, self.before = threading.Lock(), 0, None

    @contextmanager
    def shortened(self, ms: float | None):
        if ms is None:
            yield
            return
        with self.lock:
            if self.users == 0:
                self.before = sys.getswitchinterval()
            self.users += 1
            sys.setswitchinterval(min(ms / 1000, sys.getswitchinterval()))
        try:
            yield
        finally:
            with self.lock:
                self.users -= 1
                if self.users == 0:
                    sys.setswitchinterval(self.before)


SWITCH_INTERVAL = _SwitchInterval()  # one per process, as the interval itself


def prefetch(paths: list[str | Path], device: str | torch.device = "cpu", name: str = "prefetch", chunk_mib: int = 64,
             switch_ms: float | None = None):
    """Start ``read_files`` on a worker thread (named ``name``) and return its future.

    The reads (page cache or disk, then host to device) release the GIL, so they run while the calling thread
    imports diffusers and builds the models on the meta device, which a cold process spends seconds on.
    ``switch_ms``: the GIL switch interval while the read runs (``SWITCH_INTERVAL``; None leaves it alone).
    """

    def read():
        with SWITCH_INTERVAL.shortened(switch_ms):
            return read_files(paths, device, chunk_mib)

    pool = ThreadPoolExecutor(1, thread_name_prefix=name)
    future = pool.submit(read)
    pool.shutdown(wait=False)  # the worker ends with its one task
    return future
