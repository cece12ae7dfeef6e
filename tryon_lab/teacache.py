"""TeaCache for FLUX Fill: skip the transformer blocks on steps whose input barely changed.

TeaCache (Liu et al. 2024, arXiv 2411.19108) watches block 0's modulated input (the AdaLayerNormZero output of
``transformer_blocks[0].norm1``), rescales its relative L1 change with a polynomial fitted on full-compute
trajectories, and accumulates it; while the sum stays under ``rel_l1_thresh`` the step reuses the residual of
the whole block stack (stack output minus stack input) from the last computed step.

Written the way diffusers writes its caches (config dataclass, ``BaseState`` + ``StateManager``, ``ModelHook``s
registered through ``HookRegistry``), with one difference in where the hooks sit: the decision is taken by a hook
on the transformer itself and a skipped step never calls the blocks. No hook touches a block, so under
``compile_repeated_blocks`` the compiled blocks see the same code on every step (no recompiles), and PEFT LoRA
wrappers are called through the modules as usual. A second, record-only hook on ``norm_out`` reads the stack
output. Whole-model ``torch.compile`` is not supported (the decision is Python control flow).

``order=1`` extrapolates the skipped residual to first order, as TaylorSeer (Liu et al. 2025, arXiv 2503.06923)
does: residual + slope x steps since the last computed step, the slope from the last two computed residuals.

A batch takes one decision (the change is averaged over the batch): run requests one by one for per-image skips.
This module is the hook and its coefficient files only; calibration, coefficient fitting, the sweep against
diffusers' caches and their plots are experiments (``tryon_lab.experiments.teacache_fit``).
"""

from __future__ import annotations

import inspect
import json
import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers.hooks.hooks import BaseState, CacheContext, HookRegistry, ModelHook, StateManager

# Published for FLUX.1-dev text-to-image (the TeaCache repository): a baseline, not fitted on FLUX Fill.
PUBLISHED_FLUX_COEFFICIENTS = [498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861]
IDENTITY_COEFFICIENTS = [1.0, 0.0]  # no rescaling: accumulate the raw change of the modulated input
FORMAT = "tryon_lab.teacache/1"
_HOOK = "teacache"
_STACK_HOOK = "teacache_stack_output"


@dataclass
class TeaCacheConfig:
    """``coefficients``: rescale polynomial, highest power first (``numpy.polyval`` order).

    ``num_inference_steps`` lets the hook know which steps are the last ones (``always_compute_last``); a
    diffusers ``cache_context(..., num_inference_steps=n)`` also provides it. ``record`` keeps the relative
    change of the model output per step (calibration; costs one extra output-sized tensor). ``input_range``
    clamps the measured change into the calibrated range before rescaling: a polynomial fitted on a narrow range
    can turn wild (or negative, i.e. "skip forever") outside it.
    """

    rel_l1_thresh: float = 0.3
    coefficients: list[float] = field(default_factory=lambda: list(IDENTITY_COEFFICIENTS))
    always_compute_first: int = 1
    always_compute_last: int = 1
    max_consecutive_skips: int | None = None
    num_inference_steps: int | None = None
    input_range: tuple[float, float] | None = None
    record: bool = False
    schedule: tuple[bool, ...] | None = None  # replay: compute exactly at the True steps (timing a recorded pattern)
    order: int = 0  # 0: reuse the last residual; 1: extrapolate it along the last two computed ones (TaylorSeer)

    def __post_init__(self):
        t = self.rel_l1_thresh
        if not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ValueError(f"TeaCacheConfig: rel_l1_thresh must be a finite number >= 0, got {t!r}.")
        c = np.asarray(self.coefficients, dtype=np.float64) if self.coefficients is not None else np.empty(0)
        if c.ndim != 1 or c.size == 0 or not np.all(np.isfinite(c)):
            raise ValueError("TeaCacheConfig: coefficients must be a non-empty flat list of finite numbers "
                             f"(highest power first, as numpy.polyval takes), got {self.coefficients!r}.")
        self.coefficients = [float(v) for v in c]
        for name in ("always_compute_first", "always_compute_last"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"TeaCacheConfig: {name} must be >= 0, got {getattr(self, name)}.")
        if self.max_consecutive_skips is not None and self.max_consecutive_skips < 0:
            raise ValueError(f"TeaCacheConfig: max_consecutive_skips must be >= 0 or None, got {self.max_consecutive_skips}.")
        if self.input_range is not None and not (len(self.input_range) == 2 and self.input_range[0] <= self.input_range[1]):
            raise ValueError(f"TeaCacheConfig: input_range must be (low, high) with low <= high, got {self.input_range!r}.")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"TeaCacheConfig: num_inference_steps must be >= 1, got {self.num_inference_steps}.")
        if self.order not in (0, 1):
            raise ValueError(f"TeaCacheConfig: order must be 0 (reuse the residual) or 1 (extrapolate it), got {self.order!r}.")


