"""FP8, compilation, the compile-artefact cache and the recompile guard, on a tiny FLUX transformer (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tryon_lab import compiling, quant
from tryon_lab.checkpoint import SmallModelConfig, transformer_config
from tryon_lab.experiments import variants
from tryon_lab.metrics import rel_l2

TINY = SmallModelConfig(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=32,
                        axes_dims_rope=(8, 12, 12), joint_attention_dim=64, pooled_projection_dim=32)
FP8_WEIGHT_ONLY_TOL = 0.05  # rel-L2 of one forward: FP8 e4m3 keeps 3 mantissa bits (per-row scales)


def tiny_transformer(dtype=torch.float32, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**transformer_config(TINY)).to(dtype).eval().requires_grad_(False)


def tiny_inputs(t, dtype=torch.float32, n: int = 16, txt: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    c = t.config
    return dict(hidden_states=torch.randn(1, n, c.in_channels, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(1, txt, c.joint_attention_dim, generator=g).to(dtype),
                pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g).to(dtype),
                timestep=torch.tensor([0.5], dtype=dtype), guidance=torch.tensor([30.0], dtype=dtype),
                img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(txt, 3), return_dict=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_weight_only_close_to_reference(dtype):
    t = tiny_transformer(dtype)
    x = tiny_inputs(t, dtype)
    with torch.no_grad():
        ref = t(**x)[0]
        info = quant.quantize_transformer(t, "fp8_weight_only")
        out = t(**x)[0]
    err = rel_l2(out, ref)
    assert 0 < err < FP8_WEIGHT_ONLY_TOL, err
    assert info["fp8_layers"] > 0 and info["weight_bytes"] < info["weight_bytes_before"]
    kinds = {n: type(m.weight).__name__ for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds["transformer_blocks.0.attn.to_q"] == "Float8Tensor"
    assert kinds["single_transformer_blocks.0.proj_out"] == "Float8Tensor"
    for kept in ("x_embedder", "context_embedder", "proj_out", "norm_out.linear", "transformer_blocks.0.norm1.linear",
                 "single_transformer_blocks.0.norm.linear", "time_text_embed.timestep_embedder.linear_1"):
        assert kinds[kept] != "Float8Tensor", kept


def test_weight_bytes_counts_fp8_storage():
    lin = torch.nn.Sequential(torch.nn.Linear(64, 128))
    wrapped = torch.nn.Module()
    wrapped.transformer_blocks = torch.nn.ModuleList([lin])
    before = quant.weight_bytes(wrapped)
    quant.quantize_transformer(wrapped, "fp8_weight_only")
    # 1 byte per weight + one fp32 scale per output row; the bias stays fp32
    assert quant.weight_bytes(wrapped) == 64 * 128 + 128 * 4 + 128 * 4
    assert before == (64 * 128 + 128) * 4


@pytest.mark.parametrize("mode", ["fp8_dynamic_row", "fp8_dynamic_tensor"])
def test_dynamic_fp8_on_cpu_is_a_clear_error(mode):
    t = tiny_transformer()
    with pytest.raises(quant.SpeedConfigError, match="compute capability >= 8.9.*cpu.*fp8_weight_only"):
        quant.quantize_transformer(t, mode)
    assert all(type(p).__name__ != "Float8Tensor" for p in t.parameters())  # nothing half-done


def test_unknown_modes_are_clear_errors():
    t = tiny_transformer()
    with pytest.raises(quant.SpeedConfigError, match="unknown quantization mode 'int4'.*fp8_weight_only"):
        quant.quantize_transformer(t, "int4")
    with pytest.raises(quant.SpeedConfigError, match="unknown compile mode 'max'.*regional"):
        compiling.compile_transformer(t, "max")
    with pytest.raises(quant.SpeedConfigError, match="unknown variant part 'turbo'"):
        variants.parse_variant("fp8_weight_only+turbo")
    assert variants.parse_variant("fp8_weight_only+regional+lora@aot_eager") == variants.Variant(
        "fp8_weight_only+regional+lora@aot_eager", "fp8_weight_only", "regional", "aot_eager", True)


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_compile_equals_eager_and_is_steady(mode):
    compiling.reset_compiled()
    t = tiny_transformer()
    x = tiny_inputs(t)
    with torch.no_grad():
        ref = t(**x)[0]
        compiling.compile_transformer(t, mode, backend="aot_eager")
        with compiling.count_recompiles() as first:
            out = t(**x)[0]
        with compiling.count_recompiles(strict=True) as steady:
            out2 = t(**x)[0]
    assert torch.equal(out, ref) and torch.equal(out2, ref)
    # regional: one double-stream graph + one single-stream graph (+1 for the first single block's contiguous input)
    assert first["graphs"] == (3 if mode == "regional" else 1)
    assert steady["graphs"] == 0


def test_fp8_weight_only_then_regional_compile():
    compiling.reset_compiled()
    t = tiny_transformer()
    x = tiny_inputs(t)
    with torch.no_grad():
        quant.quantize_transformer(t, "fp8_weight_only")
        ref = t(**x)[0]
        compiling.compile_transformer(t, "regional", backend="aot_eager")
        out = t(**x)[0]
    assert rel_l2(out, ref) < 1e-5


def test_recompile_guard_raises_on_recompile():
    compiling.reset_compiled()
    t = tiny_transformer()
    compiling.compile_transformer(t, "full", backend="eager")
    with torch.no_grad():
        t(**tiny_inputs(t))
        with pytest.raises(RuntimeError, match="fail_on_recompile"), compiling.count_recompiles(strict=True):
            t(**tiny_inputs(t, n=32))  # a new sequence length needs a new graph


CHILD = """
import json, sys, torch
from tryon_lab import compiling, quant
from tryon_lab.experiments import variants
art = sys.argv[1]
loaded = compiling.load_compile_artifacts(art) if sys.argv[2] == "load" else None
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
x = torch.randn(3, 8)
with torch.no_grad():
    out = torch.compile(m, fullgraph=True)(x)
