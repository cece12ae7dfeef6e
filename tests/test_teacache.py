"""TeaCache: exactness at threshold 0, forced steps, state resets, fit, coefficient files, compile, LoRA, sweep."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import make_request_images
from tryon_lab import pipeline
from tryon_lab import teacache as tc
from tryon_lab.experiments import teacache_bench
from tryon_lab.experiments import teacache_fit as tf


def _settings(steps: int) -> pipeline.TryOnSettings:
    return pipeline.TryOnSettings(steps=steps, progress=False)


def _req(seed=0, size=64):
    person, garment, mask = make_request_images(size, size, seed)
    return pipeline.TryOnRequest(person, garment, mask, seed=seed, name=f"r{seed}")


def _decisions(transformer) -> list[bool]:
    return [s["computed"] for s in tc.teacache_stats(transformer)["last_trajectory"]]


@pytest.fixture(scope="module")
def transformer(model_dir):
    """A private copy of the transformer (compile and LoRA change it), called directly with small inputs."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(model_dir / "FLUX.1-Fill-dev" / "transformer").eval().requires_grad_(False)


def _inputs(cfg, n=32, t=16):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, n, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, t, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(t, 3), guidance=torch.tensor([30.0]), return_dict=False)


def _trajectory(model, inputs, steps=6, **extra) -> list[torch.Tensor]:
    """A denoising-like loop without a pipeline (so no pipeline-end reset): Euler steps on the latents."""
    h, outs = inputs["hidden_states"].clone(), []
    for t in torch.linspace(1.0, 0.1, steps):
        with torch.no_grad():
            o = model(**{**inputs, "hidden_states": h}, timestep=t.reshape(1), **extra)[0]
        outs.append(o)
        h = h.clone()
        h[..., : o.shape[-1]] -= 0.1 * o
    return outs


def test_threshold_zero_reproduces_full_compute_exactly(slim):
    ref = pipeline.tryon(slim, _req(), _settings(4))
    with tc.enabled(slim.transformer, tc.TeaCacheConfig(0.0, num_inference_steps=4)):
        out = pipeline.tryon(slim, _req(), _settings(4))
        stats = tc.teacache_stats(slim.transformer)
    assert torch.equal(out.latents, ref.latents)
    assert (stats["computed"], stats["skipped"]) == (4, 0)


def test_large_threshold_skips_but_never_forced_steps(slim):
    cfg = tc.TeaCacheConfig(1e6, always_compute_first=2, always_compute_last=1, num_inference_steps=6)
    with tc.enabled(slim.transformer, cfg):
        pipeline.tryon(slim, _req(), _settings(6))
        assert _decisions(slim.transformer) == [True, True, False, False, False, True]
        assert tc.teacache_stats(slim.transformer)["skipped"] == 3
    capped = tc.TeaCacheConfig(1e6, max_consecutive_skips=1, num_inference_steps=6)
    with tc.enabled(slim.transformer, capped):
        pipeline.tryon(slim, _req(), _settings(6))
        assert _decisions(slim.transformer) == [True, False, True, False, True, True]


def test_state_resets_between_pipeline_calls(slim):
    with tc.enabled(slim.transformer, tc.TeaCacheConfig(0.2, num_inference_steps=5)):
        a = pipeline.tryon(slim, _req(), _settings(5))
        da = _decisions(slim.transformer)
        b = pipeline.tryon(slim, _req(), _settings(5))
        assert _decisions(slim.transformer) == da and not all(da)
    assert torch.equal(a.latents, b.latents)


def test_new_trajectory_detected_without_pipeline_and_remove_restores(transformer):
    inputs = _inputs(transformer.config)
    ref = _trajectory(transformer, inputs)
    with tc.enabled(transformer, tc.TeaCacheConfig(1e6, num_inference_steps=6)):
        a, b = _trajectory(transformer, inputs), _trajectory(transformer, inputs)  # timestep jumps back up: reset
        assert tc.teacache_stats(transformer)["trajectories"] == 2
    with tc.enabled(transformer, tc.TeaCacheConfig(1e6)), pytest.warns(UserWarning, match="last steps"):
        _trajectory(transformer, inputs)
        assert _decisions(transformer)[-1] is False
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(a[0], ref[0]) and not torch.equal(a[2], ref[2])
    assert all(torch.equal(x, y) for x, y in zip(_trajectory(transformer, inputs), ref, strict=True))


