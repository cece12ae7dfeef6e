"""Past one GPU: one image over several GPUs, and sweeps / TeaCache calibration spread over a Ray cluster.

One image, several GPUs: diffusers' context parallelism (``ContextParallelConfig`` + ``enable_parallelism`` on
the transformer). Every rank holds the whole (slim, optionally FP8) model; the transformer's input tokens are
split over the ranks and attention exchanges them: Ulysses by all-to-all over heads, ring by passing K/V around.
Launch one process per GPU with ``torchrun`` (``scripts/run_context_parallel.py``); every rank computes the same
noise (CPU generators), the same Redux tokens and the same decoded image, rank 0 saves it.

Sweeps and calibration: each sweep point (one sub-run folder, its notebooks run as in a sequential sweep) is one
Ray task, each TeaCache calibration request one call on a Ray actor that loaded the slim pipeline once; both hold
one GPU each. Ray's own retries (``max_retries`` / ``max_task_retries`` with ``retry_exceptions``) re-run a failed
point or request once; after that it is recorded as failed and the rest is kept.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch

# attention backends whose kernel returns the log-sum-exp that ring attention merges partial results with
RING_BACKEND = "_native_cudnn"  # torch's cuDNN SDPA (bf16/fp16 on CUDA); "flash" / "_native_flash" also work


# ----------------------------------------------------------------------------- context parallelism
@dataclass
class ContextParallel:
    """How one image is split over ``ring_degree * ulysses_degree`` processes (one per GPU).

    Ulysses runs on diffusers' ``native`` backend (torch SDPA, any device); ring (and ring x Ulysses) needs a
    backend that returns the log-sum-exp, which torch's plain SDPA does not: ``_native_cudnn`` by default.
    ``anything``: diffusers' ``ulysses_anything`` / ``ring_anything``, so token counts need not divide by the
    degree (the try-on's 512 T5 + 729 Redux text tokens are odd); it needs one of the two degrees to be 1.
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    attention_backend: str | None = None
    anything: bool = True

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def backend(self) -> str:
        return self.attention_backend or ("native" if self.ring_degree == 1 else RING_BACKEND)

    def diffusers_config(self):
        from diffusers import ContextParallelConfig

        one_kind = self.ulysses_degree == 1 or self.ring_degree == 1
        return ContextParallelConfig(ring_degree=self.ring_degree, ulysses_degree=self.ulysses_degree,
                                     ulysses_anything=self.anything and one_kind and self.ulysses_degree > 1,
                                     ring_anything=self.anything and one_kind and self.ring_degree > 1)


def context_parallel_problem(transformer: torch.nn.Module, cp: ContextParallel, world_size: int) -> str | None:
    """Why ``cp`` cannot run on this transformer and process group, or None (checked before any hook is set)."""
    if cp.world_size != world_size:
        return (f"ring_degree x ulysses_degree = {cp.world_size}, but {world_size} processes were started; "
                f"launch with torchrun --nproc-per-node {cp.world_size}.")
    heads = transformer.config.num_attention_heads
    if heads % cp.ulysses_degree:
        return f"Ulysses splits the {heads} attention heads; ulysses_degree {cp.ulysses_degree} does not divide them."
    if cp.ring_degree > 1 and cp.backend == "native":
        return "ring attention needs a backend that returns the log-sum-exp (e.g. _native_cudnn, flash); native does not."
    return None


def init_distributed() -> tuple[int, int, str]:
    """Join the process group ``torchrun`` describes (NCCL on GPUs, gloo on CPU); returns (rank, world, device)."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if cuda:
        torch.cuda.set_device(local)
    return rank, dist.get_world_size(), f"cuda:{local}" if cuda else "cpu"


@contextmanager
def _one_cpu_device() -> Iterator[None]:
    """diffusers places a rank on device ``rank % torch.accelerator.device_count()``, which is 0 on a machine
    without an accelerator (ZeroDivisionError); there the one device is the CPU, so count one while it sets up."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        yield


def enable_context_parallel(transformer: torch.nn.Module, cp: ContextParallel) -> torch.nn.Module:
    """Apply diffusers' context parallelism to a loaded (and, if wanted, FP8-quantized) transformer, in place.

    Call inside an initialised process group, after quantizing and before compiling: the hooks split the
    inputs and gather ``proj_out`` around whatever the blocks are.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("context parallelism needs a process group: launch with torchrun and call init_distributed().")
    if problem := context_parallel_problem(transformer, cp, dist.get_world_size()):
        raise ValueError(f"context parallelism: {problem}")
    transformer.set_attention_backend(cp.backend)
    with _one_cpu_device():
        transformer.enable_parallelism(config=cp.diffusers_config())
    return transformer


def compile_problem(cp: ContextParallel, compile: str) -> str | None:
    """Why ``compile`` cannot be combined with ``cp``, or None."""
    if compile != "none" and cp.anything:
        return ("torch.compile cannot trace diffusers' ulysses_anything / ring_anything attention (it exchanges "
                "token counts through the process group); compile needs anything=False, i.e. image and text "
                "token counts divisible by the degree (the try-on's 512 + 729 text tokens are not divisible by 2).")
    return None


def load_slim_parallel(model_dir: str | Path, cp: ContextParallel, dtype: torch.dtype = torch.bfloat16,
                       quant: str = "none", compile: str = "none", compile_backend: str = "inductor",
                       embeddings_file: str | Path | None = None):
    """The slim pipeline on this rank's device with context parallelism on: ``pipeline.tryon`` runs it as is.

    Order: slim load (cached embeddings) -> FP8 (``speed.quantize_transformer``) -> context parallelism ->
    regional / full compile (``speed.compile_transformer``). Every rank must call it (torchrun).
    """
    from .loading import load_slim
    from .speed import compile_transformer, quantize_transformer

    if problem := compile_problem(cp, compile):
        raise ValueError(problem)
    _, _, device = init_distributed()
    pipe = load_slim(model_dir, dtype, device, embeddings_file)
    quantize_transformer(pipe.transformer, quant)
    enable_context_parallel(pipe.transformer, cp)
    compile_transformer(pipe.transformer, compile, backend=compile_backend)
    return pipe


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


def _runtime_env() -> dict:
    """The workbench's own settings (model and cache folders) travel with every task."""
    return {"env_vars": {k: v for k, v in os.environ.items() if k.startswith("TRYON_LAB_")}}


def _error_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


# ----------------------------------------------------------------------------- Ray: sweep points
class PointFailed(RuntimeError):
    """A sweep point whose run did not finish ok; raising it lets Ray retry, ``archive`` keeps its folder."""

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


def run_point(sweep_dir: str, sub: str, jobs: Sequence, name: str, kernel: str, command: str | None,
              point: dict) -> bytes | None:
    """Ray task: one sweep point, exactly as ``runs.sweep`` runs it sequentially.

    Where the sweep folder is visible (this machine, a shared filesystem) the point runs in place and nothing is
    returned; on another node it runs at the same path there and comes back as a tar. Repo, notebooks and models
    must sit at the same paths on every node.
    """
    from . import runs

    target = Path(sweep_dir) / sub
    shared = (Path(sweep_dir) / "sweep.json").is_file()
    shutil.rmtree(target, ignore_errors=True)  # a retry starts from a clean folder
    manifest = runs._run_in(target, jobs, f"{name}/{sub}", kernel, False, command, {"sweep_point": point})
    archive = None
    if not shared:
        archive = pack(target)
        shutil.rmtree(target, ignore_errors=True)
    if manifest["status"] != "ok":
        bad = [f"{e['stem']}: {e.get('error')}" for e in manifest["notebooks"] if e["status"] != "ok"]
        raise PointFailed(f"{sub}: {manifest['status']} ({'; '.join(bad)})", archive)
    return archive


def run_sweep_ray(sweep_dir: Path, name: str, points: Sequence[tuple[str, dict, Sequence]], kernel: str = "python3",
                  command: str | None = None, address: str | None = None, gpus: float | None = None,
                  retries: int = 1, progress: bool = True) -> dict[str, str]:
    """Run ``(sub, point, jobs)`` sweep points as Ray tasks into ``sweep_dir``; returns {sub: error} of failures.

    Each point is retried ``retries`` times by Ray (a failed notebook or a lost worker); a point that still fails
    keeps its last attempt's folder and its error, the others are unaffected. tqdm counts finished points.
    """
    from tqdm.auto import tqdm

    failures: dict[str, str] = {}
    with ray_session(address) as ray:
        task = ray.remote(run_point).options(max_retries=retries, retry_exceptions=True,
                                             runtime_env=_runtime_env(), **task_resources(ray, gpus))
        subs = {task.remote(str(sweep_dir), sub, jobs, name, kernel, command, point): sub for sub, point, jobs in points}
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
                        failures[sub] = _error_line(e)
                    if archive:
                        unpack(archive, sweep_dir / sub)
                    bar.update(1)
                    bar.set_postfix(failed=len(failures))
            except KeyboardInterrupt:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
    return failures


# ----------------------------------------------------------------------------- Ray: TeaCache calibration
class Calibrator:
    """Ray actor: the slim pipeline loaded once on the actor's GPU (or the CPU), then one request per call."""

    def __init__(self, model_dir: str, dtype: str, embeddings_file: str | None = None, threads: int | None = None):
        from .loading import load_slim

        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_slim(model_dir, getattr(torch, dtype), device, embeddings_file)

    def calibrate(self, request, settings):
        from .teacache import calibrate

        return calibrate(self.pipe, [request], settings)


def merge_calibrations(parts: Sequence, names: Sequence[str]):
    """One ``Calibration`` from per-request ones (in request order), refusing parts from different setups."""
    first = parts[0]
    for p in parts[1:]:
        same = (p.steps, p.guidance_scale, p.resolution, p.fingerprint, p.dtype)
        if same != (first.steps, first.guidance_scale, first.resolution, first.fingerprint, first.dtype):
            raise ValueError("calibration parts differ in model, steps, guidance, resolution or dtype; not merged.")
    requests = [{**p.requests[0], "name": n} for p, n in zip(parts, names, strict=True)]
    return replace(first, requests=requests)


def calibrate_ray(model_dir: str | Path, requests: Sequence, settings, dtype: torch.dtype = torch.bfloat16,
                  workers: int | None = None, address: str | None = None, gpus: float | None = None,
                  retries: int = 1, embeddings_file: str | Path | None = None, threads: int | None = None,
                  progress: bool = True):
    """``teacache.calibrate`` with the requests spread over Ray actors (one GPU each, ``workers`` of them: by
    default one per GPU in the cluster, else one per CPU). Returns ``(calibration, failures)``: the calibration
    holds the requests that succeeded, in their order, with the same values a sequential ``calibrate`` gives;
    ``failures`` lists ``{"name", "seed", "error"}`` of those that failed twice (after Ray's retry).
    """
    from ray.util import ActorPool
    from tqdm.auto import tqdm

    from .embeddings import dtype_name

    names = [r.name or f"request{i}" for i, r in enumerate(requests)]
    parts, ok_names, failures = [], [], []
    with ray_session(address) as ray:
        res = task_resources(ray, gpus)
        slots = ray.cluster_resources().get("GPU" if "num_gpus" in res else "CPU", 1) / next(iter(res.values()))
        n = max(1, min(len(requests), workers or int(slots)))
        actor = ray.remote(Calibrator).options(max_restarts=retries, max_task_retries=retries,
                                               runtime_env=_runtime_env(), **res)
        pool = ActorPool([actor.remote(str(model_dir), dtype_name(dtype),
                                       None if embeddings_file is None else str(embeddings_file), threads)
                          for _ in range(n)])
        for r in requests:
            pool.submit(lambda a, r: a.calibrate.options(retry_exceptions=True).remote(r, settings), r)
        for r, name in tqdm(list(zip(requests, names, strict=True)), desc="calibration (Ray)", unit="request",
                            disable=not progress):
            try:
                parts.append(pool.get_next())
                ok_names.append(name)
            except ray.exceptions.RayError as e:
                failures.append({"name": name, "seed": int(r.seed), "error": _error_line(e)})
    for f in failures:
        warnings.warn(f"calibration request {f['name']} failed twice: {f['error']}", stacklevel=2)
    if not parts:
        raise RuntimeError(f"every calibration request failed; first: {failures[0]['error']}")
    return merge_calibrations(parts, ok_names), failures
