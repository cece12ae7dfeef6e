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


def _stack_io(model, inputs, cfg, steps):
    """Per transformer call: the block-stack input x (the last ``x_embedder`` output before ``norm_out``), what
    ``norm_out`` got (the stack output, or on a skipped step x + the reused residual) and its conditioning; and
    the outputs and decisions."""
    last_x, calls = [], []
    h1 = model.x_embedder.register_forward_hook(lambda m, a, o: last_x.append(o))
    h2 = model.norm_out.register_forward_pre_hook(lambda m, a: calls.append((last_x[-1], a[0], a[1])))
    try:
        with tc.enabled(model, cfg):
            outs = _trajectory(model, inputs, steps=steps)
            decisions = _decisions(model)
    finally:
        h1.remove()
        h2.remove()
    return calls, outs, decisions


def test_order_one_extrapolates_the_skipped_residual_on_a_forced_schedule(transformer):
    schedule = (True, True, False, False, True, False, True)
    calls, outs, decisions = _stack_io(transformer, _inputs(transformer.config),
                                       tc.TeaCacheConfig(schedule=schedule, order=1), 7)
    assert decisions == list(schedule) and len(calls) == 7
    x = [c[0] for c in calls]
    r = {k: calls[k][1] - x[k] for k in (0, 1, 4)}  # residuals of the computed steps
    expected = {2: x[2] + (r[1] + (r[1] - r[0]) / 1 * 1), 3: x[3] + (r[1] + (r[1] - r[0]) / 1 * 2),
                5: x[5] + (r[4] + (r[4] - r[1]) / 3 * 1)}
    for k, want in expected.items():
        torch.testing.assert_close(calls[k][1], want, rtol=0, atol=1e-6)
        with torch.no_grad():
            direct = transformer.proj_out(transformer.norm_out(want, calls[k][2]))
        torch.testing.assert_close(outs[k], direct, rtol=0, atol=1e-6)
    assert not torch.allclose(calls[3][1], x[3] + r[1], atol=1e-4)  # it moved away from plain reuse


def test_order_zero_reuses_and_order_one_needs_two_computed_steps(transformer):
    schedule = (True, False, True, False, True, True)
    for order in (0, 1):
        calls, _, _ = _stack_io(transformer, _inputs(transformer.config),
                                tc.TeaCacheConfig(schedule=schedule, order=order), 6)
        x = [c[0] for c in calls]
        r0, r2 = calls[0][1] - x[0], calls[2][1] - x[2]
        assert torch.equal(calls[1][1], x[1] + r0)  # one computed step: no slope yet, plain reuse either way
        if order == 0:
            assert torch.equal(calls[3][1], x[3] + r2)  # today's rule, bit for bit
        else:
            torch.testing.assert_close(calls[3][1], x[3] + (r2 + (r2 - r0) / 2), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="order"):
        tc.TeaCacheConfig(order=2)


def test_order_one_state_resets_between_trajectories(transformer, slim):
    inputs = _inputs(transformer.config)
    with tc.enabled(transformer, tc.TeaCacheConfig(1e6, num_inference_steps=6, order=1)):
        a, b = _trajectory(transformer, inputs), _trajectory(transformer, inputs)
        assert _decisions(transformer) == [True, False, False, False, False, True]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    cfg = tc.TeaCacheConfig(0.5, num_inference_steps=8, order=1)
    with tc.enabled(slim.transformer, cfg):
        first = pipeline.tryon(slim, _req(3), _settings(8))
        pattern = _decisions(slim.transformer)
        second = pipeline.tryon(slim, _req(3), _settings(8))
    assert 2 <= sum(pattern) < len(pattern) and torch.equal(first.latents, second.latents)
    with tc.enabled(slim.transformer, tc.TeaCacheConfig(schedule=tuple(pattern), order=1)):
        replayed = pipeline.tryon(slim, _req(3), _settings(8))
    assert torch.equal(replayed.latents, first.latents)  # the GPU replay of an order-1 pattern


# ------------------------------------------------------------------------------ peers, equal passes, steps vs quality
def _rows(method, pts):
    return [{"method": method, "computed": c, "psnr": v} for c, v in pts]