def test_fit_recovers_known_polynomial():
    true = [3.0, -1.5, 0.8, 0.02]  # cubic, highest power first
    rng = np.random.default_rng(0)
    recs = []
    for i in range(6):
        x = np.sort(rng.uniform(0.02, 0.4, 12))
        recs.append({"name": f"r{i}", "x": x.tolist(), "y": np.polyval(true, x).tolist()})
    fit = tf.fit_coefficients(recs, degree=3, holdout=2)
    np.testing.assert_allclose(fit.coefficients, true, rtol=1e-6, atol=1e-9)
    assert fit.holdout_mae < 1e-9 and fit.holdout_requests == ["r4", "r5"]
    auto = tf.fit_coefficients(recs)  # degrees 3..5 tie on exact data: 4 is the default
    assert auto.degree == 4 and auto.holdout_mae < 1e-8
    noisy = [{**r, "y": (np.asarray(r["y"]) + rng.normal(0, 1e-3, 12)).tolist()} for r in recs]
    assert tf.fit_coefficients(noisy, holdout=2).holdout_mae < 3e-3
    few = tf.fit_coefficients([{"name": "a", "x": [0.1, 0.2, 0.3], "y": [1.0, 2.0, 3.0]}], holdout=0)
    assert few.degree == 2 and few.holdout_mae is None  # default 4 lowered to what three pairs can fit
    assert "no held-out requests" in tf.describe_fit(few) and "held-out MAE" in tf.describe_fit(auto)
    assert [r["chosen"] for r in tf.degree_table(auto)].count("yes") == 1


def test_coefficients_round_trip_and_fingerprint_check(tmp_path):
    cal = tf.Calibration([{"name": f"r{i}", "seed": i, "timesteps": [0.9, 0.8], "x": [0.1 + i / 100, 0.2],
                           "y": [0.2, 0.3 + i / 50]} for i in range(4)], 12, 30.0, [256, 192], "f" * 64, "test model", "float32")
    fit = tf.fit_coefficients(cal, degree=1, holdout=1)
    path = tc.save_coefficients(tmp_path / "c.json", fit, cal, recommended_threshold=0.3)
    data = tc.load_coefficients(path, expected_fingerprint="f" * 64)
    assert data["coefficients"] == fit.coefficients and data["recommended_threshold"] == 0.3
    assert data["calibration_requests"][0] == {"name": "r0", "seed": 0} and data["holdout_requests"][0]["name"] == "r3"
    assert data["model"]["fingerprint"] == "f" * 64 and data["steps"] == 12 and "date" in data
    with pytest.raises(ValueError, match="fitted on model"):
        tc.load_coefficients(path, expected_fingerprint="0" * 64)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**data, "coefficients": []}))
    with pytest.raises(ValueError, match="coefficients"):
        tc.load_coefficients(bad)
    bad.write_text(json.dumps({"coefficients": [1.0]}))
    with pytest.raises(ValueError, match="not a TeaCache coefficients file"):
        tc.load_coefficients(bad)


@pytest.mark.parametrize("kwargs, match", [
    ({"rel_l1_thresh": -0.1}, "rel_l1_thresh"),
    ({"rel_l1_thresh": float("nan")}, "rel_l1_thresh"),
    ({"coefficients": []}, "coefficients"),
    ({"coefficients": [1.0, float("inf")]}, "coefficients"),
    ({"coefficients": [[1.0, 2.0]]}, "coefficients"),
    ({"always_compute_first": -1}, "always_compute_first"),
    ({"max_consecutive_skips": -1}, "max_consecutive_skips"),
    ({"input_range": (0.5, 0.1)}, "input_range"),
])
def test_bad_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tc.TeaCacheConfig(**kwargs)


def test_apply_twice_and_wrong_module_raise(transformer):
    with tc.enabled(transformer, tc.TeaCacheConfig()):
        with pytest.raises(ValueError, match="already applied"):
            tc.apply_teacache(transformer, tc.TeaCacheConfig())
    with pytest.raises(ValueError, match="not applied"):
        tc.teacache_stats(transformer)
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        tc.apply_teacache(torch.nn.Linear(2, 2), tc.TeaCacheConfig())


def test_no_recompile_across_steps_under_regional_compile(model_dir):
    from diffusers import FluxTransformer2DModel

    torch._dynamo.reset()
    model = FluxTransformer2DModel.from_pretrained(model_dir / "FLUX.1-Fill-dev" / "transformer").eval()
    inputs = _inputs(model.config)
    tc.apply_teacache(model, tc.TeaCacheConfig(0.15, max_consecutive_skips=1, num_inference_steps=6))
    model.compile_repeated_blocks(backend="eager")
    try:
        _trajectory(model, inputs)  # warm-up: compiles each block class once
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with torch.compiler.set_stance("fail_on_recompile"):
            a, b = _trajectory(model, inputs), _trajectory(model, inputs)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs > 0
        decisions = _decisions(model)
        assert True in decisions[1:-1] and False in decisions  # both paths ran under the stance
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    finally:
        torch._dynamo.reset()


