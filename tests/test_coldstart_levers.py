"""Cold-start levers: what the slim path imports, FP8 saved already quantized, weights read straight to the device."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from tests.conftest import make_request_images
from tryon_lab import configure, loading, parallel, pipeline, quant
from tryon_lab.checkpoint import FILL_SUBDIR, TRAINED_DIR
from tryon_lab.samples import load_sample

ROOT = Path(__file__).resolve().parent.parent
FAST = pipeline.TryOnSettings(steps=2, progress=False)

# A fresh interpreter, so sys.modules holds only what this code imported.
CHILD = """
import json, sys
HEAVY = ("diffusers", "transformers", "peft", "sklearn", "torchao", "torch._dynamo")
from tryon_lab import configure
options = configure.PipelineOptions(fp8={fp8!r})
reads = configure.start_reads({model!r}, options)  # a serving script's first call: the reads start, no imports
after_import = [m for m in HEAVY if m in sys.modules]
from tests.conftest import make_request_images
from tryon_lab import pipeline
pipe = configure.build_pipeline({model!r}, options, reads=reads)
person, garment, mask = make_request_images(64, 96)
pipeline.tryon(pipe, pipeline.TryOnRequest(person, garment, mask), pipeline.TryOnSettings(steps=1, progress=False))
print(json.dumps({{"after_import": after_import, "after_tryon": [m for m in HEAVY if m in sys.modules]}}))
"""


def run_child(*args: str, env: dict | None = None) -> dict:
    """``python ARGS`` from the repo root in a fresh interpreter; the JSON its last line prints."""
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_modules(fp8: str = "none") -> dict:
    return run_child("-c", CHILD.format(model=str(TRAINED_DIR), fp8=fp8))


@pytest.mark.slow
def test_slim_path_imports():
    # Importing the configure step and starting the reads load no diffusers (nor what it drags in); a default build
    # and try-on never import sklearn. diffusers 0.42 itself imports torch._dynamo (diffusers.utils.torch_utils),
    # and peft / transformers / torchao from its model base class and hooks package whenever they are installed.
    default = child_modules()
    assert default["after_import"] == []
    assert "sklearn" not in default["after_tryon"]
    assert "torchao" in child_modules("fp8_weight_only")["after_tryon"]  # FP8 runs through torchao


def test_cuda_components_are_read_onto_the_device():
    # CPU loads stay as they were; on CUDA every weighted component is placed on the GPU while it is read.
    for name in loading.SLIM_COMPONENTS:
        cpu = loading.load_kwargs(name, torch.bfloat16, "cpu", slim=True)
        cuda = loading.load_kwargs(name, torch.bfloat16, "cuda:1", slim=True)
        assert "device_map" not in cpu
        assert cuda.get("device_map") == ("cuda:1" if name in loading.WEIGHTED else None)
    assert "device_map" not in loading.load_kwargs("transformer", torch.bfloat16, "cuda", slim=False)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every parameter equal bit for bit; FP8 weights compared by their qdata, scale and torchao attributes."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    n_fp8 = 0
    for k, x in sa.items():
        y = sb[k]
        assert type(x) is type(y), k
        if hasattr(x, "qdata"):
            n_fp8 += 1
            assert x.qdata.dtype == y.qdata.dtype == torch.float8_e4m3fn
            assert torch.equal(x.qdata.view(torch.uint8), y.qdata.view(torch.uint8)), k
            assert torch.equal(x.scale, y.scale) and x.scale.dtype == y.scale.dtype, k
            for attr in ("block_size", "mm_config", "act_quant_kwargs", "kernel_preference", "dtype", "shape"):
                assert getattr(x, attr) == getattr(y, attr), (k, attr)
            if hasattr(x, "act_quant_scale"):  # static FP8: the calibrated activation scale travels with the weight
                assert torch.equal(x.act_quant_scale, y.act_quant_scale), k
        else:
            assert torch.equal(x, y), k
    assert n_fp8 > 0


@pytest.fixture(scope="module")
def weight_only_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp8") / "weight_only"
    info = configure.save_fp8_weights(TRAINED_DIR, folder, "fp8_weight_only", device="cpu")
    assert info["mode"] == "fp8_weight_only" and (folder / quant.FP8_FILE).is_file()
    return folder


def test_saved_fp8_loads_the_same_weights_and_output_as_quantizing_on_load(weight_only_folder):
    on_load = configure.build_pipeline(TRAINED_DIR, fp8="fp8_weight_only", device="cpu")
    saved = configure.build_pipeline(TRAINED_DIR, fp8="fp8_weight_only", device="cpu",
                                     fp8_weights=str(weight_only_folder))
    same_weights(on_load.transformer, saved.transformer)
    assert saved.load_report[0]["component"] == "transformer (saved FP8)"
    assert saved.build_report["quant"]["fp8_layers"] == on_load.build_report["quant"]["fp8_layers"] > 0
    req = pipeline.TryOnRequest(*make_request_images(64, 96), seed=3)
    a, b = pipeline.tryon(on_load, req, FAST), pipeline.tryon(saved, req, FAST)
    assert torch.equal(a.latents, b.latents)


def test_reads_started_before_the_imports_build_the_same_pipeline(weight_only_folder):
    """``configure.start_reads``, a serving script's call right after ``import torch``: the FP8 transformer's and
    SigLIP's reads run on worker threads from then on, and the build uses them (equal weights and try-on); a build
    with other options is refused, naming both."""
    opts = dict(fp8="fp8_weight_only", device="cpu", fp8_weights=str(weight_only_folder))
    reads = configure.start_reads(TRAINED_DIR, **opts)
    assert reads.fp8 is not None and reads.siglip is not None
    early, plain = configure.build_pipeline(TRAINED_DIR, reads=reads, **opts), configure.build_pipeline(TRAINED_DIR, **opts)
    read = reads.fp8.result()  # this read, not a second one
    reads.siglip.result()
    assert sys.getswitchinterval() == 0.005  # shortened to 0.5 ms while the reads ran (the default), then put back
    assert early.transformer.fp8_read == {"read_s": read["read_s"], "thread": read["thread"]}
    same_weights(plain.transformer, early.transformer)
    siglip = plain.redux.image_encoder.state_dict()
    assert all(torch.equal(v, siglip[k]) for k, v in early.redux.image_encoder.state_dict().items())
    req = pipeline.TryOnRequest(*make_request_images(64, 96), seed=3)
    assert torch.equal(pipeline.tryon(plain, req, FAST).latents, pipeline.tryon(early, req, FAST).latents)
    with pytest.raises(ValueError, match="start them with the options the pipeline is built with"):
        configure.build_pipeline(TRAINED_DIR, fp8="fp8_weight_only", device="cpu", reads=reads)
    with pytest.raises(configure.OptionsError, match="without reads="):
        configure.start_reads(TRAINED_DIR, context_parallel=parallel.ContextParallel(ulysses_degree=2))


def test_saved_fp8_with_fused_qkv_loads_fused_and_equal(tmp_path):
    """The best step-speed variant fuses QKV before FP8: its saved folder loads fused, equal bit for bit, and a
    build asking for the other fusing is refused before loading."""
    folder = tmp_path / "fused"
    info = configure.save_fp8_weights(TRAINED_DIR, folder, "fp8_weight_only", device="cpu", fuse_qkv=True)
    assert info["fused_qkv"] is True
    opts = dict(fp8="fp8_weight_only", device="cpu", fuse_qkv=True)
    on_load = configure.build_pipeline(TRAINED_DIR, **opts)
    saved = configure.build_pipeline(TRAINED_DIR, fp8_weights=str(folder), **opts)
    assert quant.fused_qkv(saved.transformer)
    same_weights(on_load.transformer, saved.transformer)
    # the FP8 bytes were read on a worker thread while this one imported and built the rest (the same bytes)
    row = next(r for r in saved.load_report if r["component"] == "transformer (saved FP8)")
    assert row["read_thread"].startswith("fp8-read") and row["read_s"] > 0
    req = pipeline.TryOnRequest(*make_request_images(64, 96), seed=3)
    assert torch.equal(pipeline.tryon(on_load, req, FAST).latents, pipeline.tryon(saved, req, FAST).latents)
    with pytest.raises(quant.FP8WeightsError, match="fuse_qkv=True"):
        configure.build_pipeline(TRAINED_DIR, fp8_weights=str(folder), **{**opts, "fuse_qkv": False})


def test_static_fp8_is_calibrated_once_then_saved_and_loaded_bit_for_bit(tmp_path):
    """The best step variant's lever as an option: ``fp8_static_tensor`` calibrates every block Linear's activation
    scale on a 2-step try-on of the bundled sample, stays close to the unquantized model, and its saved folder
    loads the same scales, weights and output without calibrating again, saying what it was calibrated on."""
    opts = dict(device="cpu", fuse_qkv=True)
    plain = configure.build_pipeline(TRAINED_DIR, **opts)
    static = configure.build_pipeline(TRAINED_DIR, fp8=quant.STATIC, **opts)
    rep = static.build_report["quant"]
    assert rep["fp8_layers"] > 0 and rep["calibration"].startswith("sample s000 at 128x192, 2 steps")
    assert not static.redux_cache  # the calibration's Redux tokens are nobody's request
    s = load_sample(1)  # another pair than the calibration's: 0.020 rel-L2 here (FP8 weights alone: 0.014)
    req = pipeline.TryOnRequest(s.person, s.garment, s.mask, seed=3)
    ref, out = pipeline.tryon(plain, req, FAST).latents, pipeline.tryon(static, req, FAST).latents
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.03

    info = configure.save_fp8_weights(TRAINED_DIR, tmp_path / "static", quant.STATIC, device="cpu", fuse_qkv=True)
    assert info["mode"] == quant.STATIC and info["calibration"] == rep["calibration"]
    saved = configure.build_pipeline(TRAINED_DIR, fp8=quant.STATIC, fp8_weights=str(tmp_path / "static"), **opts)
    same_weights(static.transformer, saved.transformer)
    assert saved.build_report["quant"]["calibration"] == rep["calibration"]
    assert torch.equal(pipeline.tryon(saved, req, FAST).latents, out)
    with pytest.raises(quant.SpeedConfigError, match="calibrate="):
        quant.quantize_transformer(plain.transformer, quant.STATIC)
    for changes in (dict(fp8="fp8_weight_only"), dict(fp8=quant.STATIC, fp8_weights=str(tmp_path / "static"))):
        with pytest.raises(configure.OptionsError, match="nothing is calibrated"):  # never silently ignored
            configure.build_pipeline(TRAINED_DIR, fp8_calibration=256, **changes, **opts)


def test_fused_qkv_drops_the_projections_it_leaves_unused_and_draws_what_diffusers_fused_draws():
    """diffusers' fusing keeps the separate Q/K/V Linears for unfusing; nothing calls them once fused (a sixth of
    the FLUX transformer), so ``quant.fuse_qkv`` removes them: fewer bytes, the same try-on bit for bit."""
    opts = dict(device="cpu")
    ours = configure.build_pipeline(TRAINED_DIR, fuse_qkv=True, **opts)
    theirs = configure.build_pipeline(TRAINED_DIR, **opts)
    theirs.transformer.fuse_qkv_projections()  # diffusers' own: fused, the originals kept
    attns = [m for m in ours.transformer.modules() if getattr(m, "fused_projections", False)]
    assert attns and not any(hasattr(a, name) for a in attns for name in quant.UNFUSED)
    assert quant.weight_bytes(ours.transformer) < quant.weight_bytes(theirs.transformer)
    s = load_sample(1)
    req = pipeline.TryOnRequest(s.person, s.garment, s.mask, seed=3)
    assert torch.equal(pipeline.tryon(ours, req, FAST).latents, pipeline.tryon(theirs, req, FAST).latents)


def test_per_row_dynamic_fp8_round_trips_bit_for_bit(tmp_path):
    # Dynamic FP8's forward needs an FP8 GPU, but its weights can be made on the CPU: torchao's hardware check
    # is the only thing in the way of quantizing here.
    from diffusers import FluxTransformer2DModel
    from torchao.quantization import quantize_

    source = TRAINED_DIR / FILL_SUBDIR / "transformer"
    t = FluxTransformer2DModel.from_pretrained(source, torch_dtype=torch.bfloat16, local_files_only=True)
    bf16_bytes = quant.weight_bytes(t)
    with mock.patch("torchao.quantization.quant_api._check_hardware_support"):
        quantize_(t, quant.fp8_config("fp8_dynamic_row"), filter_fn=quant.fp8_filter())
    info = quant.save_fp8_transformer(t, tmp_path / "row")
    assert info["mode"] == "fp8_dynamic_row"
    assert abs(info["bytes"] - quant.weight_bytes(t)) < 100_000  # the FP8 bytes plus a JSON header
    assert info["bytes"] < 0.7 * bf16_bytes
    loaded = quant.load_fp8_transformer(tmp_path / "row", source, "fp8_dynamic_row", torch.bfloat16)
    same_weights(t, loaded)
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_all_block_linears_in_fp8_halve_the_bytes(tmp_path):
    from diffusers import FluxTransformer2DModel

    source = TRAINED_DIR / FILL_SUBDIR / "transformer"
    t = FluxTransformer2DModel.from_pretrained(source, torch_dtype=torch.bfloat16, local_files_only=True)
    in_blocks = sum(quant.tensor_bytes(p) for n, p in t.named_parameters() if "transformer_blocks" in n)
    rest = quant.weight_bytes(t) - in_blocks
    quant.quantize_transformer(t, "fp8_weight_only", keep=())
    info = quant.save_fp8_transformer(t, tmp_path / "all", keep=())
    assert info["bytes"] < rest + 0.52 * in_blocks  # FP8 bytes + one scale per row


def test_mismatched_fp8_folder_is_refused_clearly(weight_only_folder, tmp_path):
    source = TRAINED_DIR / FILL_SUBDIR / "transformer"
    with pytest.raises(quant.FP8WeightsError, match="fp8='fp8_weight_only'"):
        quant.check_fp8_folder(weight_only_folder, source, "fp8_dynamic_row", torch.float32)
    with pytest.raises(quant.FP8WeightsError, match="dtype='float32'"):
        quant.check_fp8_folder(weight_only_folder, source, "fp8_weight_only", torch.bfloat16)
    other = tmp_path / "other"
    shutil.copytree(source, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_single_layers": 5}))
    with pytest.raises(quant.FP8WeightsError, match="another model"):
        quant.check_fp8_folder(weight_only_folder, other, "fp8_weight_only", torch.float32)
    with pytest.raises(quant.FP8WeightsError, match="save_fp8_transformer"):
        quant.read_fp8_info(tmp_path)
    with pytest.raises(configure.OptionsError, match="set fp8 to the mode"):
        configure.build_pipeline(TRAINED_DIR, fp8_weights=str(weight_only_folder), device="cpu")
    with pytest.raises(configure.OptionsError, match="fp8_weights=None"):
        configure.build_pipeline(TRAINED_DIR, fp8="fp8_weight_only", fp8_weights=str(weight_only_folder),
                                 device="cpu", hotswap_rank=4)
    with pytest.raises(quant.FP8WeightsError, match="without fused QKV"):
        configure.build_pipeline(TRAINED_DIR, fp8="fp8_weight_only", fp8_weights=str(weight_only_folder),
                                 device="cpu", fuse_qkv=True)


IMPORT_CACHE_CHILD = """
import importlib.metadata, json, sys
from pathlib import Path
from tryon_lab import import_cache
truth = import_cache._ORIGINAL_MAP()
report = import_cache.use(sys.argv[1])
import diffusers.utils.import_utils as du
import transformers
from transformers.utils import import_utils as tu
models = Path(transformers.__file__).parent / "models"
computed = tu.create_import_structure_from_path.__wrapped__(models)  # uncached, straight from the files
siglip = transformers.SiglipVisionModel.__name__  # imports transformers.models (its own table) on the way
print(json.dumps({**report, **import_cache.report(), "same": importlib.metadata.packages_distributions() == truth,
                  "diffusers_map_same": dict(du._package_map) == truth,
                  "models_same": tu.define_import_structure(models, "models") == {
                      k: {f"models.{m}": v for m, v in mods.items()} for k, mods in
                      tu.spread_import_structure(computed).items()},
                  "siglip": siglip}))
