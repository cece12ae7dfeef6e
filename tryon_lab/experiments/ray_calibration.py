"""TeaCache calibration spread over Ray: one actor per GPU (or CPU) loads the slim pipeline once, then
calibrates one request per call; the per-request calibrations merge into the one a sequential run gives.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..jobs import error_line, ray_session, runtime_env, task_resources


class Calibrator:
    """Ray actor: the slim pipeline loaded once on the actor's GPU (or the CPU), then one request per call."""

    def __init__(self, model_dir: str, dtype: str, embeddings_file: str | None = None, threads: int | None = None):
        from ..loading import load_slim

        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_slim(model_dir, getattr(torch, dtype), device, embeddings_file)

    def calibrate(self, request, settings):
        from .teacache_fit import calibrate

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
    """TeaCache ``calibrate`` with the requests spread over Ray actors (one GPU each, ``workers`` of them: by
    default one per GPU in the cluster, else one per CPU). Returns ``(calibration, failures)``: the calibration
    holds the requests that succeeded, in their order, with the same values a sequential ``calibrate`` gives;
    ``failures`` lists ``{"name", "seed", "error"}`` of those that failed twice (after Ray's retry).
    """
    from ray.util import ActorPool
    from tqdm.auto import tqdm

    from ..embeddings import dtype_name

    names = [r.name or f"request{i}" for i, r in enumerate(requests)]
    parts, ok_names, failures = [], [], []
    with ray_session(address) as ray:
        res = task_resources(ray, gpus)
        slots = ray.cluster_resources().get("GPU" if "num_gpus" in res else "CPU", 1) / next(iter(res.values()))
        n = max(1, min(len(requests), workers or int(slots)))
        actor = ray.remote(Calibrator).options(max_restarts=retries, max_task_retries=retries,
                                               runtime_env=runtime_env(), **res)
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
                failures.append({"name": name, "seed": int(r.seed), "error": error_line(e)})
    for f in failures:
        warnings.warn(f"calibration request {f['name']} failed twice: {f['error']}", stacklevel=2)
    if not parts:
        raise RuntimeError(f"every calibration request failed; first: {failures[0]['error']}")
    return merge_calibrations(parts, ok_names), failures
