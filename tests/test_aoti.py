"""AOTInductor prototype: exported packages reproduce the slim pipeline, and a cold process runs them without
diffusers or transformers (CPU, toy model; AOT compiling the three packages takes about a minute)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_request_images

ROOT = Path(__file__).resolve().parent.parent
STEPS = 2
SEEDS = [3]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Packages for one 64x96 request (a 128x96 diptych) and the slim pipeline's own result for it."""
    import torch._inductor.config as inductor_config

    from tryon_lab import configure, pipeline
    from tryon_lab.checkpoint import TRAINED_DIR
    from tryon_lab.experiments import aoti

    pipe = configure.build_pipeline(TRAINED_DIR, device="cpu")
    person, garment, mask = make_request_images(64, 96)
    prepared = pipeline.prepare([pipeline.TryOnRequest(person, garment, mask)])
    folder = tmp_path_factory.mktemp("aoti")
    with inductor_config.patch(compile_threads=1):  # the C++ builds one at a time: the machine is shared
        info = aoti.export_all(pipe, prepared, SEEDS, folder, steps=(STEPS,))
    latents, image, prompt_embeds, pooled = aoti.reference(pipe, prepared, SEEDS, STEPS)
    example = aoti.example_inputs(pipe, prepared, SEEDS, STEPS)
    return {"folder": folder, "info": info, "prepared": prepared, "latents": latents, "image": image,
            "prompt_embeds": prompt_embeds, "pooled": pooled, "example": example}


@pytest.mark.slow
def test_exported_path_matches_the_slim_pipeline(exported):
    from tryon_lab.experiments import aoti, aoti_run

    folder, prepared = exported["folder"], exported["prepared"]
    schedule = aoti_run.load_schedule(folder / aoti_run.SCHEDULE)
    encoder = aoti_run.load_package(folder / aoti_run.VAE_ENCODER)
    inputs = aoti_run.prepare_inputs(encoder, schedule, [p.diptych for p in prepared], [p.mask for p in prepared],
                                     exported["prompt_embeds"], exported["pooled"], SEEDS)
    example = exported["example"]
    # the plain-torch setup gives the stock pipeline's transformer inputs (noise exactly: same generator stream)
    assert torch.equal(inputs.hidden[..., :inputs.latent_channels], example.latents)
    assert aoti.rel_l2(inputs.hidden, example.inputs) < 1e-5
    assert torch.equal(inputs.image_ids, example.image_ids) and torch.equal(inputs.text_ids, example.text_ids)
    assert torch.equal(schedule.timesteps(STEPS).expand(1, -1).T / 1000, example.timesteps)
    latents, image = aoti_run.run_exported(folder / aoti_run.TRANSFORMER, folder / aoti_run.VAE_DECODER, inputs,
                                           schedule, STEPS)
    assert latents.shape == exported["latents"].shape and image.shape == exported["image"].shape
    assert aoti.rel_l2(latents, exported["latents"]) < 1e-4  # measured ~4e-6 (inductor's fused kernels round differently)
    assert aoti.rel_l2(image, exported["image"]) < 1e-4
    # the cold conditioning: saved text embeddings + tokens from the Redux package
    text = load_file(str(folder / aoti_run.TEXT))
    prompt_embeds, pooled = aoti_run.conditioning(aoti_run.load_package(folder / aoti_run.REDUX), text,
                                                  [pipeline_garment(p) for p in prepared],
                                                  schedule.meta["redux_size"], schedule.dtype)
    assert aoti.rel_l2(prompt_embeds, exported["prompt_embeds"]) < 1e-5
    assert torch.equal(pooled, exported["pooled"])
    stock_loader = aoti_run.load_package(folder / aoti_run.VAE_DECODER, lean=False)  # torch._inductor's loader
    assert torch.equal(stock_loader(latents), image)
    with pytest.raises(KeyError, match="exported for"):
        schedule.sigmas(STEPS + 1)


def pipeline_garment(prepared):
    from tryon_lab.pipeline import garment_of

    return garment_of(prepared)


@pytest.mark.slow
@pytest.mark.parametrize("given_conditioning", [True, False], ids=["caller-conditioning", "redux-package"])
def test_cold_process_runs_without_diffusers(exported, tmp_path, given_conditioning):
    from tryon_lab.experiments import aoti

    inputs = aoti.write_cold_inputs(tmp_path / "inputs.safetensors", exported["prepared"],
                                    exported["prompt_embeds"] if given_conditioning else None,
                                    exported["pooled"], SEEDS, STEPS)
    out = tmp_path / "out.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "tryon_lab.experiments.aoti_run", str(exported["folder"]), str(inputs),
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    # nor torch._inductor / dynamo / sympy: the lean loader calls torch's C++ package loader directly
    assert report["modules"] == []
    result = load_file(str(out))
    assert aoti.rel_l2(result["latents"], exported["latents"]) < 1e-4
    assert aoti.rel_l2(result["image"], exported["image"]) < 1e-4


@pytest.mark.slow
def test_fp8_transformer_with_its_weights_beside_the_package(exported, tmp_path):
    """The full-size path: the package holds no weights; a safetensors file beside it holds every constant the
    package names, FP8 weights as their inner tensors, and loading them reproduces the eager FP8 transformer."""
    from safetensors import safe_open

    from tryon_lab import configure
    from tryon_lab.checkpoint import TRAINED_DIR
    from tryon_lab.experiments import aoti, aoti_run

    pipe = configure.build_pipeline(TRAINED_DIR, device="cpu", fp8="fp8_weight_only")
    example = exported["example"]
    package = aoti.export_transformer(pipe, example, tmp_path / aoti_run.TRANSFORMER,
                                      tmp_path / aoti_run.TRANSFORMER_CONSTANTS)
    assert package.stat().st_size < (tmp_path / aoti_run.TRANSFORMER_CONSTANTS).stat().st_size  # weights outside
    fqns = aoti.constant_fqns(package)
    with safe_open(str(tmp_path / aoti_run.TRANSFORMER_CONSTANTS), "pt") as f:
        assert sorted(f.keys()) == sorted(fqns)  # noqa: SIM118 (safe_open is not a mapping)
        fp8 = [k for k in f.keys() if ".parametrizations." in k]  # noqa: SIM118
        assert fp8 and {f.get_tensor(k).dtype for k in fp8} == {torch.float8_e4m3fn, torch.float32}  # data, scale
    runner = aoti_run.load_transformer(package, torch.device("cpu"))
    args = (example.inputs, example.timesteps[0], example.guidance, example.pooled, example.prompt_embeds,
            example.text_ids, example.image_ids)
    with torch.no_grad():
        expected = aoti._Transformer(pipe.transformer)(*args)
    assert aoti.rel_l2(runner(*args), expected) < 1e-4
    bare = aoti_run.load_package(package)  # without them it is refused with the fix named, not run on garbage
    from safetensors.torch import save_file

    save_file({fqns[0]: torch.zeros(1)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="export the package and its weights together"):
        aoti_run.load_constants(bare, tmp_path / "partial.safetensors", torch.device("cpu"))


def test_loader_check_runs_a_package_in_a_torch_only_process(tmp_path):
    """The check the GPU export runs first: here (CPU) a two-layer package loads and runs in a fresh process."""
    from tryon_lab.experiments.aoti import loader_check

    check = loader_check(tmp_path, "cpu")
    assert check["ok"] and check["returncode"] == 0 and check["reason"] == "", check
    assert (tmp_path / "loader_check.pt2").is_file()
