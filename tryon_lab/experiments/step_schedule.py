"""A compute schedule for the step cache, fitted on calibration trajectories: which steps run the block stack.

On the trained model, our first-order step cache (``TeaCacheConfig(order=1)``) replaying the steps that cache-dit's
DBCache + TaylorSeer computes is as close to full compute as cache-dit itself, without running a block on the
skipped steps: at a given number of passes, what decides quality is *which* steps are computed. So the choice is
fitted offline, once per step count, like TeaCache's coefficients:

1. ``record`` runs the calibration requests with full compute and keeps, per step, the block stack's input and
   residual (output minus input), the final-norm embedding and the model output, and the step sizes.
2. ``extrapolation_errors`` scores skipping step s after the computed steps a < b (predicting s's residual from
   theirs to first order, as the hook does), by one of two proxies: the residual's relative error, or the model
   output's error times the step size (what it moves the latents by).
3. ``fit_schedule``: exactly ``passes`` computed steps, the first and the last among them, with the least summed
   error (dynamic programming over the last two computed steps).
4. ``fit_schedules`` keeps, per pass budget, the proxy whose schedule is closer to full compute on the
   calibration requests themselves, then ``refine``s it there in closed loop: one computed step moved at a time
   to a skipped neighbour, kept when the images get closer to full compute (the proxies are open loop: they
   score each skip as if every earlier step had been computed).

The schedule is static: no decision at run time, the same steps for every request.
``peer`` puts it into ``teacache_fit.sweep`` as the method ``teacache_scheduled``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..metrics import psnr
from ..pipeline import tryon
from ..teacache import TeaCacheConfig, enabled

METHOD = "teacache_scheduled"
PROXIES = ("residual", "output")
FACTORS = (2, 3, 4)  # pass budgets, as steps / passes: the comparison's points (notebook 02's lead table)


@dataclass
class Trajectory:
    """One full-compute request, per step: stack input, stack residual, final-norm embedding, model output."""

    x: list[torch.Tensor]
    residual: list[torch.Tensor]
    temb: list[torch.Tensor]
    output: list[torch.Tensor]
    step_sizes: np.ndarray  # |sigma_(s+1) - sigma_s|
    image: object  # the full-compute image (PIL), the reference of the closed-loop choice


def record(pipe, requests, settings) -> list[Trajectory]:
    """Full compute on each request (one per call), with hooks reading the stack's input and output."""
    return [_record_one(pipe, r, replace(settings, progress=False)) for r in requests]


@torch.no_grad()
def _record_one(pipe, request, settings) -> Trajectory:
    tr = pipe.transformer
    seen: dict[str, list] = {"x": [], "stack": [], "temb": [], "output": []}

    def keep(name):
        return lambda module, inputs, output: seen[name].append(output.detach().clone())

    def norm_in(module, args):  # the stack output and the embedding the final norm modulates with
        seen["stack"].append(args[0].detach().clone())
        seen["temb"].append(args[1].detach().clone())

    hooks = [tr.x_embedder.register_forward_hook(keep("x")), tr.norm_out.register_forward_pre_hook(norm_in),
             tr.proj_out.register_forward_hook(keep("output"))]
    try:
        result = tryon(pipe, [request], settings)
    finally:
        for h in hooks:
            h.remove()
    sigmas = pipe.fill.scheduler.sigmas.detach().double().cpu().numpy()
    return Trajectory(seen["x"], [s - x for s, x in zip(seen["stack"], seen["x"], strict=True)], seen["temb"],
                      seen["output"], np.abs(np.diff(sigmas))[: len(seen["x"])], result.images[0])


@torch.no_grad()
def extrapolation_errors(trajectories: list[Trajectory], transformer, proxy: str = "residual") -> np.ndarray:
    """``E[a + 1, b, s]``: the error of skipping step s when a < b are the last two computed steps (a = -1: only b,
    so the residual is reused as it is), averaged over the trajectories. Every later step s of one (a, b) is
    predicted in one batch."""
    if proxy not in PROXIES:
        raise ValueError(f"proxy must be one of {PROXIES}, got {proxy!r}")
    n = len(trajectories[0].residual)
    errors = np.zeros((n + 1, n, n))
    for t in trajectories:
        r = torch.cat(t.residual)  # (steps, tokens, width): one request per call, so batch 1 per step
        x, temb, out = torch.cat(t.x), torch.cat(t.temb), torch.cat(t.output)
        for b in range(n - 1):
            later = torch.arange(b + 1, n)
            for a in range(-1, b):
                ahead = ((later - b) / (b - a)).to(r.dtype).view(-1, 1, 1) if a >= 0 else 0.0
                pred = r[b] + (r[b] - r[a]) * ahead if a >= 0 else r[b].expand_as(r[later])
                if proxy == "residual":
                    e = (r[later] - pred).flatten(1).norm(dim=1) / r[later].flatten(1).norm(dim=1)
                else:
                    v = transformer.proj_out(transformer.norm_out(x[later] + pred, temb[later]))
                    e = torch.as_tensor(t.step_sizes[b + 1:]) * (v - out[later]).flatten(1).norm(dim=1)
                errors[a + 1, b, b + 1:] += e.double().cpu().numpy() / len(trajectories)
    return errors