"""


def test_import_cache_hits_in_a_second_process_and_misses_after_an_install(tmp_path):
    # The cache serves diffusers the import-name -> distribution map that importlib computes and transformers its
    # lazy-import tables as read from its files; a process after the image-build ``write`` builds neither; adding a
    # package to a folder on the path makes it miss, and the miss rebuilds the file.
    extra = tmp_path / "site"
    extra.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{extra}"}
    path = tmp_path / "import-cache.json"

    def child(*args: str) -> dict:
        return run_child(*args, str(path), env=env)

    built = child("-m", "tryon_lab.import_cache")  # the image build step: the slim pipeline's imports
    assert built["import_structures"] >= 3 and built["distributions_mapped"] > 10
    served = child("-c", IMPORT_CACHE_CHILD)
    assert served["hit"] and served["structure_misses"] == 0
    assert served["same"] and served["diffusers_map_same"] and served["models_same"]
    assert served["siglip"] == "SiglipVisionModel"  # a lazy import through the cached table still resolves
    dist = extra / "newpkg-1.0.dist-info"  # what pip install leaves in the folder
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: newpkg\nVersion: 1.0\n")
    (dist / "top_level.txt").write_text("newpkg\n")
    stale = child("-c", IMPORT_CACHE_CHILD)
    assert not stale["hit"] and stale["structure_misses"] >= 2 and stale["same"] and stale["models_same"]
    again = child("-c", IMPORT_CACHE_CHILD)  # the miss wrote the new map and tables
    assert again["hit"] and again["structure_misses"] == 0
    assert json.loads(path.read_text())["map"]["newpkg"] == ["newpkg"]


LEFT_OUT_CHILD = """
import json, sys
from tryon_lab import import_cache
import_cache.leave_out(import_cache.WITHOUT_TRANSFORMERS)  # a serving process with Redux in a worker
report = import_cache.use(sys.argv[1])
import diffusers.models  # the serving process's imports, without transformers
left_out = "transformers" not in sys.modules or sys.modules["transformers"] is None
import_cache.bring_back("transformers")  # what the forked Redux worker does: its SigLIP through the cached tables
import transformers
siglip = transformers.SiglipVisionModel.__name__
print(json.dumps({**report, **import_cache.report(), "left_out": left_out, "siglip": siglip}))
"""


def test_import_cache_hits_in_a_process_that_leaves_transformers_out_and_keeps_the_file(tmp_path):
    # The key must not depend on what a process leaves out: a serving process without transformers (and the Redux
    # worker forked from it, which brings it back) reads the image build's file, and never rewrites it for the next
    # process (H200 run 31: each such process missed, rewrote the file without transformers' tables, and the next
    # process with transformers missed in turn; 0.49-0.55 s a miss).
    path = tmp_path / "import-cache.json"
    run_child("-m", "tryon_lab.import_cache", str(path))  # the image build step
    written = path.read_bytes()
    served = run_child("-c", LEFT_OUT_CHILD, str(path))
    assert served["left_out"] and served["hit"] and served["structure_misses"] == 0 and served["siglip"] == "SiglipVisionModel"
    assert path.read_bytes() == written
    after = run_child("-c", IMPORT_CACHE_CHILD, str(path))  # a process with transformers, next
    assert after["hit"] and after["structure_misses"] == 0


def test_import_cache_that_cannot_be_written_warns_and_serves_the_true_map(tmp_path):
    # A read-only or impossible place never stops a serving process: it warns, names the fix, and the map it
    # serves is still importlib's own.
    from tryon_lab import import_cache

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    try:
        with pytest.warns(UserWarning, match="import cache not written .* writable path"):
            report = import_cache.use(blocker / "cache.json")
        assert report["hit"] is False
        assert importlib.metadata.packages_distributions() == import_cache._ORIGINAL_MAP()
    finally:
        import_cache.restore()
    assert importlib.metadata.packages_distributions is import_cache._ORIGINAL_MAP
    tu = sys.modules.get("transformers.utils.import_utils")
    assert tu is None or tu.define_import_structure.__module__ == tu.__name__  # transformers' own again


TRYON_CHILD = """
import hashlib, json, sys
if sys.argv[1] != "-":
    from tryon_lab import import_cache
    import_cache.use(sys.argv[1])
