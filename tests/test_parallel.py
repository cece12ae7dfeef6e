"""Tests for tryon_lab.jobs / experiments.ray_calibration: sweeps and TeaCache calibration on Ray (2 CPU workers),
and for tryon_lab.parallel: diffusers' context parallelism on CPU (gloo, world size 2, spawned processes) against
one process.

Ray starts once for the module (``ray.init(num_cpus=2)``, no dashboard) and is shut down after it.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import write_test_notebooks
from tryon_lab import configure, jobs, parallel, runs

HERE = Path(__file__).parent

# Fails on the first ``fail_times`` executions of a point (counted in a file per point), then succeeds.
FLAKY = '''# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% tags=["parameters"]
output_dir = "runs/scratch/flaky"
counter_dir = ""
fail_times = 0

# %%
from pathlib import Path

from tryon_lab.runs import save_metrics

f = Path(counter_dir) / f"attempts-{fail_times}"
attempt = int(f.read_text()) + 1 if f.exists() else 1
f.write_text(str(attempt))
if attempt <= fail_times:
    raise RuntimeError(f"deliberate failure, attempt {attempt}")
save_metrics(output_dir, {"fail_times": fail_times, "attempt": attempt})
'''


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TRYON_LAB_CACHE": os.environ["TRYON_LAB_CACHE"]}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def nbs(tmp_path_factory) -> dict[str, Path]:
    return write_test_notebooks(tmp_path_factory.mktemp("nbs"), {"flaky": FLAKY})


def _points(sweep_dir: Path) -> list[tuple]:
    """What must not depend on how the sweep ran: points, statuses, output hashes, summary rows."""
    rec = json.loads((sweep_dir / "sweep.json").read_text())
    outs = []
    for pt in rec["points"]:
        m = json.loads((sweep_dir / pt["run"] / "manifest.json").read_text())
        assert m["sweep_point"] == pt["params"]
        outs.append((pt["run"], pt["params"], pt["status"],
                     [(e["stem"], e["status"], e["parameters"]["seed"], e["outputs"]) for e in m["notebooks"]]))
    return outs + [list(csv.DictReader((sweep_dir / "summary.csv").open()))]


def test_ray_sweep_matches_sequential(ray_local, nbs, tmp_path, monkeypatch):
    grid = {"seed": [1, 2, 3], "size": [4]}
    seq = runs.sweep([nbs["nb_ok"]], {"input_file": ""}, grid, name="seq", runs_root=tmp_path, progress=False)

    import papermill

    def not_here(*args, **kwargs):
        raise AssertionError("a point ran in the driver process, not in a Ray worker")

    monkeypatch.setattr(papermill, "execute_notebook", not_here)  # the workers import their own papermill
    par = runs.sweep([nbs["nb_ok"]], {"input_file": ""}, grid, name="par", runs_root=tmp_path, progress=False,
                     executor="ray")
    assert json.loads((par / "sweep.json").read_text())["executor"] == "ray"
    a, b = _points(seq), _points(par)
    assert [p[2] for p in a[:-1]] == ["ok"] * 3
    assert a == b  # same sub-runs, statuses, image/metrics sha256, summary values
    assert len({p[3][0][3]["image.png"] for p in b[:-1]}) == 3  # and the seeds did reach the notebooks
    assert all((par / p[0] / "nb_ok" / "nb_ok.html").is_file() for p in b[:-1])


def test_ray_sweep_retries_once_then_records_failure(ray_local, nbs, tmp_path, capsys):
    counters = tmp_path / "counters"
    counters.mkdir()
    # through the CLI; fail_times 0: ok at once, 1: ok on Ray's retry, 2: fails twice -> recorded as failed
    rc = runs.main(["sweep", str(nbs["flaky"]), "-p", f"counter_dir={counters}", "--grid", "fail_times=0,1,2",
                    "--runs-root", str(tmp_path), "--name", "flaky", "--no-progress", "--ray"])
    assert rc == 1  # the sweep exits non-zero
    (sweep_dir,) = tmp_path.glob("*-flaky")
    rec = json.loads((sweep_dir / "sweep.json").read_text())
    assert [pt["status"] for pt in rec["points"]] == ["ok", "ok", "failed"]
    attempts = {ft: int((counters / f"attempts-{ft}").read_text()) for ft in (0, 1, 2)}
    assert attempts == {0: 1, 1: 2, 2: 2}  # retried once, and only once
    assert [pt["attempts"] for pt in rec["points"]] == [1, 2, 2]  # the attempt log agrees, read back by the driver
    assert all(pt["point_s"] > 0 and pt["ended"] >= pt["started"] for pt in rec["points"])
    failed = rec["points"][2]
    assert "deliberate failure, attempt 2" in failed["error"]
    m = json.loads((sweep_dir / failed["run"] / "manifest.json").read_text())  # the last attempt's folder is kept
    assert m["status"] == "failed" and "attempt 2" in m["notebooks"][0]["error"]
    kept = json.loads((sweep_dir / rec["points"][1]["run"] / "flaky" / "metrics.json").read_text())
    assert kept == {"fail_times": 1, "attempt": 2}
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert "failed" in capsys.readouterr().out


def test_pack_unpack_round_trip(tmp_path):
    src = tmp_path / "a"
    (src / "nb").mkdir(parents=True)
    (src / "manifest.json").write_text("{}")
    (src / "nb" / "x.bin").write_bytes(bytes(range(256)))
    jobs.unpack(jobs.pack(src), tmp_path / "b")
    assert (tmp_path / "b" / "nb" / "x.bin").read_bytes() == bytes(range(256))
    assert (tmp_path / "b" / "manifest.json").read_text() == "{}"


# ----------------------------------------------------------------------------- TeaCache calibration on Ray
def test_calibration_on_ray_matches_sequential(ray_local, model_dir, slim):
    from tests.conftest import make_request_images
    from tryon_lab.experiments import ray_calibration, teacache_fit
    from tryon_lab.pipeline import TryOnRequest, TryOnSettings

    settings = TryOnSettings(steps=3, progress=False)
    reqs = [TryOnRequest(*make_request_images(seed=i), seed=i, name=f"r{i}") for i in range(2)]
    bad = TryOnRequest(*make_request_images(seed=9)[:2], "no/such/mask.png", seed=9, name="bad")
    threads = torch.get_num_threads()
    ref = teacache_fit.calibrate(slim, reqs, settings)
    with pytest.warns(UserWarning, match="bad failed twice"):
        cal, failures = ray_calibration.calibrate_ray(model_dir, [reqs[0], bad, reqs[1]], settings, torch.float32,
                                                      workers=2, threads=threads, progress=False)
    assert [f["name"] for f in failures] == ["bad"] and "mask.png" in failures[0]["error"]
    assert [r["name"] for r in cal.requests] == ["r0", "r1"]
    assert cal.requests == ref.requests  # every per-step change, bit for bit
    assert (cal.steps, cal.resolution, cal.fingerprint, cal.dtype) == (ref.steps, ref.resolution, ref.fingerprint,
                                                                       ref.dtype)
    assert len(cal.requests[0]["x"]) == settings.steps - 1 and all(v > 0 for v in cal.requests[0]["y"])


# ----------------------------------------------------------------------------- context parallelism on CPU (gloo)
TEXT_TOKENS = 15  # odd on purpose: needs diffusers' ulysses_anything, as the real 512 + 729 text tokens do


def _tiny_transformer():
    from diffusers import FluxTransformer2DModel

    from tryon_lab.checkpoint import SmallModelConfig, transformer_config

    torch.manual_seed(0)
    cfg = transformer_config(SmallModelConfig(num_layers=1, num_single_layers=2))
    return FluxTransformer2DModel(**cfg).eval().requires_grad_(False)


def _tiny_inputs(model) -> dict:
    c, g = model.config, torch.Generator().manual_seed(1)
    n_img = 64
    return dict(hidden_states=torch.randn(1, n_img, c.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, TEXT_TOKENS, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.7]), guidance=torch.tensor([30.0]),
                img_ids=torch.randn(n_img, 3, generator=g), txt_ids=torch.zeros(TEXT_TOKENS, 3), return_dict=False)


def _rank_env(rank: int, world: int, port: int) -> None:
    """What torchrun sets for each process; without an accelerator, the CPU counts as the one device.

    diffusers places a rank on ``rank % torch.accelerator.device_count()``, which is 0 without an accelerator;
    ``parallel.enable_context_parallel`` refuses that, so this (spawned, short-lived) rank process counts one.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if torch.accelerator.device_count() == 0:
        from unittest import mock

        mock.patch.object(torch.accelerator, "device_count", return_value=1).start()