def test_psnr_at_equal_passes_and_who_leads():
    from tryon_lab.experiments import teacache_report as tr

    rows = _rows("full", [(12, math.inf)]) + _rows("a", [(6, 40.0), (3, 30.0), (4, 31.0), (4, 33.0)])
    rows += _rows("b", [(6, 44.0), (4, 35.0), (12, math.inf)])
    assert tr.psnr_at(rows, "a", 6) == 40.0 and tr.psnr_at(rows, "a", 5) == pytest.approx(36.5)  # 4 -> best, 33
    assert tr.psnr_at(rows, "a", 2) is None and tr.psnr_at(rows, "b", 3) is None and tr.psnr_at(rows, "c", 4) is None
    lead = tr.lead_table({12: rows})
    assert [r["passes"] for r in lead] == ["6 (2x fewer)", "4 (3x fewer)", "3 (4x fewer)"]
    assert (lead[0]["leads"], lead[0]["by dB"]) == ("b", 4.0) and (lead[1]["leads"], lead[1]["by dB"]) == ("b", 2.0)
    assert (lead[2]["leads"], lead[2]["b"], lead[2]["by dB"]) == ("a", "", "") and "full" not in lead[0]
    fig = tr.plot_passes({12: rows, 28: _rows("b", [(14, 40.0), (7, 33.0)])})
    assert len(fig.axes) == 2 and [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]


def test_peer_left_out_with_the_reason_when_cache_dit_is_missing(monkeypatch):
    import importlib.util

    from tryon_lab.experiments import cache_dit_peer
    from tryon_lab.experiments import teacache_report as tr

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cache_dit" else real(name, *a))
    peers, note = tr.peers([0.1])
    assert peers == [] and "not installed" in note and "cache-dit==1.5.3" in note
    assert tr.peers([0.1], include=False)[0] == []
    with pytest.raises(RuntimeError, match="not installed"):
        cache_dit_peer.run(None, [], _settings(2))
    with pytest.raises(ValueError, match="thresholds"):
        cache_dit_peer.PeerConfig(thresholds=(-1.0,))


@pytest.mark.slow
def test_cache_dit_peer_runs_in_its_own_process_and_is_scored_like_the_rest(slim):
    pytest.importorskip("cache_dit")
    from tryon_lab.experiments import cache_dit_peer

    peer = cache_dit_peer.runner(cache_dit_peer.PeerConfig(thresholds=(0.0, 1e6)))
    rows = tf.sweep(slim, [_req(5)], [], _settings(5), [1.0, 0.0], include_diffusers=False, targets=[None],
                    orders=(), peers=[peer])
    assert [r["method"] for r in rows] == ["full", cache_dit_peer.METHOD, cache_dit_peer.METHOD]
    exact, skipping = rows[1:]
    assert exact["computed"] == 5 and math.isinf(exact["psnr"])  # the child reproduces full compute bit for bit
    assert skipping["computed"] < 5 and skipping["psnr"] < 200 and skipping["setting"].endswith("threshold=1000000.0")