from torch._dynamo.utils import counters
saved = compiling.save_compile_artifacts(art) if sys.argv[2] == "save" else None
print("RESULT " + json.dumps({"loaded": loaded, "saved": saved, "inductor": dict(counters["inductor"]),
                              "out": out.tolist()}))
"""


def _child(tmp_path: Path, mode: str, cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / cache)}
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "art.bin"), mode], capture_output=True,
                       text=True, env=env, cwd=Path(__file__).resolve().parent.parent, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads([x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])


def test_compile_artifacts_round_trip_in_fresh_processes(tmp_path):
    """Process 1 compiles with inductor and saves; process 2 (empty inductor folder) loads and hits the cache."""
    assert compiling.load_compile_artifacts(tmp_path / "missing.bin") is None
    first = _child(tmp_path, "save", "inductor-a")
    assert first["saved"]["saved"] and first["saved"]["bytes"] > 0
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1
    second = _child(tmp_path, "load", "inductor-b")
    assert second["loaded"]["entries"].get("inductor", 0) >= 1
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1 and second["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert second["out"] == first["out"]


def test_bench_gpu_script_tiny_mode(tmp_path):
    """The GPU benchmark's own code path on the CPU: tiny model, two variants and every cold-start case in fresh
    processes, results written; each case's phases add up to its wall time to the first image, the saved FP8
    weights load in the later cases, and the slim path's imports are counted in the imports phase."""
    from tryon_lab.experiments.coldstart import PHASES
    from tryon_lab.experiments.coldstart_gpu import GPU_CASES

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_gpu.py"
    # the budget is a GPU call's (540 s by default): here every case must run, however slow this machine is today
    p = subprocess.run([sys.executable, str(script), "--tiny", "--variants", "eager,regional", "--out", str(tmp_path),
                        "--work", str(tmp_path / "work"), "--bytecode", "--budget", "3600"], capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "bench_gpu.json").read_text())["bench_gpu"]
    eager, regional = res["steps"]["variants"]["eager"], res["steps"]["variants"]["regional"]
    assert eager["status"] == regional["status"] == "ok"
    assert regional["graphs_first"] > 0 and regional["recompiles_steady"] == 0
    assert regional["latent_rel_l2_vs_eager"] < 1e-5 and eager["ms_per_step"] > 0
    assert "device" in res["stamp"] and (tmp_path / "bench_gpu.md").exists()
    cases = res["cold"]["cases"]
    assert set(cases) == set(GPU_CASES) and all(c["status"] == "ok" for c in cases.values()), cases
    assert res["cold"]["fp8_saved"]["fused_qkv"] is True and "fingerprint" in res["cold"]
    assert res["cold"]["fp8_read"]["equal"] is True  # the bulk reader agrees with load_file on the saved file
    for c in cases.values():
        parts = sum(c[k] for k in PHASES) + c["other"]
        assert abs(parts - c["first_image_wall_s"]) < 1e-6 and all(c[k] >= 0 for k in PHASES)
        assert c["imports"] > 0.5  # torch and diffusers at least
    assert cases["slim, empty cache"]["compile"] > 0  # the first call compiles
    aoti = cases["AOTInductor packages, torch only"]  # exported packages in a process without diffusers
    assert res["cold"]["aoti_export"]["status"] == "ok" and aoti["heavy_modules_loaded"] == []
    assert aoti["rel_l2_vs_slim_eager"] < 1e-4 and aoti["weights_bytes"] > 0
    assert "diffusers" not in aoti["imports_by_package"] and "diffusers" in cases["stock eager"]["imports_by_package"]
    stock = cases["stock eager"]  # each module's own load time: disjoint parts of all the imports
    assert len(stock["imports_slowest_modules"]) == 25 and min(stock["imports_slowest_modules"].values()) >= 0
    parts = cases["slim + FP8 weights, AOT blocks loaded"]["build_parts"]  # the build's own work, part by part
    assert parts["configure.load_slim"]["calls"] == 1 and parts["aot_blocks.apply_aot_blocks"]["calls"] == 1
    assert all(p["wall_s"] >= p["imports_s"] >= 0 for p in parts.values()) and "build_parts" not in stock
    assert sum(stock["imports_slowest_modules"].values()) <= stock["imports_total_s"] + 1e-6
    assert stock["imports_total_s"] >= stock["imports"] - 1e-3
    entered = stock["imports_by_package_entered"]  # a package with all it pulled in, wherever it was entered
    assert all(entered[k] >= v - 1e-3 for k, v in stock["imports_by_package"].items())
    assert entered["transformers"] > 0 and "transformers" not in stock["imports_by_package"]  # entered from diffusers
    assert "Cold start" in (tmp_path / "bench_gpu.md").read_text()
    assert {"diffusers", "tryon_lab"} <= set(res["cold"]["bytecode_build"]["compiled"])
    saved, loaded = cases["slim + FP8 weights, AOT blocks, empty cache"], cases["slim + FP8 weights, AOT blocks loaded"]
    assert all(not r["loaded"] and r["bytes"] > 0 for r in saved["aot_blocks"].values())
    assert all(r["loaded"] and r["fallback_calls"] == 0 for r in loaded["aot_blocks"].values())
    from tryon_lab.import_cache import SERVING_LEFT_OUT

    for name, c in cases.items():  # every later AOT case loads the saved blocks; serving ones leave packages out
        if GPU_CASES[name].aot_blocks == "load":
            assert all(r["loaded"] and r["fallback_calls"] == 0 for r in c["aot_blocks"].values()), name
            case = GPU_CASES[name]  # without transformers: that too, and Redux from the worker process
            assert c.get("left_out", []) == ([*SERVING_LEFT_OUT, *["transformers"] * case.redux_process]
                                             if case.leave_out else []), name
            assert ("transformers" in c["imports_by_package_entered"]) != case.redux_process, name
            assert set(c.get("redux_process", {}).get("worker", {})) == ({"imports", "cuda_init", "load"}
                                                                         if case.redux_process else set()), name
    assert loaded["dynamo_graphs"] == 0 < saved["dynamo_graphs"]  # the loading process traced nothing
    assert "transformer (saved FP8)" in loaded["weights_by_component"]  # which read the build waited for
    assert all(v["load_s"] >= 0 for v in cases["stock eager"]["weights_by_component"].values())
    calls = loaded["transformer_calls_ms"]  # each image's transformer calls, one per step (tiny: 3 steps)
    assert len(calls["first_image"]) == len(calls["steady_image"]) == 3 and min(calls["steady_image"]) > 0
    for name, c in cases.items():  # with the bytecode written first, no case compiles the packages' sources itself
        if not GPU_CASES[name].aoti:  # (the AOTInductor child is a torch-only process of its own)
            assert c["bytecode"]["python_modules"] > 100
            assert "diffusers" not in c["bytecode"]["compiled_here_by_package"], c["bytecode"]