from tests.conftest import make_request_images
from tryon_lab import configure, pipeline
pipe = configure.build_pipeline(sys.argv[2], configure.PipelineOptions())
person, garment, mask = make_request_images(64, 96)
res = pipeline.tryon(pipe, pipeline.TryOnRequest(person, garment, mask, seed=3),
                     pipeline.TryOnSettings(steps=2, progress=False))
from diffusers.utils import import_utils as du
cache = import_cache.report() if sys.argv[1] != "-" else None
print(json.dumps({"latents": hashlib.sha256(res.latents.float().numpy().tobytes()).hexdigest(),
                  "peft_backend": du.is_peft_available(), "transformers": du.is_transformers_available(),
                  "cache": cache}))
"""


@pytest.mark.slow
def test_import_cache_leaves_the_try_on_bit_identical(tmp_path):
    # A process served from the cache detects the same optional packages and draws the same try-on, bit for bit,
    # as one that walked the installed files itself.
    path = str(tmp_path / "import-cache.json")
    run_child("-m", "tryon_lab.import_cache", path)  # the image build step
    served, walked = (run_child("-c", TRYON_CHILD, cache, str(TRAINED_DIR)) for cache in (path, "-"))
    assert served.pop("cache") == {"used": True, "hit": True, "structure_misses": 0} and walked.pop("cache") is None
    assert served == walked


LEAVE_OUT_CHILD = """
import hashlib, json, sys
from tryon_lab import import_cache
left = import_cache.leave_out() if sys.argv[1] == "leave-out" else []
from tests.conftest import make_request_images
from tryon_lab import configure, pipeline
pipe = configure.build_pipeline(sys.argv[2], configure.PipelineOptions())
person, garment, mask = make_request_images(64, 96)
res = pipeline.tryon(pipe, pipeline.TryOnRequest(person, garment, mask, seed=3),
                     pipeline.TryOnSettings(steps=2, progress=False))