class TeaCacheState(BaseState):
    """What one denoising trajectory carries from step to step."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.step = 0
        self.prev_timestep: float | None = None
        self.prev_modulated: torch.Tensor | None = None
        self.prev_output: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.residual_step = 0  # the step the residual was computed at
        self.slope: torch.Tensor | None = None  # order 1: residual change per step between the last two computes
        self.accumulated = 0.0
        self.consecutive_skips = 0


class _StackOutputHook(ModelHook):
    """Record-only hook on ``norm_out``: its input is the output of the block stack (image tokens)."""

    def __init__(self):
        super().__init__()
        self.last_input: torch.Tensor | None = None

    def pre_forward(self, module, *args, **kwargs):
        self.last_input = args[0] if args else kwargs["x"]
        return args, kwargs


class TeaCacheHook(ModelHook):
    """Decides compute or reuse once per transformer call; counts what it did (survives state resets)."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, config: TeaCacheConfig, stack: _StackOutputHook):
        super().__init__()
        self.state_manager, self.config, self.stack = state_manager, config, stack
        self.computed = self.skipped = self.trajectories = 0
        self.trajectory: list[dict] = []  # per-step log of the current (or last) trajectory
        self._warned = False

    def initialize_hook(self, module):
        self._signature = inspect.signature(type(module).forward)
        return module

    def reset_state(self, module):
        self.state_manager.reset()
        return module

    def new_forward(self, module, *args, **kwargs):
        if self.state_manager._context is None:
            self.state_manager.set_context(CacheContext(name="inference"))
        a = self._signature.bind(module, *args, **kwargs).arguments
        state: TeaCacheState = self.state_manager.get_state()
        timestep = float(a["timestep"].flatten()[0])
        if state.prev_timestep is not None and timestep >= state.prev_timestep:
            state.reset()  # timesteps only decrease along a trajectory: this call starts a new one
        if state.step == 0:
            self.trajectory, self.trajectories = [], self.trajectories + 1
        with _lora_scale(module, a.get("joint_attention_kwargs")):
            x, temb = _embed(module, a)
            modulated = module.transformer_blocks[0].norm1(x, emb=temb)[0]
        rel = None if state.prev_modulated is None else _rel_l1(modulated, state.prev_modulated)
        compute = self._should_compute(state, rel)
        if compute:
            output = self.fn_ref.original_forward(*args, **kwargs)
            residual, self.stack.last_input = self.stack.last_input - x, None
            if self.config.order and state.residual is not None:
                state.slope = (residual - state.residual) / (state.step - state.residual_step)
            state.residual, state.residual_step = residual, state.step
            self.computed += 1
        else:
            residual = state.residual
            if state.slope is not None:  # order 1 after two computed steps; before that, plain reuse
                residual = residual + state.slope * (state.step - state.residual_step)
            with _lora_scale(module, a.get("joint_attention_kwargs")):
                sample = module.proj_out(module.norm_out(x + residual, temb))
            output = (sample,) if not a.get("return_dict", True) else _model_output(sample)
            self.skipped += 1
        log = {"step": state.step, "timestep": timestep, "input_rel_l1": rel, "accumulated": state.accumulated,
               "computed": compute}
        if self.config.record:
            sample = output[0] if isinstance(output, tuple) else output.sample
            log["output_rel_l1"] = None if state.prev_output is None else _rel_l1(sample, state.prev_output)
            state.prev_output = sample
        self.trajectory.append(log)
        state.prev_modulated, state.prev_timestep, state.step = modulated, timestep, state.step + 1
        return output

    def _should_compute(self, state: TeaCacheState, rel: float | None) -> bool:
        cfg = self.config
        if cfg.schedule is not None:  # a recorded pattern, e.g. from the trained model, replayed on another
            return state.residual is None or state.step >= len(cfg.schedule) or bool(cfg.schedule[state.step])
        n = cfg.num_inference_steps or getattr(self.state_manager._context, "num_inference_steps", None)
        if n is None and cfg.always_compute_last and not self._warned:
            self._warned = True
            warnings.warn("TeaCache cannot tell the last steps (no num_inference_steps in the config or the cache "
                          "context): always_compute_last is not applied.", stacklevel=2)
        forced = (rel is None or state.residual is None or state.step < cfg.always_compute_first
                  or (n is not None and state.step >= n - cfg.always_compute_last))
        if not forced:
            x = rel if cfg.input_range is None else min(max(rel, cfg.input_range[0]), cfg.input_range[1])
            state.accumulated += max(0.0, float(np.polyval(cfg.coefficients, x)))
            capped = cfg.max_consecutive_skips is not None and state.consecutive_skips >= cfg.max_consecutive_skips
            if state.accumulated < cfg.rel_l1_thresh and not capped:
                state.consecutive_skips += 1
                return False
        state.accumulated, state.consecutive_skips = 0.0, 0
        return True