def _tiny_variant(model, quant: str, compile: str):
    """FP8 weights and regional compilation, as the pipeline applies them (aot_eager: no C++ toolchain needed;
    ``regional+overlap``: inductor, reordering the collectives against independent compute)."""
    from tryon_lab import compiling
    from tryon_lab import quant as quantization

    quantization.quantize_transformer(model, quant)
    how, _, extra = compile.partition("+")
    backend = "inductor" if extra == "overlap" else "aot_eager"
    return model, lambda: compiling.compile_transformer(model, how, backend=backend)


def _compile_settings(compile: str):
    """Inductor's settings while a ``_tiny_variant`` model compiles (at its first call)."""
    from torch._inductor import config as inductor_config

    from tryon_lab.experiments.multi_gpu_bench import comm_overlap_config

    return inductor_config.patch(comm_overlap_config() if compile.endswith("+overlap") else {})


def _transformer_worker(rank: int, world: int, port: int, out: str, quant: str, compile: str, text: int,
                        chunks: int = 0) -> None:
    import torch.distributed as dist

    global TEXT_TOKENS
    TEXT_TOKENS = text
    _rank_env(rank, world, port)
    parallel.init_distributed()
    try:
        model, compile_now = _tiny_variant(_tiny_transformer(), quant, compile)
        parallel.enable_context_parallel(model, parallel.ContextParallel(
            ulysses_degree=world, anything=compile == "none" and not chunks, ulysses_chunks=chunks))
        compile_now()
        graphed = compile.endswith("+graph")  # the step-graph hook outside the split and gather hooks
        if graphed:
            from unittest import mock

            from tests.conftest import graph_on_the_cpu
            from tryon_lab.step_graph import apply_step_graph

            graph_on_the_cpu(lambda obj, name, value: mock.patch.object(obj, name, value).start())
            hook = apply_step_graph(model)
        chunked, ours = [], parallel._chunked_ulysses  # eager calls counted where diffusers' Ulysses calls it
        parallel._chunked_ulysses = lambda *args: (torch.compiler.is_compiling() or chunked.append(1), ours(*args))[1]
        with torch.no_grad(), _compile_settings(compile):
            for _ in range(4 if graphed else 2):  # compiled: the second call is steady; graphed: the 4th replays
                sample = model(**_tiny_inputs(model))[0]
        from diffusers.models import attention_dispatch

        assert (attention_dispatch.TemplatedUlyssesAttention.__name__ == "ChunkedUlysses") == bool(chunks)
        assert bool(chunked) == (bool(chunks) and compile == "none")  # eager: the one-exchange path ran
        if graphed:
            assert (hook.state.captures, hook.state.replays) == (1, 2)
        torch.save(sample.clone(), f"{out}/rank{rank}.pt")  # clone: a gathered output may still be an async tensor
        _leave_together()
    finally:
        dist.destroy_process_group()