try:
    configure.check_options(configure.PipelineOptions(loras=(("a", "folder"),)))
    refused = None
except configure.OptionsError as e:
    refused = str(e)
print(json.dumps({"latents": hashlib.sha256(res.latents.float().numpy().tobytes()).hexdigest(), "left": left,
                  "imported": sorted(p for p in import_cache.SERVING_LEFT_OUT if sys.modules.get(p) is not None),
                  "refused": refused}))
"""


@pytest.mark.slow
def test_packages_left_out_are_not_imported_and_the_try_on_is_bit_identical():
    # A serving process that leaves out what the slim path imports but never calls draws the same try-on, bit for
    # bit, without importing any of it; asking that process for LoRAs is refused with the reason and the fix.
    from tryon_lab.import_cache import SERVING_LEFT_OUT

    served, full = (run_child("-c", LEAVE_OUT_CHILD, how, str(TRAINED_DIR)) for how in ("leave-out", "-"))
    assert served["left"] == list(SERVING_LEFT_OUT) and served["imported"] == []
    assert {"peft", "scipy"} <= set(full["imported"]) <= set(SERVING_LEFT_OUT)  # what the lever keeps out
    assert served["latents"] == full["latents"]
    assert "need peft" in served["refused"] and full["refused"] is None


def test_leave_out_hides_a_package_until_restored_and_refuses_one_already_imported(tmp_path, monkeypatch):
    import importlib.util

    from tryon_lab import import_cache

    (tmp_path / "pkg_left_out_here.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert import_cache.leave_out(("pkg_left_out_here",)) == ["pkg_left_out_here"]
        assert importlib.util.find_spec("pkg_left_out_here") is None  # what availability checks ask
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module("pkg_left_out_here")
        assert import_cache.left_out() == ["pkg_left_out_here"]
    finally:
        import_cache.restore()
    assert import_cache.left_out() == [] and importlib.import_module("pkg_left_out_here").VALUE == 1
    del sys.modules["pkg_left_out_here"]
    with pytest.raises(RuntimeError, match="already imported .* call leave_out\\(\\) first"):
        import_cache.leave_out(("json",))  # this test module imported json
    assert sys.modules["json"] is not None and import_cache.left_out() == []
