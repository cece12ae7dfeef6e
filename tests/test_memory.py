"""Memory modes, the budget planner, out-of-memory recovery (injected on the CPU) and the hot-path loop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.conftest import make_request_images
from tryon_lab import hotpath, logos, memory, oom, pipeline
from tryon_lab.experiments import loops
from tryon_lab.memory import GiB, MemoryBudgetError, MemoryMode

# A budget table in the shape scripts/bench_memory_gpu.py writes (numbers chosen for the cases below).
BUDGET = {
    "modes": {
        "bf16": {"peak_bytes": 33 * GiB, "s_per_image": 5.0},
        "fp8": {"peak_bytes": 18 * GiB, "s_per_image": 3.5},
        "fp8+vae-tiling": {"peak_bytes": 13.5 * GiB, "s_per_image": 3.7},
        "bf16+model-offload": {"peak_bytes": 26 * GiB, "s_per_image": 9.0},
        "bf16+group-offload": {"peak_bytes": 7 * GiB, "s_per_image": 20.0},
        "bf16+sequential-offload": {"peak_bytes": 3 * GiB, "s_per_image": 60.0},
        "fp8+model-offload": {"ok": False, "error": "not measured", "peak_bytes": 1, "s_per_image": 0.1},
    },
    "logo": {"per_logo_bytes": 1 * GiB, "resident_bytes": {"fp8": 13 * GiB, "fp8+vae-tiling": 13 * GiB,
                                                           "bf16": 25 * GiB}},
}


@pytest.mark.parametrize("limit_gib, expect, batch", [
    (80, "fp8", 4),  # fastest of all fits
    (24, "fp8", 4),  # 18 GiB fits 22.8 usable; 13 + 4 logos fits
    (16, "fp8+vae-tiling", 2),  # fp8 needs 18 > 15.2; 13 + 2 x 1 fits 15.2
    (10, "bf16+group-offload", 1),
    (4, "bf16+sequential-offload", 1),
])
def test_planner_picks_fastest_mode_that_fits(limit_gib, expect, batch):
    plan = memory.plan_for_limit(int(limit_gib * GiB), BUDGET, logos=4)
    assert plan.mode.name == expect and plan.logo_batch == batch
    assert plan.peak_bytes <= limit_gib * GiB * 0.95
    assert "failed when measured" in plan.explain()  # the broken fastest mode is skipped, and said so
    assert f"chosen {expect}" in plan.reasons[-1]


def test_logo_batch_from_measured_peak_when_resident_is_unknown():
    budget = {**BUDGET, "components": {"activations, one request": {"bytes": 3 * GiB}},
              "modes": {**BUDGET["modes"], "bf16+group-offload": {"peak_bytes": 7 * GiB, "s_per_image": 20.0,
                                                                   "peak_allocated_bytes": 6 * GiB}}}
    plan = memory.plan_for_limit(int(6.5 * GiB), budget, logos=4)  # 6.175 usable: 3 resident + 3 x 1 per logo
    assert plan.mode.name == "bf16+sequential-offload"  # group needs 7 > 6.175
    plan = memory.plan_for_limit(10 * GiB, budget, logos=4)  # 9.5 usable: 3 + 4 x 1 fits
    assert plan.mode.name == "bf16+group-offload" and plan.logo_batch == 4
    assert "peak minus one request's activations" in plan.reasons[-1]


def test_planner_without_fp8_and_when_nothing_fits():
    plan = memory.plan_for_limit(24 * GiB, BUDGET, fp8_available=False)
    assert plan.mode == MemoryMode(offload="group") and "compute capability" in plan.explain()
    with pytest.raises(MemoryBudgetError, match="smallest needs 3.0 GiB"):
        memory.plan_for_limit(2 * GiB, BUDGET)


def test_mode_names_round_trip_and_bad_names_are_named():
    for mode in (MemoryMode(), MemoryMode(True, "model", True), MemoryMode(False, "group", False, True)):
        assert MemoryMode.parse(mode.name) == mode
    with pytest.raises(ValueError, match="start with bf16 or fp8"):
        MemoryMode.parse("fp16")
    with pytest.raises(ValueError, match="unknown part"):
        MemoryMode.parse("bf16+vae-tilling")
    with pytest.raises(ValueError, match="unknown offload"):
        MemoryMode(offload="disk")


def test_missing_budget_says_how_to_measure(tmp_path):
    with pytest.raises(FileNotFoundError, match="bench_memory_gpu.py"):
        memory.load_budget(tmp_path / "none.json")


def _oom():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def _request(seed=0):
    p, g, m = make_request_images()
    return pipeline.TryOnRequest(p, g, m, seed=seed)


@pytest.mark.parametrize("stage", ["decode", "denoise"])
def test_tryon_out_of_memory_retries_once_with_vae_tiling(slim, monkeypatch, stage):
    settings = pipeline.TryOnSettings(steps=2, progress=False)
    ref = pipeline.tryon(slim, _request(), settings)
    real, calls = getattr(pipeline, stage), []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise _oom()
        return real(*a, **k)

    monkeypatch.setattr(pipeline, stage, flaky)
    try:
        out = pipeline.tryon(slim, _request(), settings)
        assert slim.fill.vae.use_tiling and len(calls) == 2
        assert out.recoveries == [f"{stage}: out of memory; retried with VAE tiling (left on for later requests)"]
        # the image is smaller than one VAE tile, so tiling changes nothing: the same result, not a lost one
        assert np.array_equal(np.asarray(out.images[0]), np.asarray(ref.images[0]))
    finally:
        slim.fill.vae.disable_tiling()


def test_second_out_of_memory_is_raised_not_hidden(slim, monkeypatch):
    def always(*a, **k):
        raise _oom()

    monkeypatch.setattr(pipeline, "decode", always)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            pipeline.tryon(slim, _request(), pipeline.TryOnSettings(steps=1, progress=False))
    finally:
        slim.fill.vae.disable_tiling()
    with pytest.raises(ValueError, match="not oom"):  # other errors pass straight through, no retry
        oom.retry_with_vae_tiling(lambda: (_ for _ in ()).throw(ValueError("not oom")), slim.fill.vae, [], "x")
    assert not slim.fill.vae.use_tiling


def test_logo_batch_out_of_memory_is_halved_until_it_fits(slim, monkeypatch):
    p, g, _ = make_request_images(96, 96)
    boxes = [(0, 0, 24, 24), (30, 0, 54, 24), (60, 0, 84, 24), (0, 40, 24, 64), (30, 40, 54, 64)]
    matches = logos.known_matches(boxes, boxes)
    settings = pipeline.TryOnSettings(steps=1, progress=False)
    ref = logos.logo_pass(slim, p, g, matches, settings, batched=True, size=32)
    real, sizes = logos.tryon, []

    def small_memory(pipe, reqs, *a, **k):  # a card that holds at most 2 logos at once
        sizes.append(len(reqs) if isinstance(reqs, list) else 1)
        if sizes[-1] > 2:
            raise _oom()
        return real(pipe, reqs, *a, **k)

    monkeypatch.setattr(logos, "tryon", small_memory)
    out = logos.logo_pass(slim, p, g, matches, settings, batched=True, size=32)
    assert sizes == [5, 3, 2, 1, 2] and out.calls == 5
    assert out.recoveries == ["batch of 5 out of memory; split into 3 + 2", "batch of 3 out of memory; split into 2 + 1"]
    assert len(out.patches) == 5
    for a, b in zip(out.patches, ref.patches, strict=True):  # per-request seeds: the same patches as one batch
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1


def test_split_on_oom_raises_for_a_single_item():
    def run(items):
        raise _oom()

    with pytest.raises(torch.OutOfMemoryError):
        oom.split_on_oom(run, [1], [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hot_path_is_bit_identical_to_the_stock_loop(slim, dtype):
    fill = copy.deepcopy(slim.fill).to(dtype=dtype)  # a copy: casting the shared fixture would round its weights
    reqs = [_request(0), _request(5)]
    prepared = pipeline.prepare(reqs)
    tokens, _ = pipeline.encode_garments(slim, [pipeline.garment_of(p) for p in prepared])
    pe, pooled = pipeline.conditioning(slim.prompt_embeds.to(dtype), slim.pooled_prompt_embeds.to(dtype),
                                       tokens.to(dtype))
    plain = pipeline.TryOnSettings(steps=3, progress=False)
    hot = pipeline.TryOnSettings(steps=3, progress=False, hot_path=True)
    seen = []
    a = pipeline.denoise(fill, prepared, pe, pooled, plain, [0, 5])
    b = pipeline.denoise(fill, prepared, pe, pooled, hot, [0, 5], callback=lambda *x: seen.append(x[1]))
    assert a.dtype == b.dtype == dtype and torch.equal(a, b) and seen == [0, 1, 2]
    w, h = prepared[0].diptych.size
    for x, y in zip(pipeline.decode(fill, a, h, w), pipeline.decode(fill, b, h, w, hot_path=True), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))  # on-device postprocess: the same bytes


def test_hot_loop_buffers_are_reused_in_place(slim):
    """The loop writes into the buffers made before it: same storage after every step, nothing rebound."""
    fill = slim.fill
    prepared = pipeline.prepare([_request()])
    tokens, _ = pipeline.encode_garments(slim, [pipeline.garment_of(p) for p in prepared])
    pe, pooled = pipeline.conditioning(slim.prompt_embeds, slim.pooled_prompt_embeds, tokens)
    w, h = prepared[0].diptych.size
    state = hotpath.prepare_state(fill, [p.diptych for p in prepared], [p.mask for p in prepared], pe, pooled, h, w,
                                  3, 30.0, pipeline.generators([0]))
    ptrs = [t.data_ptr() for t in (state.inputs, state.latents32, state.update)]
    cond = state.inputs[..., state.latent_channels:].clone()
    before = state.latents.clone()
    out = hotpath.denoise_hot(fill, state)
    assert [t.data_ptr() for t in (state.inputs, state.latents32, state.update)] == ptrs
    assert out.data_ptr() == state.inputs.data_ptr() and not torch.equal(out, before)
    assert torch.equal(state.inputs[..., state.latent_channels:], cond)  # conditioning written once, untouched


def test_step_allocations_split_model_from_loop():
    counter = hotpath.StepAllocations(torch.nn.Identity(), "cpu")
    counter.starts, counter.ends = [0, 110, 215], [100, 205, 300]
    assert counter.per_step() == [{"step": 0, "model": 100, "loop": 10}, {"step": 1, "model": 95, "loop": 10}]


def test_hot_path_composes_with_teacache_hooks(slim):
    """Caches are hooks on the transformer, so the hot loop runs them exactly as the stock loop does."""
    from tryon_lab import teacache

    prepared = pipeline.prepare([_request()])
    tokens, _ = pipeline.encode_garments(slim, [pipeline.garment_of(p) for p in prepared])
    pe, pooled = pipeline.conditioning(slim.prompt_embeds, slim.pooled_prompt_embeds, tokens)
    out, skipped = {}, {}
    for hot in (False, True):
        cfg = teacache.TeaCacheConfig(rel_l1_thresh=0.6, num_inference_steps=6)
        with teacache.enabled(slim.transformer, cfg):
            out[hot] = pipeline.denoise(slim.fill, prepared, pe, pooled,
                                        pipeline.TryOnSettings(steps=6, progress=False, hot_path=hot), [0])
            skipped[hot] = teacache.teacache_stats(slim.transformer)["skipped"]
    assert torch.equal(out[False], out[True]) and skipped[False] == skipped[True] > 0


def test_compare_denoise_loops_reports_both_loops(slim):
    rows, identical = loops.compare_denoise_loops(slim, _request(3), pipeline.TryOnSettings(steps=2))
    assert identical and [r["loop"] for r in rows] == ["stock loop", "hot path"]
    assert all(r["denoise s"] > 0 for r in rows)


def test_planner_with_no_measured_modes_names_the_measuring_command():
    for table in ({"modes": {}}, {}, {"modes": {"bf16": {"ok": False, "error": "OOM"}}}):
        with pytest.raises(MemoryBudgetError, match="no measured modes.*scripts/bench_memory_gpu.py --parts budget"):
            memory.plan_for_limit(24 * GiB, table)


def test_bench_with_a_fresh_raw_file_merges_into_the_existing_table(tmp_path, monkeypatch):
    """A partial run (one mode, a fresh --raw) keeps every mode the table had, each stamped by its own run."""
    import json
    import subprocess

    from tryon_lab.experiments import memory_bench

    budget = tmp_path / "memory_budget.json"
    old = {**copy.deepcopy(BUDGET), "stamp": {"date": "old run"}}
    budget.write_text(json.dumps(old))

    real_run = subprocess.run

    def fake_child(cmd, **kw):  # what a child process of ``run`` writes for one mode part
        if memory_bench.__name__ not in cmd:  # git and the like, for the stamp
            return real_run(cmd, **kw)
        part, out = cmd[-3], cmd[-1]
        with open(out, "w") as f:
            json.dump({"modes": {part: {"peak_bytes": 25 * GiB, "s_per_image": 8.0, "ok": True}}}, f)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(memory_bench.subprocess, "run", fake_child)
    b = memory_bench.Bench(tiny=True, budget=str(budget))
    assert memory_bench.run("bf16+model-offload", b, tmp_path / "fresh_raw.json", tmp_path / "results.json") == 0
    table = json.loads(budget.read_text())
    assert set(table["modes"]) == set(BUDGET["modes"])  # nothing measured before was lost
    assert table["modes"]["bf16+model-offload"]["peak_bytes"] == 25 * GiB  # the re-measured one is new
    assert table["modes"]["bf16+model-offload"]["stamp"]["date"] != "old run"
    assert table["modes"]["fp8"]["stamp"] == {"date": "old run"} and table["modes"]["fp8"]["peak_bytes"] == 18 * GiB
    assert table["logo"]["resident_bytes"] == BUDGET["logo"]["resident_bytes"]
    assert memory.plan_for_limit(80 * GiB, table).mode == MemoryMode(fp8=True)