def _tryon_worker(rank: int, world: int, port: int, out: str, model_dir: str, anything: bool = True,
                  compile: str = "none", split_vae: bool = False, chunks: int = 0) -> None:
    import torch.distributed as dist

    from tests.conftest import make_request_images
    from tryon_lab.pipeline import TryOnRequest, TryOnSettings, tryon

    _rank_env(rank, world, port)
    try:
        cp = parallel.ContextParallel(ulysses_degree=world, anything=anything, split_vae=split_vae,
                                      ulysses_chunks=chunks)
        pipe = configure.build_pipeline(model_dir, dtype="float32", context_parallel=cp, compile=compile,
                                        compile_backend="aot_eager")
        assert pipe.text_multiple == (1 if anything else world)
        res = tryon(pipe, TryOnRequest(*make_request_images(), seed=5), TryOnSettings(steps=2, progress=False))
        torch.save(res.latents.clone(), f"{out}/rank{rank}.pt")
        _leave_together()
    finally:
        dist.destroy_process_group()


def _leave_together() -> None:
    """Every rank waits here after its last result: gloo aborts a rank (SIGABRT, "terminate called without an active
    exception", seen once on CI) whose peer tears its sockets down while a last exchange is still in flight."""
    import torch.distributed as dist

    dist.barrier()