def test_bytecode_report_finds_modules_compiled_from_source(tmp_path, monkeypatch):
    """Modules imported without a bytecode cache (PYTHONDONTWRITEBYTECODE), a package and a one-file module, are
    reported as compiled in that process; after ``compile_bytecode`` they are not."""
    from tryon_lab.experiments.bytecode import compile_bytecode

    (tmp_path / "pkg_x").mkdir()
    (tmp_path / "pkg_x" / "__init__.py").write_text("VALUE = 1\n")
    (tmp_path / "mod_y.py").write_text("VALUE = 2\n")
    code = ("import time, json; t = time.time(); import pkg_x, mod_y; "
            "from tryon_lab.experiments.bytecode import bytecode_report; print(json.dumps(bytecode_report(t)))")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parent.parent)])}

    def report() -> dict:
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    before = report()
    assert before["dont_write_bytecode"]
    assert before["compiled_here_by_package"].get("pkg_x") == before["compiled_here_by_package"].get("mod_y") == 1
    monkeypatch.syspath_prepend(str(tmp_path))
    built = compile_bytecode(("pkg_x", "mod_y", "no_such_package_z"))
    assert built["compiled"] == ["pkg_x", "mod_y"] and built["not_compiled"] == ["no_such_package_z"]
    after = report()["compiled_here_by_package"]
    assert "pkg_x" not in after and "mod_y" not in after