def test_peft_lora_and_lora_scale(transformer):
    """LoRA layers act on every module TeaCache calls itself, with the call's LoRA scale."""
    from peft import LoraConfig

    inputs, skipping = _inputs(transformer.config), tc.TeaCacheConfig(0.15, max_consecutive_skips=1, num_inference_steps=6)
    with tc.enabled(transformer, skipping):
        base = _trajectory(transformer, inputs)
        assert False in _decisions(transformer)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["x_embedder", "to_q", "norm1.linear", "proj_out"]))
    try:
        for extra in ({}, {"joint_attention_kwargs": {"scale": 0.5}}):
            ref = _trajectory(transformer, inputs, **extra)
            with tc.enabled(transformer, tc.TeaCacheConfig(0.0, always_compute_last=0)):
                assert all(torch.equal(x, y) for x, y in zip(_trajectory(transformer, inputs, **extra), ref, strict=True))
        with tc.enabled(transformer, skipping):  # scale 0 switches the adapter off on the skip path too
            off = _trajectory(transformer, inputs, joint_attention_kwargs={"scale": 0.0})
            on = _trajectory(transformer, inputs)
        assert all(torch.equal(x, y) for x, y in zip(off, base, strict=True))
        assert not torch.equal(on[-2], base[-2])
    finally:
        transformer.delete_adapters("default_0")


def test_calibrate_sweep_recommend_and_plots(slim, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    reqs = [_req(seed=i) for i in range(3)]
    cal = tf.calibrate(slim, reqs, _settings(4))
    assert [len(r["x"]) for r in cal.requests] == [3, 3, 3] and cal.fingerprint == slim.fingerprint
    fit = tf.fit_coefficients(cal, holdout=1)
    assert fit.holdout_requests == ["r2"] and all(math.isfinite(c) for c in fit.coefficients)
    data = tc.load_coefficients(tc.save_coefficients(tmp_path / "c.json", fit, cal), slim.fingerprint)
    assert data["resolution"] == [128, 64]
    target = reqs[2].person
    rows = tf.sweep(slim, reqs[2:], [0.0, 1e6], _settings(4), fit.coefficients, targets=[target],
                    published_thresholds=[1e6], input_range=fit.input_range,
                    diffusers_params={"first_block_cache": [0.1], "mag_cache": [0.5], "taylorseer": [2]})
    methods = [r["method"] for r in rows]
    assert methods == ["full", "teacache", "teacache", "teacache_published", "first_block_cache", "mag_cache", "taylorseer"]
    full, exact, skipping = rows[:3]
    assert full["computed"] == 4 and full["speedup"] == 1.0 and math.isinf(full["psnr"])
    assert exact["computed"] == 4 and math.isinf(exact["psnr"]) and exact["latent_rel_l2"] == 0.0
    assert skipping["computed"] == 2 and skipping["psnr"] < 200 and "gt_psnr" in skipping
    assert tf.recommend_threshold(rows, min_psnr=1e9) == 0.0
    assert tf.recommend_threshold(rows, min_psnr=0.0) == 1e6
    for fig in (tf.plot_calibration(cal, fit), tf.plot_pareto(rows), tf.plot_samples(rows, target=target)):
        assert fig.axes
    assert "images" not in tf.scalar_rows(rows)[0]


def test_step_cost_bench_tiny(tmp_path):
    res = teacache_bench.run(tmp_path / "b.json", tiny=True, compile="off")
    saved = json.loads((tmp_path / "b.json").read_text())["teacache_step_cost"]
    assert saved["stamp"]["device"] and res["eager"]["teacache_skip_stats"]["skipped"] == 2
    assert res["eager"]["teacache_compute_stats"]["skipped"] == 0


def test_a_recorded_schedule_replays_the_same_decisions_and_result(slim):
    """What the GPU benchmark relies on: the pattern TeaCache chose, replayed, gives the same passes and latents."""
    req = _req(3)
    with tc.enabled(slim.transformer, tc.TeaCacheConfig(0.5, num_inference_steps=8)):
        chosen = pipeline.tryon(slim, req, _settings(8))
        pattern = _decisions(slim.transformer)
    assert 2 <= sum(pattern) < len(pattern)  # some steps skipped, some computed
    with tc.enabled(slim.transformer, tc.TeaCacheConfig(schedule=tuple(pattern))):
        replayed = pipeline.tryon(slim, req, _settings(8))
        assert _decisions(slim.transformer) == pattern
    assert torch.equal(replayed.latents, chosen.latents)
    other = [True] * len(pattern)
    other[3] = False
    with tc.enabled(slim.transformer, tc.TeaCacheConfig(schedule=tuple(other))):
        pipeline.tryon(slim, req, _settings(8))
        assert _decisions(slim.transformer) == other  # the schedule, not the threshold, decides