def _spawn(fn, args: tuple, world: int = 2, timeout: float = 180) -> None:
    """``world`` processes on a free local port; a rank's exception fails the test with its traceback.

    A rank killed by a signal (gloo's "terminate called without an active exception", SIGABRT: seen twice on CI,
    the second time about 2 s after the ranks started, with the ranks leaving together) gets one more try on a
    fresh port, said in the test's output; a second abort, an exception or a wrong result still fails the test.
    """
    import time

    import torch.multiprocessing as mp

    for attempt in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.spawn(fn, args=(world, port, *args), nprocs=world, join=False)
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    pytest.fail(f"context-parallel ranks still running after {timeout} s")
            return
        except mp.ProcessExitedException as e:
            if attempt == 2 or not e.signal_name:
                raise
            print(f"context-parallel rank {e.error_index} died by {e.signal_name} (gloo); starting the ranks again")


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(("quant", "compile", "text", "chunks"),
                         [("none", "none", 15, 0), ("fp8_weight_only", "regional", 16, 0),
                          ("none", "regional+overlap", 16, 0), ("none", "regional+graph", 16, 0),
                          ("none", "none", 16, 2), ("fp8_weight_only", "regional", 16, 1),
                          ("none", "regional+graph", 16, 2)],
                         ids=["eager-odd-tokens", "fp8-regional-compile", "inductor-comm-overlap", "step-graph",
                              "one-qkv-exchange-2-chunks", "one-qkv-exchange-regional", "one-qkv-exchange-step-graph"])
def test_context_parallel_transformer_matches_one_process(tmp_path, monkeypatch, quant, compile, text, chunks):
    torch._dynamo.reset()  # this process's reference compiles from scratch, whatever earlier tests compiled
    monkeypatch.setattr(sys.modules[__name__], "TEXT_TOKENS", text)
    model, compile_now = _tiny_variant(_tiny_transformer(), quant, compile)
    compile_now()
    assert model.config.num_attention_heads % 2 == 0
    with torch.no_grad(), _compile_settings(compile):
        ref = model(**_tiny_inputs(model))[0]
    _spawn(_transformer_worker, (str(tmp_path), quant, compile, text, chunks))
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(outs[0], outs[1])  # proj_out is gathered: every rank holds the whole output
    assert outs[0].shape == ref.shape == (1, 64, model.config.out_channels)
    err = _rel_l2(outs[0], ref)
    print(f"context parallel (Ulysses 2, gloo, {quant}, compile {compile}) vs one process: rel-L2 {err:.3g}")
    assert err < 1e-5


@pytest.mark.parametrize(("anything", "compile", "split_vae", "chunks"),
                         [(True, "none", False, 0), (False, "none", True, 0), (False, "full", False, 0),
                          (False, "none", True, 2)],
                         ids=["ulysses_anything", "even_split_and_vae", "even_split_whole_model_compile",
                              "even_split_one_qkv_exchange"])