def test_cold_cases_run_in_their_table_order_whatever_order_they_are_named_in():
    """A warm case reads what the empty-cache case wrote: naming it first must not run it first."""
    from tryon_lab.experiments.coldstart_gpu import GPU_CASES, select_cases

    named = ["slim + FP8 weights, warm inductor folder", "slim + FP8 weights, warm artefacts", "stock eager",
             "slim + FP8 weights, empty cache"]
    assert list(select_cases(named)) == [k for k in GPU_CASES if k in named]
    assert list(select_cases(named))[1] == "slim + FP8 weights, empty cache"
    assert list(select_cases(None)) == list(GPU_CASES)
    with pytest.raises(ValueError, match="unknown cold-start cases"):
        select_cases(["slim, warm"])


def test_gpu_bench_levers_and_peers_on_the_tiny_model():
    """The new step-speed rows on the CPU: static FP8 scales and the flux-fast peer stay within tolerance of eager;
    the step-cache rows (ours with first-order extrapolation, and cache-dit) replay the forced schedule and are
    reported per image, against eager's image time."""
    pytest.importorskip("cache_dit")
    from tryon_lab.experiments import fullsize, gpu_bench

    s = fullsize.shape(tiny=True)
    names = ["eager", "fp8_static_fused_regional", "flux_fast_peer", "fp8_row_fused_regional_teacache1",
             "fp8_row_fused_regional_cache_dit", "fp8_static_fused_regional_step_graph_fa3_sigmoid_gelu_multi_kernel"]
    res = gpu_bench.run(names, s, steps=4, quick_steps=3, schedule=[True, False, True, True])["variants"]
    assert all(r["status"] == "ok" for r in res.values()), {k: r.get("reason") for k, r in res.items()}
    assert res["fp8_static_fused_regional"]["static_fp8_layers"] > 0
    for name in ("fp8_static_fused_regional", "flux_fast_peer", names[-1]):
        assert 0 < res[name]["latent_rel_l2_vs_eager"] < 0.05, name
    fast, aten = gpu_bench.RECIPES["flux_fast_peer"], gpu_bench.RECIPES["flux_fast_peer_aten_gemm"]
    assert aten.options == fast.options and aten.extra == fast.extra  # only the GEMM autotuning differs
    assert aten.inductor == {**fast.inductor, "max_autotune_gemm_backends": "ATEN"}
    for name in names[3:5]:
        assert res[name]["computed"] == 3 and res[name]["cache"] and "ms_per_step" not in res[name]
    assert any("per image" in t for t in gpu_bench.targets({"variants": res}))


def test_gpu_bench_stops_a_variant_at_its_budget_and_records_where(monkeypatch):
    """A variant that outruns the budget (a compile longer than a machine's call) is interrupted and kept as a
    "timed out" row naming the part it was in; the next variant, with no time left, is skipped with the reason;
    the transformer-only peer row is the full peer recipe less its VAE lever."""
    import time

    from tryon_lab.experiments import fullsize, gpu_bench
    from tryon_lab.timers import DeadlinePassed, deadline

    def slow(name, r, s, x, steps, quick_steps, reference, schedule=None, phase=None):
        phase["now"] = "first image (compiles)"
        time.sleep(30)
        raise AssertionError("the deadline should have stopped this")

    monkeypatch.setattr(gpu_bench, "run_recipe", slow)
    start = time.perf_counter()
    res = gpu_bench.run(["full", "regional"], fullsize.shape(tiny=True), steps=2, budget_s=16.5)["variants"]
    assert time.perf_counter() - start < 15
    assert res["full"]["status"] == "timed out" and "first image (compiles)" in res["full"]["reason"]
    assert res["regional"]["status"] == "skipped" and "left of the budget" in res["regional"]["reason"]
    with pytest.raises(DeadlinePassed), deadline(0.2):
        time.sleep(5)
    with deadline(0.3):  # a block that ends in time leaves no alarm behind
        pass
    time.sleep(0.5)
    peer, half = gpu_bench.RECIPES["flux_fast_peer_aten_gemm"], gpu_bench.RECIPES["flux_fast_peer_transformer"]
    assert half.options == peer.options and half.inductor == peer.inductor and half.extra is None


