"""cache-dit's DBCache + TaylorSeer on our pipeline, in a process of its own: the step cache's best peer.

cache-dit 1.5.3 (vipshop): DBCache always computes the first ``Fn`` blocks, compares their residual with the one
of the last computed step and, under ``residual_diff_threshold``, skips the remaining blocks (the last ``Bn``
excepted); TaylorSeer (order 1) extrapolates the skipped blocks' residual along the last two computed steps
instead of reusing it. Fn=1, Bn=0 without TaylorSeer is diffusers' FirstBlockCache.

cache-dit rewires the transformer's block lists, which breaks diffusers' FirstBlockCache in the same process
afterwards, so ``run`` starts a child process (``python -m tryon_lab.experiments.cache_dit_peer SPEC``): the
requests go over as PNG files, and images, latents and pass counts (``teacache_fit.run_counted``, as for every
other method) come back as files. The child builds the pipeline with the parent's device and dtype only.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

METHOD = "cache_dit_dbcache_taylorseer"
INSTALL = "pip install cache-dit==1.5.3 --no-deps (its dependencies are already ours), or the project's dev extras"


@dataclass(frozen=True)
class PeerConfig:
    """DBCache + TaylorSeer settings; ``thresholds`` are DBCache's ``residual_diff_threshold`` values to sweep."""

    thresholds: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.45)
    fn: int = 1  # first blocks always computed (their residual change decides)
    bn: int = 0  # last blocks always computed
    order: int = 1  # TaylorSeer order; 0: plain DBCache
    warmup: int = 1  # first steps always computed, like TeaCache's always_compute_first

    def __post_init__(self):
        if not self.thresholds or any(not np.isfinite(t) or t < 0 for t in self.thresholds):
            raise ValueError(f"PeerConfig: thresholds must be finite numbers >= 0, got {self.thresholds!r}.")
        if self.fn < 1 or self.bn < 0 or self.order < 0 or self.warmup < 0:
            raise ValueError(f"PeerConfig: need fn >= 1, bn >= 0, order >= 0, warmup >= 0; got {self}.")


def missing() -> str | None:
    """Why the peer cannot run here, or None when it can."""
    if importlib.util.find_spec("cache_dit") is None:
        return f"cache-dit is not installed, so its row is left out: {INSTALL}."
    return None


def runner(config: PeerConfig | None = None):
    """The peer as ``teacache_fit.sweep(peers=[...])`` takes it: ``(pipe, requests, settings) -> runs``."""
    return lambda pipe, requests, settings: run(pipe, requests, settings, config or PeerConfig())


def _image_file(value, path: Path) -> str:
    """A request image as a file the child can open: paths stay, images and arrays are written losslessly."""
    if isinstance(value, str | Path):
        return str(Path(value).resolve())
    img = value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value))
    img.save(path)
    return str(path)


def run(pipe, requests, settings, config: PeerConfig | None = None) -> list[tuple[str, str, float, list, list[int]]]:
    """Every threshold on every request in one child process: ``(method, setting, value, results, passes)``."""
    from ..pipeline import TryOnResult

    if why := missing():
        raise RuntimeError(why)
    config = config or PeerConfig()
    with tempfile.TemporaryDirectory(prefix="cache_dit_peer_") as tmp:
        tmp = Path(tmp)
        reqs = [{"person": _image_file(r.person, tmp / f"{i}_person.png"),
                 "garment": _image_file(r.garment, tmp / f"{i}_garment.png"),
                 "mask": _image_file(r.mask, tmp / f"{i}_mask.png"), "seed": int(r.seed), "name": r.name}
                for i, r in enumerate(requests)]
        spec = {"model_dir": str(pipe.model_dir), "device": str(pipe.device),
                "dtype": str(pipe.dtype).removeprefix("torch."), "settings": {**asdict(settings), "progress": False},
                "requests": reqs, "config": asdict(config), "out": str(tmp)}
        (tmp / "spec.json").write_text(json.dumps(spec))
        done = subprocess.run([sys.executable, "-m", __name__, str(tmp / "spec.json")], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the cache-dit child process failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        out = []
        for k, row in enumerate(json.loads((tmp / "runs.json").read_text())):
            results = [TryOnResult([Image.open(tmp / f"{k}_{i}.png").copy()], [],
                                   torch.load(tmp / f"{k}_{i}.pt", weights_only=True), row["timings"][i])
                       for i in range(len(requests))]
            out.append((METHOD, row["setting"], row["value"], results, row["passes"]))
    return out


def _child(spec_file: str) -> None:
    """In the child: build the pipeline, warm up, run every threshold with cache-dit enabled, write the results."""
    import cache_dit

    from .. import pipeline
    from ..configure import PipelineOptions, build_pipeline
    from .teacache_fit import run_counted

    spec = json.loads(Path(spec_file).read_text())
    cfg, out = spec["config"], Path(spec["out"])
    pipe = build_pipeline(spec["model_dir"], PipelineOptions(device=spec["device"], dtype=spec["dtype"]))
    settings = pipeline.TryOnSettings(**spec["settings"])
    requests = [pipeline.TryOnRequest(**r) for r in spec["requests"]]
    run_counted(pipe, requests, pipeline.TryOnSettings(**{**spec["settings"], "steps": 1}))  # warm-up, as the sweep
    rows = []
    for k, t in enumerate(cfg["thresholds"]):
        cache_dit.enable_cache(
            pipe.fill, cache_config=cache_dit.DBCacheConfig(
                Fn_compute_blocks=cfg["fn"], Bn_compute_blocks=cfg["bn"], residual_diff_threshold=float(t),
                max_warmup_steps=cfg["warmup"], num_inference_steps=settings.steps),
            calibrator_config=cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=cfg["order"]) if cfg["order"] else None)
        try:
            results, passes = run_counted(pipe, requests, settings)
        finally:
            cache_dit.disable_cache(pipe.fill)
        for i, r in enumerate(results):
            r.images[0].save(out / f"{k}_{i}.png")
            torch.save(r.latents, out / f"{k}_{i}.pt")
        name = f"Fn{cfg['fn']}B{cfg['bn']} order{cfg['order']} threshold={t}"
        rows.append({"setting": name, "value": float(t), "passes": passes, "timings": [r.timings for r in results]})
    (out / "runs.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    _child(sys.argv[1])