def test_context_parallel_tryon_matches_one_process(tmp_path, model_dir, slim, anything, compile, split_vae, chunks):
    """Both ways to split: diffusers' ``ulysses_anything`` and the even split (text padded to the degree); and the
    even split under whole-model compile (torch 2.11's dynamo cannot trace the output gather, so the pipeline
    allows one graph break there)."""
    from tests.conftest import make_request_images
    from tryon_lab.pipeline import TryOnRequest, TryOnSettings, tryon

    ref = tryon(slim, TryOnRequest(*make_request_images(), seed=5), TryOnSettings(steps=2, progress=False)).latents
    _spawn(_tryon_worker, (str(tmp_path), str(model_dir), anything, compile, split_vae, chunks))
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(outs[0], outs[1])
    err = _rel_l2(outs[0], ref)
    print(f"context-parallel try-on (slim pipeline, 2 ranks) vs one process: final-latent rel-L2 {err:.3g}")
    assert err < 1e-4  # fp32 summation order differs (split attention, 1 vs 2 threads); a wrong split gives ~1


def test_context_parallel_config_checks():
    model = _tiny_transformer()
    cp = parallel.ContextParallel(ulysses_degree=2)
    assert cp.backend == "native" and cp.world_size == 2
    cfg = cp.diffusers_config()
    assert (cfg.ulysses_degree, cfg.ring_degree, cfg.ulysses_anything, cfg.ring_anything) == (2, 1, True, False)
    ring = parallel.ContextParallel(ring_degree=2)
    assert ring.backend == parallel.RING_BACKEND and ring.diffusers_config().ring_anything
    hybrid = parallel.ContextParallel(ulysses_degree=2, ring_degree=2).diffusers_config()
    assert not hybrid.ulysses_anything and not hybrid.ring_anything  # diffusers allows neither with both > 1
    assert "--nproc-per-node 2" in parallel.context_parallel_problem(model, cp, 4)
    heads = model.config.num_attention_heads
    assert "does not divide" in parallel.context_parallel_problem(
        model, parallel.ContextParallel(ulysses_degree=heads + 1), heads + 1)
    native_ring = parallel.ContextParallel(ring_degree=2, attention_backend="native")
    assert "log-sum-exp" in parallel.context_parallel_problem(model, native_ring, 2)
    assert parallel.context_parallel_problem(model, cp, 2) is None
    # one all-to-all for Q, K, V: the even split only, in chunks that divide each rank's heads
    assert "anything=False" in parallel.context_parallel_problem(
        model, parallel.ContextParallel(ulysses_degree=2, ulysses_chunks=1), 2)
    per_rank = heads // 2
    assert "choose a divisor" in parallel.context_parallel_problem(
        model, parallel.ContextParallel(ulysses_degree=2, anything=False, ulysses_chunks=per_rank + 1), 2)
    assert parallel.context_parallel_problem(
        model, parallel.ContextParallel(ulysses_degree=2, anything=False, ulysses_chunks=per_rank), 2) is None
    with pytest.raises(RuntimeError, match="torchrun"):
        parallel.enable_context_parallel(model, cp)  # no process group in this process
    assert "anything=False" in parallel.compile_problem(cp, "regional")
    assert parallel.compile_problem(parallel.ContextParallel(ulysses_degree=2, anything=False), "regional") is None
    with pytest.raises(ValueError, match="cannot trace"):
        configure.build_pipeline("unused", context_parallel=cp, compile="regional")  # refused before anything loads