def test_gpu_tables_judge_each_row_against_its_own_runs_eager(tmp_path):
    """Notebook 03's GPU tables: a variant is equivalent only within the tolerance of eager's latents; per-image
    rows divide by the eager image time of their own run, never another run's."""
    from tryon_lab.experiments import variants_report

    stamp = {"device": "GPU", "torch": "t", "diffusers": "d"}

    def entry(date, eager_s, **rows):
        return {"model": "random", "shape": "s", "stamp": {**stamp, "date": date},
                "steps": {"variants": {"eager": {"status": "ok", "ms_per_step": 100.0, "image_s": eager_s,
                                                 "peak_bytes": 2**30}, **rows}}}

    ok = {"status": "ok", "ms_per_step": 50.0, "image_s": 1.0, "latent_rel_l2_vs_eager": 0.01}
    far = {**ok, "latent_rel_l2_vs_eager": 0.05}
    cached = {"status": "ok", "image_s": 0.5, "cache": "teacache1"}
    data = {"bench_gpu": entry("d0", 4.0, close=ok, far=far),
            variants_report.PER_IMAGE_RUNS[0]: entry("d1", 4.0, x_cache=cached, close=ok),
            variants_report.PER_IMAGE_RUNS[1]: entry("d2", 6.0, y_teacache1=cached)}
    (tmp_path / "r.json").write_text(json.dumps(data))
    rows, _ = variants_report.gpu_steps(tmp_path / "r.json")
    verdict = {r["variant"]: r["verdict"] for r in rows}
    assert verdict["close"].startswith("equivalent") and verdict["far"].startswith("NOT equivalent")
    per_image, where = variants_report.gpu_per_image(tmp_path / "r.json")
    ratio = {(r["run"], r["variant"]): r["image vs eager"] for r in per_image}
    assert ratio == {("d1", "eager"): 1.0, ("d1", "x_cache"): 8.0, ("d2", "eager"): 1.0, ("d2", "y_teacache1"): 12.0}
    assert len(where) == 2


def test_probed_levers_are_judged_by_their_time_and_error(tmp_path):
    """Notebook 03's probe table: a kernel is a lever only when it is faster than the one it replaces and its output
    stays within the tolerance; each verdict follows the numbers of the results file."""
    from tryon_lab.experiments import variants_report

    stamp = {"date": "d"}
    ok = {"status": "ok", "rel_l2_vs_fp32": 0.002}
    data = {"attention_fp8_probe": {"stamp": stamp, "kernels": {
                "cudnn_bf16": {**ok, "ms": 0.5}, "flex_fp8_fast": {**ok, "ms": 0.3},
                "flex_fp8_off": {"status": "ok", "ms": 0.3, "rel_l2_vs_fp32": 0.9},
                "flex_fp8_slow": {**ok, "ms": 1.0}, "flex_fp8_broken": {"status": "failed"},
                "fa3_fp8_per_head": {**ok, "ms": 0.3}, "flash_bf16": {**ok, "ms": 0.4}}},
            "single_block_gemm_probe": {"stamp": stamp, "forms": {
                "bf16": {"fused_ms": 0.85, "separate_ms": 0.8, "fused_rel_l2_vs_separate": 0.0},
                "fp8": {"fused_ms": 0.4, "separate_ms": 0.5, "fused_rel_l2_vs_separate": 0.01}}}}
    (tmp_path / "r.json").write_text(json.dumps(data))
    verdict = {r["lever"].split("(")[-1].rstrip(")"): r["verdict"] for r in variants_report.gpu_probes(tmp_path / "r.json")}
    assert verdict == {"fast": "a lever", "off": "faster but off", "slow": "2.00x the time: not a lever",
                       "fp8 per head": "a lever", "bf16": "1.06x the time: not a lever", "fp8": "a lever"}


def test_whole_model_compile_rounds_like_eager():
    """Whole-model inductor compile in bf16 (CPU, trained toy model, 4 steps): with exact casts (the default) the
    final latents stay as close to eager as regional compile's; inductor's default fp32 intermediates at the top
    level move them more (measured here: 0.0053 against 0.0135; on the full-size H200 run 0.08)."""
    from tests.conftest import make_request_images
    from tryon_lab import configure, pipeline
    from tryon_lab.checkpoint import TRAINED_DIR

    request = pipeline.TryOnRequest(*make_request_images(96, 128), seed=3)

    def latents(**options):
        compiling.reset_compiled()
        pipe = configure.build_pipeline(str(TRAINED_DIR), configure.PipelineOptions(dtype="bfloat16", **options))
        return pipeline.tryon(pipe, request, pipeline.TryOnSettings(steps=4, progress=False)).latents.float()

    eager = latents()
    exact = rel_l2(latents(compile="full"), eager)
    inductor_default = rel_l2(latents(compile="full", compile_exact_casts=False), eager)
    print(f"whole-model compile vs eager (bf16): exact casts {exact:.4f}, inductor default {inductor_default:.4f}")
    assert exact < 0.008 and exact < 0.6 * inductor_default


