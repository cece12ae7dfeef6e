"""Redux (SigLIP + embedder) in a process of its own, so a serving process never imports transformers.

SigLIP is a transformers model, and transformers costs a fresh process 0.8-2.4 s of imports (H200 serving
runs 16-20) before the first try-on can start. Started first thing, this worker imports transformers, loads
SigLIP and the Redux embedder and initialises CUDA on its own core while the serving process imports diffusers
and reads the transformer; each garment is then a round trip of a PIL image out and its Redux tokens back.
Measured in run 20 (spawned): the serving process's imports fell by about transformers' share, and the worker's
own torch import beside them, the round trip and a slower first transformer call gave it back. ``fork=True``
imports torch once (not yet measured on the GPU).

    RemoteRedux(model_dir, device, dtype)   starts the worker; ``encode(garment)`` -> tokens on the caller's device
    encode_garment(redux, garment)          the one Redux encode: in this process, or by the worker for a RemoteRedux
    main / _serve                           the worker (``python -m tryon_lab.redux_process ARGS``, or forked)

The worker runs the same diffusers code on the same device and dtype as the in-process path, so the tokens are
the same bit for bit (tests/test_fill_setup.py). Messages are length-prefixed pickles over the worker's pipes,
between two processes of the same program.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HEADER = struct.Struct("<Q")


def _send(stream, message: dict) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream) -> dict:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("the other end closed the pipe")
    return pickle.loads(stream.read(_HEADER.unpack(head)[0]))


def encode_garment(redux, garment):
    """Redux tokens of one garment image (1, 729, joint width) on the pipeline's device: SigLIP features through
    the embedder, as ``FluxPriorReduxPipeline`` does before adding the prompt."""
    if isinstance(redux, RemoteRedux):
        return redux.encode(garment)
    import torch

    device = redux.image_encoder.device
    with torch.no_grad():
        hidden = redux.encode_image(garment, device, 1)
        return redux.image_embedder(hidden).image_embeds.to(device=device)


class RemoteRedux:
    """A Redux worker process, started at construction; it is ready when ``wait_ready`` returns (``encode`` waits).

    Spawned (default): a fresh interpreter that applies ``left_out`` / ``import_cache`` as the serving process does
    before its first import; start it before importing torch, so the two processes' imports overlap. ``fork=True``:
    a copy of this process made now, which has this process's imports already (torch: call it right after
    importing torch, before any CUDA call) and brings back transformers if this process left it out."""

    def __init__(self, model_dir: str | Path, device: str, dtype: str, left_out: tuple[str, ...] = (),
                 import_cache: str | Path | None = None, fork: bool = False):
        self.device, self.started = device, time.perf_counter()
        args = {"model_dir": str(model_dir), "device": device, "dtype": dtype, "left_out": list(left_out),
                "import_cache": str(import_cache) if import_cache else None}
        self._log = tempfile.TemporaryFile()  # the worker's messages, quoted if it fails
        if fork:
            self._proc, self._requests, self._replies = _fork(args)
        else:
            self._proc = subprocess.Popen([sys.executable, "-m", "tryon_lab.redux_process", json.dumps(args)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
            self._requests, self._replies = self._proc.stdin, self._proc.stdout
        self.ready: dict | None = None  # the worker's phases once ready: imports (torch), cuda_init, load
        # (diffusers' and transformers' imports with the weights)
        self.waited = 0.0  # seconds callers spent blocked on the worker (its start, then its encodes)
        self.warm_up_s: float | None = None  # the worker's blank encode after it said ready (told with the first tokens)

    def _reply(self) -> dict:
        try:
            message = _receive(self._replies)
        except EOFError:
            self._proc.wait()
            self._log.seek(0)
            tail = self._log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"the Redux process ended (exit code {self._proc.returncode}) before answering; its "
                               f"last messages:\n{tail}\nCheck the model folder's Redux snapshot, or "
                               "build with redux_process=False to load Redux in this process.") from None
        if "error" in message:
            raise RuntimeError(f"the Redux process could not {'encode the garment' if self.ready else 'load Redux'}: "
                               f"{message['error']}")
        return message

    def wait_ready(self) -> dict:
        """Block until the worker has loaded Redux; returns its phases (seconds from its start)."""
        if self.ready is None:
            start = time.perf_counter()
            self.ready = self._reply()["ready"]
            self.waited += time.perf_counter() - start
        return self.ready

    def encode(self, garment):
        """The garment's Redux tokens, computed by the worker, on this process's device."""
        self.wait_ready()
        start = time.perf_counter()
        _send(self._requests, {"garment": garment})
        reply = self._reply()
        self.warm_up_s = reply.get("warm_up_s", self.warm_up_s)
        self.waited += time.perf_counter() - start
        return reply["tokens"].to(self.device)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._requests.close()
            self._proc.wait(timeout=30)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the pipe may be gone already
            pass


class _Forked:
    """The ``Popen`` methods ``RemoteRedux`` uses, for a forked child."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            self.returncode = os.waitstatus_to_exitcode(status) if pid else None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