def test_multi_gpu_bench_profiles_each_rank_on_the_cpu(tmp_path):
    """The two-GPU benchmark's own path in small (tiny model, gloo, 2 ranks): with ``--profile`` every rank
    reports device time by kernel kind, and the summary adds a table of it beside the scaling rows."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    results = tmp_path / "results.json"
    common = ["scripts/bench_multi_gpu.py", "--tiny", "--results", str(results), "--work", str(tmp_path / "w")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node"]
    for n, extra in (("1", []), ("2", ["--profile"])):
        p = subprocess.run([*torchrun, n, *common, *extra], cwd=root, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "scripts/bench_multi_gpu.py", "--summarise", "--results", str(results)],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(results.read_text())
    ranks = data["multi_gpu_2gpu"]["sizes"]["tiny"]["profile_per_rank"]
    assert len(ranks) == 2 and all(r["wall_ms_per_step_profiled"] > 0
                                   and sum(r["device_ms_per_step_by_kind"].values()) > 0 for r in ranks)
    one = data["multi_gpu_1gpu"]["sizes"]["tiny"]
    assert "profile_per_rank" not in one  # only when asked
    # the image's time outside the steps, by phase: all there, none longer than the image
    assert set(one["phases_s"]) == {"until_first_step_end_s", "after_last_step_s", "decode_s"}
    assert all(0 < v < one["s_per_image"] for v in one["phases_s"].values())
    assert [r["gpus"] for r in data["multi_gpu"]["profile"]] == [2, 2]
    assert "Where a step's time goes" in (tmp_path / "multi_gpu.md").read_text()


def test_one_exchange_runs_are_named_apart():
    from tryon_lab.experiments import multi_gpu_bench as mgb

    assert mgb.entry_name(2, "fp8_step_graph", True, 1, 2) == "multi_gpu_2gpu_fp8_step_graph_splitvae_qkv2"
    assert mgb.entry_name(2, "fp8_step_graph", True) == "multi_gpu_2gpu_fp8_step_graph_splitvae"  # older runs keep theirs
    entry = {"variant": "fp8_step_graph", "split_vae": True, "context_parallel": {"ring_degree": 1, "ulysses_chunks": 2}}
    assert mgb.label(entry) == "fp8_step_graph+splitvae+qkv2"


def test_busy_time_counts_overlapping_kernels_once():
    """The profile's busy share: kernels on two streams that overlap count once, gaps not at all."""
    from types import SimpleNamespace

    from tryon_lab.experiments.step_profile import busy_ms

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(a, b, kind=cuda):
        return SimpleNamespace(time_range=SimpleNamespace(start=a, end=b), device_type=kind)

    prof = SimpleNamespace(events=lambda: [ev(0, 1000), ev(500, 1500), ev(3000, 4000), ev(3200, 3300),
                                           ev(0, 9000, cpu)])  # us; the CPU event is not device time
    assert busy_ms(prof) == 2.5