def test_profile_files_triton_kernels_by_prefix_and_refiles_old_profiles():
    """Inductor names Triton kernels after the ops they fuse: an FP8 activation-quantize kernel carries
    ``scaled_mm``, a copy before a collective ``all_to_all``; neither is a GEMM or NCCL. Old profiles are refiled
    from their top kernels, their totals kept."""
    from tryon_lab.experiments.step_profile import TRITON, kernel_kind, refiled

    quant = "triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_gelu_t_unsqueeze_view_15"
    rope = "triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention__to_copy_add_mul_neg_permute_sp"
    copy = "triton_poi_fused_all_to_all_single_clone_permute_view_19"
    assert {kernel_kind(k) for k in (quant, rope, copy)} == {TRITON}
    assert kernel_kind("triton_tem_fused__scaled_mm_0") == "GEMM"
    assert kernel_kind("nvjet_sm90_qqtst_128x128_128x6_4x2_h_bz_ovscale_bias_TNT") == "GEMM"
    fa3 = "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<flash::CollectiveMainloop"
    assert kernel_kind(fa3) == "attention"  # a CUTLASS template, but attention (FA3)
    assert kernel_kind("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>") == "GEMM"
    assert kernel_kind("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "communication (NCCL)"
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    old = {"GEMM": 55.0, "attention": 29.0, TRITON: 8.0, "communication (NCCL)": 12.0}
    new = refiled(old, {quant: 2.5, rope: 3.0, copy: 1.0, "nvjet_x": 19.0})
    assert new == pytest.approx({"GEMM": 52.5, "attention": 26.0, TRITON: 14.5, "communication (NCCL)": 11.0})
    assert sum(new.values()) == pytest.approx(sum(old.values()))


def test_step_profile_names_the_top_kernels_of_each_kind():
    """``bench_gpu.py --profile`` on the tiny model (CPU): time per step by kind, each kind with its slowest
    kernels, which are parts of that kind's time, slowest first."""
    from tryon_lab.experiments.gpu_bench import profile_step

    rows = profile_step("eager", tiny=True, steps=2)
    assert rows and [r["ms_per_step"] for r in rows] == sorted((r["ms_per_step"] for r in rows), reverse=True)
    for r in rows:
        top = r["top_kernels"]
        assert 1 <= len(top) <= 8 and top[0]["kernel"].startswith(r["top"])
        assert [k["ms_per_step"] for k in top] == sorted((k["ms_per_step"] for k in top), reverse=True)
        assert sum(k["ms_per_step"] for k in top) <= r["ms_per_step"] * (1 + 1e-9)
    assert any("mm" in k["kernel"] or "linear" in k["kernel"] for r in rows for k in r["top_kernels"])


def test_step_profile_builds_the_variant_as_its_row_does():
    """The profile of a variant whose lever is not an option (static FP8 scales) profiles that lever too: it goes
    through the rows' own ``configure``, so the calibrated static FP8 layers are in the profiled model."""
    from unittest import mock

    from tryon_lab.experiments import gpu_bench

    reports, original = [], gpu_bench.configure

    def configure(*args):
        reports.append((args[1], original(*args)))
        return reports[-1][1]

    with mock.patch.object(gpu_bench, "configure", configure):
        rows = gpu_bench.profile_step("fp8_static_fused_regional", tiny=True, steps=1)
    [(recipe, report)] = reports
    assert recipe is gpu_bench.RECIPES["fp8_static_fused_regional"] and recipe.extra == "static_fp8"
    assert report["static_fp8_layers"] > 0 and rows


def test_bench_gpu_profile_writes_a_stamped_results_file(tmp_path):
    """``bench_gpu.py --profile VARIANT`` (tiny model, CPU) leaves OUT/profile_VARIANT.json: device, commit and
    date, the model and shape, and the rows by kernel kind."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--tiny", "--profile", "eager", "--steps", "1",
                        "--out", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "profile_eager.json").read_text())
    assert {"device", "commit", "date"} <= set(res["stamp"]) and res["variant"] == "eager"
    assert "random weights" in res["model"] and "1 steps profiled" in res["shape"]
    assert res["rows"] and all(r["ms_per_step"] >= 0 and r["top_kernels"] for r in res["rows"])


def test_a_cold_run_without_disk_for_an_fp8_folder_skips_its_cases_and_says_why(tmp_path, monkeypatch):
    """Each FP8 mode a case loads is a folder of ~2/3 of the bf16 transformer (16 GiB at full size, on a 64 GiB
    disk): when it does not fit, it is not written and its cases are skipped with the free space in the reason."""
    import shutil
    from collections import namedtuple

    from tryon_lab.experiments import coldstart_gpu, fullsize

    monkeypatch.setattr(shutil, "disk_usage", lambda _p: namedtuple("usage", "total used free")(0, 0, 0))
    name = "slim + FP8 weights, AOT blocks loaded"
    res = coldstart_gpu.gpu_run(fullsize.shape(tiny=True), tmp_path, steps=1, names=[name])
    saved = res["fp8_saved_by_mode"]["fp8_weight_only"]  # the CPU stand-in of every FP8 mode
    assert saved["status"] == "skipped" and "GiB free" in saved["reason"] and "fp8_read" not in res
    assert res["cases"][name]["status"] == "skipped" and "prepare_fp8 did not run" in res["cases"][name]["reason"]


def test_cold_targets_take_each_case_median_over_its_rounds():
    # Best-of-N would flatter a lever: a case run in several rounds counts with its median, stock's too.
    from tryon_lab.experiments.coldstart_gpu import targets

    def ok(t: float) -> dict:
        return {"status": "ok", "first_image_wall_s": t}

    cases = {"stock eager": ok(16.0), "lever": ok(7.9), "slim, empty cache": ok(31.0), "broken": {"status": "failed"},
             "stock eager (round 2)": ok(18.0), "lever (round 2)": ok(9.0), "lever (round 3)": ok(10.0)}
    warm, empty = targets(cases)
    assert warm.startswith("warm: lever 9.0 s (median of 3: 7.9-10.0) vs stock 17.0 s (median of 2: 16.0-18.0)")
    assert "= 0.53x" in warm and warm.endswith("NOT met)")
    assert empty == "empty cache: slim, empty cache 31.0 s (target <= 30 s: NOT met)"
    assert targets({"lever": ok(5.0)}) == []  # no stock case: no ratio to state


def test_single_block_gemm_probe_runs_small_and_its_fused_gemm_equals_the_two(tmp_path):
    """``scripts/probe_single_block_gemm.py`` at a small shape on the CPU: one fused input GEMM gives the two
    separate outputs side by side (the bf16 form's fp32 stand-in here), and the file is stamped."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "probe_single_block_gemm.py"
    p = subprocess.run([sys.executable, str(script), "--tokens", "32", "--dim", "32", "--reps", "2", "--out",
                        str(tmp_path / "gemm.json")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "gemm.json").read_text())
    row = res["forms"]["bf16"]
    assert res["stamp"]["device"].startswith("cpu") and set(res["forms"]) == {"bf16"}  # FP8 forms need CUDA
    assert row["fused_rel_l2_vs_separate"] < 1e-6 and row["separate_ms"] > 0 and row["fused_ms"] > 0
    assert row["saved_ms_per_step"] == pytest.approx(38 * row["saved_ms_per_block"])


def test_early_reads_probe_runs_small_and_reads_every_byte_in_both_orders(tmp_path):
    """``scripts/probe_early_reads.py`` on the CPU with a 20 MB file: each fresh process imports the serving
    imports and reads the whole file, the read started after them or at torch's import; stamped, summarized."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "probe_early_reads.py"
    modes = "after,early,early-chunk1-switch0.5"  # a read in flight of 1 MiB, the GIL handed over every 0.5 ms
    p = subprocess.run([sys.executable, str(script), "--gb", "0.02", "--rounds", "1", "--device", "cpu", "--modes",
                        modes, "--out", str(tmp_path / "early.json")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "early.json").read_text())
    assert res["stamp"]["device"].startswith("cpu") and list(res["runs"]) == modes.split(",")
    for mode, (row,) in res["runs"].items():
        assert row["status"] == "ok" and row["bytes"] == 16 * (20_000_000 // 16), mode
        assert row["torch"] <= row["cuda"] <= row["imports"] and row["read_done"] >= row["torch"] + row["read_s"] * 0.9
    assert res["summary"]["read_done_saved_s"] == pytest.approx(
        res["runs"]["after"][0]["read_done"] - res["runs"]["early"][0]["read_done"])


def test_early_reads_probe_rows_come_from_the_results_file(tmp_path):
    """Notebook 03's probe table: one row per fresh process, the read's wait after the imports from its marks."""
    from tryon_lab.experiments import variants_report

    def run(torch_s, imports, done):
        return {"status": "ok", "torch": torch_s, "imports": imports, "read_done": done, "read_s": 1.0,
                "waited_s": max(0.0, done - imports)}

    entry = {"stamp": {"device": "NVIDIA H200", "date": "d", "torch": "t"}, "bytes": 15.2e9, "note": "a probe",
             "runs": {"after": [run(3.0, 9.0, 10.1)], "early": [run(3.0, 9.5, 9.5), {"status": "failed"}]}}
    (tmp_path / "r.json").write_text(json.dumps({variants_report.GPU_EARLY_READS_KEY: entry}))
    rows, where = variants_report.gpu_early_reads(tmp_path / "r.json")
    assert [r["process"] for r in rows] == ["read after imports (1)", "read at torch (1)"]
    assert rows[0]["wait for the read"] == pytest.approx(1.1) and rows[1]["wait for the read"] == 0.0
    assert rows[0]["CUDA context and imports"] == pytest.approx(6.0) and "15.2 GB" in where and "H200" in where


def test_gelu_tanh_as_sigmoid_is_the_same_function():
    """x * sigmoid(2z) equals GELU's tanh form to fp32 rounding, tails included (no overflow at |x| = 1e4)."""
    x = torch.cat([torch.linspace(-12, 12, 20001), torch.tensor([-1e4, -100.0, 0.0, 100.0, 1e4])])
    ref = torch.nn.functional.gelu(x, approximate="tanh")
    out = compiling.gelu_tanh_as_sigmoid(x)
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 2e-6
    xb = x.bfloat16()  # in bf16 it computes in fp32, as eager GELU does, and rounds once
    assert rel_l2(compiling.gelu_tanh_as_sigmoid(xb), torch.nn.functional.gelu(xb, approximate="tanh")) < 1e-4


def test_sigmoid_gelu_swaps_every_tanh_gelu_and_keeps_the_transformer_output():
    t = tiny_transformer()
    x = tiny_inputs(t)
    with torch.no_grad():
        ref = t(**x)[0]
        changed = compiling.sigmoid_gelu(t)
        out = t(**x)[0]
    # a double block's feed-forwards (image and text) and each single block's MLP activation
    assert changed == 2 * TINY.num_layers + TINY.num_single_layers
    assert not any(isinstance(m, torch.nn.GELU) for m in t.modules())
    assert rel_l2(out, ref) < 1e-5


def test_block_kernels_probe_runs_tiny_and_projects_a_step_from_its_blocks(tmp_path):
    """``block_kernels.probe`` on the tiny model (CPU, native attention): each knob set compiles the quantized
    blocks, times each block class on the inputs it was called with, and projects a step by the block counts;
    the sigmoid-GELU set changes the model after the config-only ones, whatever order they are named in."""
    from tryon_lab.experiments import fullsize
    from tryon_lab.experiments.block_kernels import BLOCKS, probe

    s = fullsize.shape(tiny=True)
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    res = probe(s, ["sigmoid_gelu", "default"], "native", tmp_path, calls=2)
    assert list(res["rows"]) == ["default", "sigmoid_gelu"]
    counts = {k: s.transformer[v] for k, v in BLOCKS.items()}
    assert res["blocks_per_step"] == counts
    for row in res["rows"].values():
        assert row["status"] == "ok", row["status"]
        assert set(row["block_ms"]) == set(BLOCKS) and all(v > 0 for v in row["block_ms"].values())
        assert row["projected_blocks_ms_per_step"] == pytest.approx(
            sum(row["block_ms"][n] * counts[n] for n in BLOCKS))
        assert row["rel_l2_vs_eager"] < 1e-3  # static FP8 eager against the same compiled
        assert set(row["triton_ms_by_block"]) == set(BLOCKS) and row["projected_triton_ms_per_step"] == pytest.approx(
            sum(row["triton_ms_by_block"][n] * counts[n] for n in BLOCKS))
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before  # each knob set's folder, then put back


def test_block_kernel_rows_split_each_knob_sets_triton_time_by_kernel_kind(tmp_path):
    """Notebook 03's probe chart: per knob set, the Triton kernels' time split into GELU, norm and the rest (other
    kernels, such as the GEMMs, not counted); a knob set that failed has no row."""
    from tryon_lab.experiments import variants_report

    kernels = {"triton_poi_fused_gelu_3": {"ms_per_call": 0.1}, "triton_poi_fused_mul_sigmoid_4": {"ms_per_call": 0.02},
               "triton_red_fused_native_layer_norm_1": {"ms_per_call": 0.04}, "triton_poi_fused_add_2":
               {"ms_per_call": 0.01}, "nvjet_sm90_qqtst": {"ms_per_call": 0.5}}
    entry = {"stamp": {"device": "NVIDIA H200", "date": "d", "torch": "t"},
             "rows": {"default": {"status": "ok", "kernels": kernels, "rel_l2_vs_eager": 0.004},
                      "block_ptr": {"status": "failed: InductorError"}}}
    (tmp_path / "k.json").write_text(json.dumps({"probe_block_kernels_knobs": entry}))
    rows, where = variants_report.gpu_block_kernels(tmp_path / "k.json")
    assert [r["knob set"] for r in rows] == ["default (knobs run)"] and "H200" in where
    assert rows[0]["GELU kernels"] == pytest.approx(0.12) and rows[0]["norm kernels"] == pytest.approx(0.04)
    assert rows[0]["other Triton"] == pytest.approx(0.01) and rows[0]["Triton ms / call"] == pytest.approx(0.17)
    committed, _ = variants_report.gpu_block_kernels()  # the committed probe: the sigmoid set's GELU time is lower
    by = {r["knob set"]: r for r in committed}
    assert by["sigmoid_gelu (sigmoid_gelu run)"]["GELU kernels"] < by["default (sigmoid_gelu run)"]["GELU kernels"]