def _fork(args: dict):
    """A forked worker: (its process handle, the request stream to it, the reply stream from it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("RemoteRedux(fork=True) after this process's first CUDA call: a forked child cannot use "
                           "CUDA then. Fork it right after importing torch, or leave fork=False.")
    requests_in, requests_out = os.pipe()
    replies_in, replies_out = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: serve, then leave without running the parent's exit handlers
        os.close(requests_out)
        os.close(replies_in)
        code = 1
        try:
            sys.stdout = sys.stderr  # this process's stdout is the parent's
            from . import import_cache

            import_cache.bring_back("transformers")  # SigLIP's library, which the serving process left out
            code = _serve(args, os.fdopen(requests_in, "rb"), os.fdopen(replies_out, "wb"), time.perf_counter())
        finally:
            os._exit(code)
    os.close(requests_in)
    os.close(replies_out)
    return _Forked(pid), os.fdopen(requests_out, "wb"), os.fdopen(replies_in, "rb")


def main(argv: list[str] | None = None) -> None:
    """The spawned worker: the serving process's import levers first, then ``_serve`` on stdin and stdout."""
    start = time.perf_counter()
    a = json.loads((argv or sys.argv[1:])[0])
    replies, requests = sys.stdout.buffer, sys.stdin.buffer
    sys.stdout = sys.stderr  # nothing else may write into the reply stream
    from . import import_cache

    if a["left_out"]:
        import_cache.leave_out(tuple(a["left_out"]))
    if a["import_cache"]:
        import_cache.use(a["import_cache"])
    sys.exit(_serve(a, requests, replies, start))


def _serve(a: dict, requests, replies, start: float) -> int:
    """Load Redux, say ready with the phases, then answer each garment with its tokens (on the CPU) until the
    request stream closes; returns the exit code."""
    import torch

    phases = {"imports": time.perf_counter() - start}
    dtype = getattr(torch, a["dtype"])
    if a["device"].startswith("cuda"):
        torch.zeros(1, device=a["device"])  # the CUDA context, here rather than inside the first encode
    phases["cuda_init"] = time.perf_counter() - start - phases["imports"]
    try:  # a bad folder is named, not a library's traceback
        from .loading import REDUX_PARTS, check_folder, load_redux

        redux = load_redux(check_folder(a["model_dir"], REDUX_PARTS), dtype, a["device"])[0]
    except Exception as e:  # told to the caller, who raises it with the fix
        _send(replies, {"error": f"{type(e).__name__}: {e}"})
        return 1
    phases["load"] = time.perf_counter() - start - phases["imports"] - phases["cuda_init"]
    _send(replies, {"ready": {k: round(v, 4) for k, v in phases.items()}})
    # a blank garment first: the first encode's one-off costs (kernel loads, plans) are paid while the caller is
    # still loading, not by its first request (a request arriving meanwhile waits no longer than it would have)
    from PIL import Image

    warm_up = time.perf_counter()
    encode_garment(redux, Image.new("RGB", (64, 64), (128, 128, 128)))
    told = {"warm_up_s": round(time.perf_counter() - warm_up, 4)}  # said with the first tokens
    while True:
        try:
            garment = _receive(requests)["garment"]
        except EOFError:
            return 0
        try:
            with torch.no_grad():
                tokens = encode_garment(redux, garment).cpu()
            _send(replies, {"tokens": tokens, **told})
            told = {}
        except Exception as e:  # told to the caller, who raises it; the worker stays up for the next garment
            _send(replies, {"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