def test_ray_sweep_bench_counts_points_per_slot(tmp_path):
    """The sweep-throughput benchmark's own path on the CPU: one fresh Ray instance per count (1 and 2 CPUs here,
    GPUs on a GPU machine), every point run by ``runs.sweep(executor="ray")``, points per minute per count."""
    from tryon_lab.experiments import ray_sweep_bench

    (tmp_path / "nbs").mkdir()
    nb = write_test_notebooks(tmp_path / "nbs")["nb_ok"]
    res = ray_sweep_bench.bench((1, 2), nb, {"input_file": ""}, {"seed": [1, 2], "size": [4]}, tmp_path / "runs",
                                tmp_path / "results.json")
    rows = res["rows"]
    assert [r["slots"] for r in rows] == [1, 2] and all(r["slot_kind"] == "CPU" for r in rows)
    assert all(r["points"] == r["ok"] == 2 and r["points_per_min"] > 0 for r in rows)
    assert rows[0]["speedup_vs_1"] == 1.0
    for r in rows:  # each count's sweep is a real sweep folder, run by Ray
        assert json.loads((Path(r["sweep_dir"]) / "sweep.json").read_text())["executor"] == "ray"
    assert json.loads((tmp_path / "results.json").read_text())["ray_sweep"]["grid"] == {"seed": [1, 2], "size": [4]}
    assert "points_per_min" in (tmp_path / "ray_sweep.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["ray_sweep"]["valid"]  # every point ran ok
    for r in rows:  # where the time went, from the attempt log: no reruns, slots busy part of the wall time
        assert r["reruns"] == 0 and 0 < r["point_s_median"] < r["wall_s"] and 0 < r["slots_busy"] <= 1.01
    assert "target >= 1.9x" in (tmp_path / "ray_sweep.md").read_text()


def test_multi_gpu_summary_compares_each_run_with_its_own_sessions_one_gpu_path(tmp_path):
    """Rows of two sessions: each N-GPU row against the one-GPU FP8 run measured last before it; seconds outside
    the steps derived; a row read from a log says so; old profiles refiled from their top kernels."""
    from tryon_lab.experiments import multi_gpu_bench as mg
    from tryon_lab.experiments.step_profile import TRITON

    def entry(date, gpus, s_img, variant="fp8", **size_extra):
        size = {"ms_per_step": 100.0, "s_per_image": s_img, "peak_bytes_per_rank": [2**30] * gpus, **size_extra}
        return {"stamp": {"date": f"2026-11-30 {date} UTC"}, "gpus": gpus, "variant": variant, "steps": 10,
                "sizes": {"1024x768": size}}

    quant = "triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_gelu_t_unsqueeze_view_15"
    profile = {"device_ms_per_step_by_kind": {"GEMM": 50.0, TRITON: 5.0}, "top_kernels_ms_per_step": {quant: 4.0}}
    data = {"multi_gpu_1gpu_run1": entry("02:00", 1, 4.0), "multi_gpu_2gpu_run1": entry("02:05", 2, 2.0),
            "multi_gpu_1gpu": entry("05:00", 1, 3.0),
            "multi_gpu_2gpu": entry("05:05", 2, 2.0, source="read from its log", profile_per_rank=[profile])}
    ring = entry("05:06", 2, 2.5) | {"context_parallel": {"ring_degree": 2, "ulysses_degree": 1}, "split_vae": True}
    data[mg.entry_name(2, "fp8", split_vae=True, ring=2)] = ring
    (tmp_path / "r.json").write_text(json.dumps(data))
    rows, profiled, md = mg.summary(tmp_path / "r.json")
    speedup = {r["run (UTC)"]: r["speedup"] for r in rows if r["gpus"] == 2}
    assert speedup == {"11-30 02:05": 2.0, "11-30 05:05": 1.5, "11-30 05:06": 1.2}
    assert "multi_gpu_2gpu_splitvae_ring2" in data and "| fp8+splitvae+ring2 |" in md
    assert all(r["s_outside_steps"] == pytest.approx(r["s_per_image"] - 1.0) for r in rows)
    assert "read from its log" in md and "best 2 GPUs `fp8` 2.00x" in md
    assert profiled[0]["GEMM ms"] == 46.0 and profiled[0][f"{TRITON} ms"] == 9.0


def _smooth_image(rows: int = 512, cols: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, rows // 32, cols // 32, generator=g), size=(rows, cols),
                                        mode="bilinear")
    return x * 2 - 1 + 0.05 * torch.randn(1, 3, rows, cols, generator=g)


def _toy_vae():
    from diffusers import AutoencoderKL

    from tryon_lab.checkpoint import FILL_SUBDIR, TRAINED_DIR

    return AutoencoderKL.from_pretrained(TRAINED_DIR / FILL_SUBDIR / "vae").eval().requires_grad_(False)


def _vae_worker(rank: int, world: int, port: int, out: str, halo: int) -> None:
    import torch.distributed as dist

    _rank_env(rank, world, port)
    parallel.init_distributed()
    try:
        vae = parallel.split_vae(_toy_vae(), halo)
        with torch.no_grad():
            z = vae.encode(_smooth_image()).latent_dist.mode()
            torch.save({"z": z, "image": vae.decode(z).sample}, f"{out}/rank{rank}.pt")
            _leave_together()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("halo", "tolerance"), [(12, 1e-5), (2, 0.1)], ids=["halo-covers-field", "halo-too-short"])
def test_split_vae_equals_one_process_once_the_halo_covers_the_receptive_field(tmp_path, halo, tolerance):
    """Each rank encodes and decodes its half of a 512-row image (32 latent rows) plus the halo; GroupNorm
    statistics and the mid-block's attention span the whole image, so with enough halo the result is the unsplit
    one; with too little it is not (the convolutions then miss rows)."""
    vae = _toy_vae()
    with torch.no_grad():
        z = vae.encode(_smooth_image()).latent_dist.mode()
        ref = vae.decode(z).sample
    _spawn(_vae_worker, (str(tmp_path), halo))
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in ("z", "image"))  # every rank holds the whole
    errs = _rel_l2(outs[0]["z"], z), _rel_l2(outs[0]["image"], ref)
    print(f"split VAE, halo {halo} latent rows: latents rel-L2 {errs[0]:.3g}, image {errs[1]:.3g}")
    assert max(errs) < tolerance and (halo > 2 or max(errs) > 1e-3)