def _embed(module, a: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The block stack's input and the conditioning embedding, as ``FluxTransformer2DModel.forward`` makes them."""
    x = module.x_embedder(a["hidden_states"])
    t = a["timestep"].to(x.dtype) * 1000
    g = a.get("guidance")
    if g is None:
        return x, module.time_text_embed(t, a["pooled_projections"])
    return x, module.time_text_embed(t, g.to(x.dtype) * 1000, a["pooled_projections"])


def _rel_l1(cur: torch.Tensor, prev: torch.Tensor) -> float:
    return ((cur.float() - prev.float()).abs().mean() / prev.float().abs().mean().clamp_min(1e-12)).item()


def _model_output(sample):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)


def _lora_scale(module, joint_attention_kwargs):
    """The LoRA scale the wrapped forward applies (``joint_attention_kwargs['scale']``), for our own module calls."""
    scale = (joint_attention_kwargs or {}).get("scale", 1.0)
    if scale == 1.0:
        return nullcontext()
    from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

    @contextmanager
    def scaled():
        scale_lora_layers(module, scale)
        try:
            yield
        finally:
            unscale_lora_layers(module, scale)

    return scaled()


def apply_teacache(transformer: torch.nn.Module, config: TeaCacheConfig) -> None:
    """Register TeaCache on a ``FluxTransformer2DModel`` (one hook on it, one record-only hook on ``norm_out``)."""
    for name in ("x_embedder", "time_text_embed", "transformer_blocks", "norm_out", "proj_out"):
        if not hasattr(transformer, name):
            raise TypeError(f"TeaCache supports FluxTransformer2DModel-like modules; {type(transformer).__name__} "
                            f"has no `{name}`.")
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(_HOOK) is not None:
        raise ValueError("TeaCache is already applied to this transformer; call remove_teacache first.")
    stack = _StackOutputHook()
    HookRegistry.check_if_exists_or_initialize(transformer.norm_out).register_hook(stack, _STACK_HOOK)
    registry.register_hook(TeaCacheHook(StateManager(TeaCacheState), config, stack), _HOOK)
    registry.invalidate_child_registries_cache()


def remove_teacache(transformer: torch.nn.Module) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.remove_hook(_HOOK, recurse=False)
    HookRegistry.check_if_exists_or_initialize(transformer.norm_out).remove_hook(_STACK_HOOK, recurse=False)
    registry.invalidate_child_registries_cache()


@contextmanager
def enabled(transformer: torch.nn.Module, config: TeaCacheConfig):
    """``with teacache.enabled(pipe.transformer, cfg): ...`` applies TeaCache for the block only."""
    apply_teacache(transformer, config)
    try:
        yield _hook(transformer)
    finally:
        remove_teacache(transformer)


def _hook(transformer) -> TeaCacheHook:
    hook = HookRegistry.check_if_exists_or_initialize(transformer).get_hook(_HOOK)
    if hook is None:
        raise ValueError("TeaCache is not applied to this transformer.")
    return hook


def teacache_stats(transformer: torch.nn.Module) -> dict:
    """Forward passes computed / skipped since ``apply_teacache``, and the last trajectory's step log."""
    h = _hook(transformer)
    return {"computed": h.computed, "skipped": h.skipped, "trajectories": h.trajectories,
            "last_trajectory": [dict(s) for s in h.trajectory]}


# --------------------------------------------------------------------------- coefficient files


def save_coefficients(path, fit, calibration, recommended_threshold: float | None = None) -> Path:
    """Coefficients plus where they came from, so a later run can refuse ones fitted on another model.

    ``fit`` and ``calibration``: an ``experiments.teacache_fit.Fit`` and ``Calibration`` (read by attribute, so
    this module needs nothing from the experiments that make them).
    """
    seeds = {r["name"]: r["seed"] for r in calibration.requests}
    data = {
        "format": FORMAT, "coefficients": fit.coefficients, "degree": fit.degree, "input_range": list(fit.input_range),
        "recommended_threshold": recommended_threshold,
        "fit": {k: v for k, v in asdict(fit).items() if k not in ("coefficients", "degree", "input_range")},
        "model": {"fingerprint": calibration.fingerprint, "description": calibration.model, "dtype": calibration.dtype},
        "resolution": calibration.resolution, "steps": calibration.steps, "guidance_scale": calibration.guidance_scale,
        "calibration_requests": [{"name": n, "seed": seeds.get(n)} for n in fit.fit_requests],
        "holdout_requests": [{"name": n, "seed": seeds.get(n)} for n in fit.holdout_requests],
        "published_flux_coefficients": PUBLISHED_FLUX_COEFFICIENTS,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def load_coefficients(path, expected_fingerprint: str | None = None) -> dict:
    """Read a coefficients file; with ``expected_fingerprint``, refuse coefficients fitted on another model."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a TeaCache coefficients file (format {data.get('format')!r}, expected {FORMAT!r}).")
    TeaCacheConfig(coefficients=data.get("coefficients"), input_range=data.get("input_range"))  # validates them
    found = data.get("model", {}).get("fingerprint")
    if expected_fingerprint is not None and found != expected_fingerprint:
        raise ValueError(f"{path}: coefficients were fitted on model {str(found)[:16]}, not on the loaded model "
                         f"{expected_fingerprint[:16]}. Calibrate again on this model (notebook 02) or load the "
                         "file that belongs to it.")
    return data
