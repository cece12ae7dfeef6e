"""A serving process without transformers: Fill's setup as plain functions (``fill_setup``) and Redux in a worker
process (``redux_process``), each equal to the stock pipeline bit for bit."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_request_images
from tryon_lab import configure, fill_setup, pipeline
from tryon_lab.checkpoint import TRAINED_DIR
from tryon_lab.redux_process import RemoteRedux

ROOT = Path(__file__).resolve().parent.parent


def _prepared(seeds=(0, 5)):
    reqs = [pipeline.TryOnRequest(*make_request_images(seed=s), seed=s) for s in seeds]
    return pipeline.prepare(reqs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("begin", [0, 1])
def test_setup_functions_equal_the_stock_pipeline_steps(slim, dtype, begin):
    # begin 0: Fill's first sigma is 1.0 and the image is not encoded (its draws are still made); begin 1 (a later
    # start, sigma < 1) encodes it and mixes as the stock pipeline does. Both against the stock methods.
    fill = copy.deepcopy(slim.fill).to(dtype=dtype)
    prepared = _prepared()
    w, h = prepared[0].diptych.size
    init = fill.image_processor.preprocess([p.diptych for p in prepared], height=h, width=w).to(torch.float32)
    channels, vsf = fill.vae.config.latent_channels, fill.vae_scale_factor
    timesteps = fill_setup.timesteps(fill.scheduler, 4, h, w, vsf, "cpu")
    fill.scheduler.set_begin_index(begin)
    ours = fill_setup.noise_latents(fill.vae, fill.scheduler, init, pipeline.generators([0, 5]), channels, vsf,
                                    dtype, "cpu")
    stock, ids = fill.prepare_latents(init, timesteps[begin:begin + 1].repeat(2), 2, channels, h, w, dtype, "cpu",
                                      pipeline.generators([0, 5]), None)
    assert ours.dtype == stock.dtype == dtype and torch.equal(ours, stock)
    assert torch.equal(fill_setup.image_ids(h, w, vsf, dtype), ids)
    mask = fill.mask_processor.preprocess([p.mask for p in prepared], height=h, width=w)
    masked = (init * (1 - mask)).to(dtype=dtype)
    stock_mask, stock_masked = fill.prepare_mask_latents(mask, masked, 2, channels, 1, h, w, dtype, "cpu",
                                                         pipeline.generators([0, 5]))
    assert torch.equal(fill_setup.masked_latents(fill.vae, masked, pipeline.generators([0, 5]), dtype, "cpu"),
                       stock_masked)
    assert torch.equal(fill_setup.mask_latents(mask.to(dtype=dtype), vsf), stock_mask)
    unpacked = fill_setup.unpack(ours, h, w, vsf)
    assert torch.equal(unpacked, fill._unpack_latents(ours, h, w, vsf)) and torch.equal(fill_setup.pack(unpacked), ours)


def test_fill_parts_run_the_hot_path_as_the_pipeline_class_does(slim):
    # The same transformer, VAE and scheduler without diffusers' pipeline class: the same latents and pixels; the
    # stock loop, which is the class's call, is refused with what to set instead.
    parts = fill_setup.FillParts(slim.fill.transformer, slim.fill.vae, slim.fill.scheduler, "cpu")
    prepared = _prepared()
    tokens, _ = pipeline.encode_garments(slim, [pipeline.garment_of(p) for p in prepared])
    pe, pooled = pipeline.conditioning(slim.prompt_embeds, slim.pooled_prompt_embeds, tokens)
    hot = pipeline.TryOnSettings(steps=3, progress=False, hot_path=True)
    a = pipeline.denoise(slim.fill, prepared, pe, pooled, hot, [0, 5])
    b = pipeline.denoise(parts, prepared, pe, pooled, hot, [0, 5])
    assert torch.equal(a, b)
    w, h = prepared[0].diptych.size
    assert torch.equal(pipeline.vae_decode(slim.fill, a, h, w), pipeline.vae_decode(parts, b, h, w))
    with pytest.raises(ValueError, match="hot path only.*hot_path at None"):
        pipeline.denoise(parts, prepared, pe, pooled, pipeline.TryOnSettings(steps=1, progress=False), [0, 5])


def test_redux_process_options_are_refused_with_the_fix():
    with pytest.raises(configure.OptionsError, match="redux_process=True.*set hot_path=True"):
        configure.check_options(configure.PipelineOptions(redux_process=True))
    with pytest.raises(configure.OptionsError, match="redux_process=True.*memory modes.*redux_process=False"):
        configure.check_options(configure.PipelineOptions(redux_process=True, hot_path=True, memory="bf16+vae-tiling"))
    configure.check_options(configure.PipelineOptions(redux_process=True, hot_path=True))  # the serving combination


def test_a_redux_process_that_cannot_load_says_so(tmp_path):
    worker = RemoteRedux(tmp_path / "no-model", "cpu", "float32")
    with pytest.raises(RuntimeError, match=r"Redux process could not load Redux: ModelFolderError: .*no-model"):
        worker.wait_ready()


SERVING_CHILD = """
import hashlib, json, sys
from tryon_lab import import_cache
how = sys.argv[1]
remote = how != "local"
left = import_cache.leave_out(import_cache.WITHOUT_TRANSFORMERS) if remote else []
from tryon_lab.redux_process import RemoteRedux
redux = None
if how == "spawn":  # first thing, as a serving script does: the worker's imports overlap this process's
    redux = RemoteRedux(sys.argv[2], "cpu", "float32", import_cache.SERVING_LEFT_OUT)