def test_steps_quality_lists_failing_schedulers_and_adds_the_step_cache(slim):
    import matplotlib

    from tryon_lab.experiments import steps_quality as sq

    matplotlib.use("Agg")
    req = _req(6)
    rows, failed = sq.steps_quality(slim, [req], [req.person], _settings(1), steps=(1, 2),
                                    schedulers=("euler", "heun", "unipc"), reference_steps=2,
                                    caches={2: tc.TeaCacheConfig(1e6, order=1, always_compute_last=0)})
    assert [(r["scheduler"], r["steps"], r["computed"]) for r in rows] == [
        ("euler", 1, 1), ("euler", 2, 2), ("euler + teacache", 2, 1)]
    assert math.isinf(rows[1]["psnr"]) and rows[0]["psnr"] < 200 and "gt_psnr" in rows[0]
    assert {f["scheduler"]: f["reason"].split(":")[0] for f in failed} == {"heun": "ValueError",
                                                                           "unipc": "AttributeError"}
    assert "sigmas" in failed[0]["reason"] and "`heun`" in sq.failed_note(failed)
    assert type(slim.fill.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # put back after each
    assert sq.plot(rows, 2).axes
    with pytest.raises(ValueError, match="unknown scheduler"):
        sq.steps_quality(slim, [req], [None], _settings(1), steps=(2,), schedulers=("nope",), reference_steps=2)


def _schedule_cost(errors: np.ndarray, schedule: tuple[bool, ...]) -> float:
    """The summed error of a schedule's skipped steps, predicted from the last two computed steps."""
    computed, cost = [], 0.0
    for s, c in enumerate(schedule):
        if c:
            computed.append(s)
        else:
            a = computed[-2] if len(computed) > 1 else -1
            cost += errors[a + 1, computed[-1], s]
    return cost


def test_fitted_schedule_is_the_cheapest_of_all_schedules():
    """The dynamic programme against brute force on a random error table: exactly `passes` computed steps, the
    first and the last among them, and no other such schedule skips more cheaply."""
    import itertools

    from tryon_lab.experiments import step_schedule

    n = 8
    errors = np.random.default_rng(0).random((n + 1, n, n))
    for passes in range(2, n + 1):
        sched = step_schedule.fit_schedule(errors, passes)
        assert sum(sched) == passes and sched[0] and sched[-1]
        every = [tuple(i in {0, n - 1, *mid} for i in range(n))
                 for mid in itertools.combinations(range(1, n - 1), passes - 2)]
        assert math.isclose(_schedule_cost(errors, sched), min(_schedule_cost(errors, s) for s in every))
    with pytest.raises(ValueError, match="passes"):
        step_schedule.fit_schedule(errors, 1)


def test_refine_moves_computed_steps_to_where_the_score_is_higher():
    """The closed-loop search on a known score (the closer to a target schedule, the higher): it walks there by
    single moves, keeps the pass count and the first and last steps, and stops at its run budget."""
    from tryon_lab.experiments import step_schedule

    target = (True, False, False, True, False, True, False, True)
    start = (True, True, False, False, False, False, True, True)

    def score(s):
        assert sum(s) == 4 and s[0] and s[-1]
        return -sum(a != b for a, b in zip(s, target, strict=True))

    best, value, runs = step_schedule.refine(score, start, max_evals=50)
    assert best == target and value == 0 and runs < 50
    capped, _, runs = step_schedule.refine(score, start, max_evals=3)
    assert runs == 3 and capped != target
    assert step_schedule.refine(score, target)[:2] == (target, 0)  # nothing better: unchanged


def test_fitted_schedules_run_in_the_sweep_with_their_pass_counts(slim):
    """The fitted schedule as a sweep row: trajectories recorded, both proxies scored, each budget's schedule run
    on the sweep's requests with exactly that many block-stack passes (counted by the sweep's own hook)."""
    from tryon_lab.experiments import step_schedule

    reqs = [_req(seed=i) for i in range(3)]
    trajectories = step_schedule.record(slim, reqs[:2], _settings(6))
    assert [len(t.residual) for t in trajectories] == [6, 6] and trajectories[0].step_sizes.shape == (6,)
    errors = {p: step_schedule.extrapolation_errors(trajectories, slim.transformer, p) for p in step_schedule.PROXIES}
    assert all(e.shape == (7, 6, 6) and np.all(e >= 0) and e[0, 0, 1] > 0 for e in errors.values())
    a, b, s = 1, 3, 5  # one entry by hand: skip step 5 after computing 1 and 3, averaged over both requests
    by_hand = {"residual": [], "output": []}
    with torch.no_grad():
        for t in trajectories:
            pred = t.residual[b] + (t.residual[b] - t.residual[a]) * (s - b) / (b - a)
            by_hand["residual"].append(float((t.residual[s] - pred).norm() / t.residual[s].norm()))
            v = slim.transformer.proj_out(slim.transformer.norm_out(t.x[s] + pred, t.temb[s]))
            by_hand["output"].append(float(t.step_sizes[s] * (v - t.output[s]).norm()))
    for proxy, e in errors.items():
        assert math.isclose(e[a + 1, b, s], np.mean(by_hand[proxy]), rel_tol=1e-4), proxy
    fit = step_schedule.fit_schedules(slim, trajectories, reqs[:2], _settings(6), [3], refine_evals=4)[3]
    assert sum(fit["schedule"]) == sum(fit["fitted"]) == 3 and fit["refine_runs"] <= 4
    assert fit["calibration_psnr"] >= fit["fitted_psnr"]  # the refinement keeps a move only when it gains
    rows = tf.sweep(slim, reqs[2:], [], _settings(6), [1.0, 0.0], include_diffusers=False,
                    peers=[step_schedule.peer(reqs[:2], factors=(2, 3), refine_evals=4)])
    scheduled = [r for r in rows if r["method"] == step_schedule.METHOD]
    assert [r["computed"] for r in scheduled] == [2, 3] and all(r["psnr"] < 200 for r in scheduled)
    assert step_schedule.budgets(28) == [7, 9, 10, 14] and step_schedule.budgets(12) == [3, 4, 6]
