"""Ray job distribution: folders filled by Ray tasks (one GPU each), retried once, brought back to the driver.

A part: it knows nothing about notebooks or pipelines. The caller hands in the function that fills one
folder (``runs.run_sweep_point`` for a sweep point; each TeaCache calibration request goes to an actor in
``experiments.ray_calibration``, which uses ``ray_session`` / ``task_resources`` / ``runtime_env`` from here).
Ray's own retries (``max_retries`` with ``retry_exceptions``) re-run a failed point once; after that it is
recorded as failed and the rest is kept.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# fills ``folder`` (a fresh one) with one point; returns None when it went well, else the error message
PointRunner = Callable[..., "str | None"]


# ----------------------------------------------------------------------------- Ray: common
@contextmanager
def ray_session(address: str | None = None) -> Iterator[Any]:
    """The Ray instance this process already joined, else ``address`` (a cluster), else a new local one.

    Only an instance started here is shut down here.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address=address, include_dashboard=False if address is None else None)
    try:
        yield ray
    finally:
        ray.shutdown()


def task_resources(ray: Any, gpus: float | None = None) -> dict:
    """One GPU per task where the cluster has GPUs (``gpus`` overrides), else one CPU."""
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return {"num_gpus": gpus} if gpus else {"num_cpus": 1}


def runtime_env() -> dict:
    """The workbench's own settings (model and cache folders) travel with every task."""
    return {"env_vars": {k: v for k, v in os.environ.items() if k.startswith("TRYON_LAB_")}}


def error_line(e: BaseException) -> str:
    """One line for a Ray error: the remote exception's type and the last line of its message."""
    cause = getattr(e, "cause", None) or e
    lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


# ----------------------------------------------------------------------------- folders as tasks
ATTEMPTS_FILE = "attempts.jsonl"


def log_attempt(folder: Path, run: str, start: float, error: str | None) -> None:
    """Append one attempt (which point, when it ran, on which host, how it ended) to ``folder/attempts.jsonl``;
    a single short append, so concurrent tasks on one filesystem do not interleave."""
    line = json.dumps({"run": run, "start": start, "end": time.time(), "host": socket.gethostname(),
                       "error": error})
    with open(folder / ATTEMPTS_FILE, "a") as f:
        f.write(line + "\n")


def read_attempts(folder: Path) -> dict[str, list[dict]]:
    """``log_attempt``'s lines by point, in the order they ran; {} where none were written."""
    out: dict[str, list[dict]] = {}
    path = folder / ATTEMPTS_FILE
    for line in path.read_text().splitlines() if path.is_file() else []:
        a = json.loads(line)
        out.setdefault(a["run"], []).append(a)
    return out


class PointFailed(RuntimeError):
    """A point whose folder did not finish ok; raising it lets Ray retry, ``archive`` keeps its folder."""

    def __init__(self, message: str, archive: bytes | None = None):
        super().__init__(message, archive)
        self.archive = archive

    def __str__(self) -> str:
        return self.args[0]


def pack(folder: Path) -> bytes:
    """A folder as an in-memory tar (a run folder travelling from a worker node back to the driver)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname=".")
    return buf.getvalue()


def unpack(data: bytes, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(folder, filter="data")


def run_point(run_one: PointRunner, folder: str, marker: str, args: Sequence) -> bytes | None:
    """Ray task: ``run_one(folder, *args)`` into a clean ``folder``.

    Where ``marker`` (a file the driver wrote next to the folders) is visible (this machine, a shared
    filesystem) the point runs in place and nothing is returned; on another node it runs at the same path
    there and comes back as a tar. Code and inputs must sit at the same paths on every node.
    """
    target = Path(folder)
    shared = Path(marker).is_file()
    shutil.rmtree(target, ignore_errors=True)  # a retry starts from a clean folder
    start = time.time()
    error: str | None = "crashed"
    try:
        error = run_one(target, *args)
    finally:
        if shared:  # where the time went: one line per attempt, read back into sweep.json by the driver
            log_attempt(Path(marker).parent, target.name, start, error)
    archive = None
    if not shared:
        archive = pack(target)
        shutil.rmtree(target, ignore_errors=True)
    if error:
        raise PointFailed(error, archive)
    return archive


def run_sweep_ray(sweep_dir: Path, points: Sequence[tuple[str, Sequence]], run_one: PointRunner,
                  address: str | None = None, gpus: float | None = None, retries: int = 1, progress: bool = True,
                  marker: str = "sweep.json") -> dict[str, str]:
    """Run ``(sub, args)`` points as Ray tasks, ``run_one(sweep_dir / sub, *args)`` each; {sub: error} of failures.

    ``run_one`` must be importable by the workers (a module-level function). Each point is retried
    ``retries`` times by Ray (a failed point or a lost worker); a point that still fails keeps its last
    attempt's folder and its error, the others are unaffected. tqdm counts finished points.
    """
    from tqdm.auto import tqdm

    sweep_dir = Path(sweep_dir)
    failures: dict[str, str] = {}
    with ray_session(address) as ray:
        task = ray.remote(run_point).options(max_retries=retries, retry_exceptions=True,
                                             runtime_env=runtime_env(), **task_resources(ray, gpus))
        subs = {task.remote(run_one, str(sweep_dir / sub), str(sweep_dir / marker), tuple(args)): sub
                for sub, args in points}
        pending = list(subs)
        with tqdm(total=len(pending), desc="sweep (Ray)", unit="point", disable=not progress) as bar:
            try:
                while pending:
                    (ref,), pending = ray.wait(pending, num_returns=1)
                    sub = subs[ref]
                    try:
                        archive = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        cause = getattr(e, "cause", None)
                        archive = cause.archive if isinstance(cause, PointFailed) else None
                        failures[sub] = error_line(e)
                    if archive:
                        unpack(archive, sweep_dir / sub)
                    bar.update(1)
                    bar.set_postfix(failed=len(failures))
            except KeyboardInterrupt:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
    return failures