def _cache_dit_worker(rank: int, world: int, port: int, out: str, graphed: bool = False) -> None:
    import torch.distributed as dist

    from tryon_lab.experiments.peers_gpu import cache_dit_parallel

    global TEXT_TOKENS
    TEXT_TOKENS = 16  # even: cache-dit shards without padding
    _rank_env(rank, world, port)
    parallel.init_distributed()
    try:
        model = _tiny_transformer()
        cache_dit_parallel(model, world, ulysses_async=True)
        if graphed:  # as the bench's `cache_dit_async_step_graph`: our graph outside the peer's split and gather
            from unittest import mock

            from tests.conftest import graph_on_the_cpu
            from tryon_lab.step_graph import apply_step_graph

            graph_on_the_cpu(lambda obj, name, value: mock.patch.object(obj, name, value).start())
            hook = apply_step_graph(model)
        with torch.no_grad():
            for _ in range(3 if graphed else 1):  # graphed: warm-up, capture, replay
                sample = model(**_tiny_inputs(model))[0]
        if graphed:
            assert (hook.state.captures, hook.state.replays) == (1, 1)
        torch.save(sample.clone(), f"{out}/rank{rank}.pt")
        _leave_together()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("graphed", [False, True], ids=["peer", "peer+step_graph"])
def test_cache_dit_ulysses_peer_matches_one_process(tmp_path, monkeypatch, graphed):
    """The two-GPU peer (cache-dit's own asynchronous Ulysses) over two gloo ranks, alone and under our step
    graph (its CPU stand-in replays the recorded call): the same output as one process."""
    monkeypatch.setattr(sys.modules[__name__], "TEXT_TOKENS", 16)
    model = _tiny_transformer()
    with torch.no_grad():
        ref = model(**_tiny_inputs(model))[0]
    _spawn(_cache_dit_worker, (str(tmp_path), graphed))
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(outs[0], outs[1]) and _rel_l2(outs[0], ref) < 1e-5



def test_cache_dit_fp8_all_to_all_without_cute_dsl_is_refused_clearly(monkeypatch):
    """cache-dit's FP8 all-to-all imports the CuTe DSL inside each compiled block (the run on two H200s stopped
    there): without it installed, the peer says so and what to do, before any hook goes in."""
    import importlib.util

    from tryon_lab.experiments.peers_gpu import cache_dit_parallel

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cutlass" else real(name, *a))
    model = _tiny_transformer()
    with pytest.raises(RuntimeError, match="nvidia-cutlass-dsl"):
        cache_dit_parallel(model, 2, ulysses_async=True, ulysses_float8=True)


def test_ray_sweep_bench_says_when_points_failed(tmp_path, monkeypatch):
    """Failed points are rerun by Ray, so their sweep's time is no throughput: the result says so. The bytecode
    build an image would do first (``bytecode=True``) is recorded with the result."""
    from tryon_lab.experiments import bytecode, ray_sweep_bench

    built = []
    monkeypatch.setattr(bytecode, "compile_bytecode", lambda: built.append(1) or {"seconds": 1.5, "compiled": ["x"]})
    (tmp_path / "nbs").mkdir()
    nb = write_test_notebooks(tmp_path / "nbs")["nb_fail"]
    res = ray_sweep_bench.bench((1,), nb, {}, {"seed": [1]}, tmp_path / "runs", tmp_path / "results.json",
                                bytecode=True)
    assert built == [1] and res["bytecode_build"]["compiled"] == ["x"]
    assert not res["valid"] and res["rows"][0]["ok"] == 0
    assert "Not a throughput measurement" in (tmp_path / "ray_sweep.md").read_text()