def fit_schedule(errors: np.ndarray, passes: int) -> tuple[bool, ...]:
    """Exactly ``passes`` computed steps, the first and the last among them, with the least summed ``errors`` of
    the skipped ones. Dynamic programming over (last two computed steps, count)."""
    n = errors.shape[1]
    if not 2 <= passes <= n:
        raise ValueError(f"passes must be between 2 and the {n} steps, got {passes}")
    # gap[a + 1, b, c]: errors summed over the steps before c, so the steps skipped between b and c sum to
    # gap[., b, c] - gap[., b, b + 1]
    gap = np.concatenate([np.zeros((n + 1, n, 1)), np.cumsum(errors, axis=2)], axis=2)
    best: dict[tuple[int, int, int], tuple[float, tuple | None]] = {(-1, 0, 1): (0.0, None)}
    for b in range(n - 1):  # states are extended in order of their last computed step
        for (a, last, k), (cost, _) in [kv for kv in best.items() if kv[0][1] == b]:
            for c in range(b + 1, n):
                if k + 1 > passes or (c == n - 1) != (k + 1 == passes):  # the last step ends the schedule
                    continue
                total = cost + gap[a + 1, b, c] - gap[a + 1, b, b + 1]
                if (b, c, k + 1) not in best or total < best[(b, c, k + 1)][0]:
                    best[(b, c, k + 1)] = (total, (a, last, k))
    end = min((v[0], key) for key, v in best.items() if key[1] == n - 1 and key[2] == passes)[1]
    computed = set()
    while end is not None:
        computed.add(end[1])
        end = best[end][1]
    return tuple(i in computed for i in range(n))


REFINE_EVALS = 8  # closed-loop runs per pass budget by default (notebook 02's: ahead of cache-dit at all six points)


def schedule_config(schedule: tuple[bool, ...], steps: int) -> TeaCacheConfig:
    """The first-order step cache computing exactly the ``schedule``'s steps."""
    return TeaCacheConfig(schedule=tuple(schedule), order=1, num_inference_steps=steps)


def refine(score, schedule: tuple[bool, ...], max_evals: int = REFINE_EVALS, shifts=(-1, 1, -2, 2),
           min_gain: float = 0.05) -> tuple[tuple[bool, ...], float, int]:
    """Closed-loop local search from ``schedule``: move one computed step (never the first or the last) by one of
    ``shifts`` onto a skipped step, and keep the first move that raises ``score(schedule)`` (mean PSNR against
    full compute) by ``min_gain``; repeat until no move does or ``max_evals`` scores were run. Returns the
    schedule, its score and the number of scores run (the start's included)."""
    best, evals = tuple(schedule), 1
    top = score(best)
    moved = True
    while moved and evals < max_evals:
        moved = False
        moves = [(i, i + d) for i in range(1, len(best) - 1) if best[i] for d in shifts
                 if 0 < i + d < len(best) - 1 and not best[i + d]]
        for i, j in moves:
            if evals >= max_evals:
                break
            trial = tuple(j == m or (c and m != i) for m, c in enumerate(best))
            value = score(trial)
            evals += 1
            if value > top + min_gain:
                best, top, moved = trial, value, True
                break
    return best, top, evals


def fit_schedules(pipe, trajectories: list[Trajectory], requests, settings, budgets, judge: int = 2,
                  refine_evals: int = REFINE_EVALS) -> dict[int, dict]:
    """Per pass budget: each proxy's schedule, the one closer to full compute on the first ``judge`` calibration
    ``requests`` (mean PSNR against their recorded images; equal schedules run once), then ``refine``d on them
    with at most ``refine_evals`` runs (0: not refined)."""
    from .teacache_fit import run_counted

    cache: dict[tuple, float] = {}

    def score(sched: tuple[bool, ...]) -> float:
        if sched not in cache:
            cfg = schedule_config(sched, settings.steps)
            runs, _ = run_counted(pipe, requests[:judge], settings, context=lambda: enabled(pipe.transformer, cfg))
            cache[sched] = float(np.mean([psnr(r.images[0], t.image) for r, t in zip(runs, trajectories,
                                                                                      strict=False)]))
        return cache[sched]

    errors = {p: extrapolation_errors(trajectories, pipe.transformer, p) for p in PROXIES}
    out = {}
    for k in budgets:
        candidates = {p: fit_schedule(errors[p], k) for p in PROXIES}
        proxy = max(PROXIES, key=lambda p: score(candidates[p]))
        start = candidates[proxy]
        sched, value, evals = refine(score, start, refine_evals) if refine_evals else (start, score(start), 0)
        out[k] = {"schedule": sched, "proxy": proxy, "calibration_psnr": value, "fitted": start,
                  "fitted_psnr": score(start), "refine_runs": evals}
    return out


def budgets(steps: int, factors=FACTORS) -> list[int]:
    """The whole pass counts either side of steps / factor (at least 2): the comparison at 28 / 3 = 9.33 passes
    reads between 9 and 10."""
    return sorted({max(2, f(steps / k)) for k in factors for f in (math.floor, math.ceil)})


def peer(calibration_requests, factors=FACTORS, refine_evals: int = REFINE_EVALS):
    """``teacache_fit.sweep(peers=[...])``'s form: fits the schedules at the sweep's step count on
    ``calibration_requests`` (``refine_evals``: see ``fit_schedules``), then runs the sweep's requests with each:
    ``(method, setting, value, results, passes)``."""
    from .teacache_fit import run_counted

    def run(pipe, requests, settings):
        trajectories = record(pipe, calibration_requests, settings)
        fitted = fit_schedules(pipe, trajectories, calibration_requests, settings, budgets(settings.steps, factors),
                               refine_evals=refine_evals)
        rows = []
        for k, f in fitted.items():
            cfg = schedule_config(f["schedule"], settings.steps)
            results, passes = run_counted(pipe, requests, settings, context=lambda c=cfg: enabled(pipe.transformer, c))
            pattern = "".join("C" if c else "." for c in f["schedule"])
            how = f"{f['proxy']} proxy" + (", refined" if f["schedule"] != f["fitted"] else "")
            rows.append((METHOD, f"{k} passes, {how}: {pattern}", float(k), results, passes))
        return rows

    return run