import torch
if how == "fork":  # right after torch's import: the worker has it already
    redux = RemoteRedux(sys.argv[2], "cpu", "float32", fork=True)
from tests.conftest import make_request_images
from tryon_lab import configure, pipeline
pipe = configure.build_pipeline(sys.argv[2], configure.PipelineOptions(hot_path=True, redux_process=remote), redux)
person, garment, mask = make_request_images(64, 96)
res = pipeline.tryon(pipe, pipeline.TryOnRequest(person, garment, mask, seed=3),
                     pipeline.TryOnSettings(steps=2, progress=False))
digest = lambda t: hashlib.sha256(t.float().numpy().tobytes()).hexdigest()
print(json.dumps({"latents": digest(res.latents), "tokens": digest(pipeline.encode_garment(pipe.redux, garment)),
                  "left": left, "fill": type(pipe.fill).__name__, "worker": getattr(pipe.redux, "ready", None),
                  "warm_up_s": getattr(pipe.redux, "warm_up_s", None),
                  "transformers": sorted(m for m, v in sys.modules.items() if m.startswith("transformers") and v)}))
"""


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_serving_process_imports_no_transformers_and_draws_the_same_try_on():
    # Redux in its worker, spawned or forked, the Fill parts without the pipeline class: not one transformers module
    # in the serving process, and the same Redux tokens and latents, bit for bit, as the slim pipeline in one process.
    spawned, forked, slim = (run_child("-c", SERVING_CHILD, how, str(TRAINED_DIR)) for how in ("spawn", "fork", "local"))
    for served in (spawned, forked):
        assert served["fill"] == "FillParts" and served["transformers"] == [] and "transformers" in served["left"]
        assert set(served["worker"]) == {"imports", "cuda_init", "load"}
        assert served["warm_up_s"] > 0  # a blank garment encoded after ready, told with the first tokens
        assert (served["tokens"], served["latents"]) == (slim["tokens"], slim["latents"])  # the warm-up changed none
    assert forked["worker"]["imports"] < 0.01 < spawned["worker"]["imports"]  # the fork has torch already
    assert slim["fill"] == "FluxFillPipeline" and slim["transformers"]  # what the lever keeps out


def test_a_forked_redux_process_is_refused_after_cuda_started(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="after this process's first CUDA call.*right after importing torch"):
        RemoteRedux(tmp_path, "cuda", "bfloat16", fork=True)
