"""One CUDA graph per transformer call: the host issues a whole denoising step as a single launch.

A FLUX step is 57 blocks of a few dozen kernels each. Split over two GPUs the kernels shrink but the host's
work to issue them does not, and the step becomes host-bound (on two H200s at 1024x768: ~80 ms on the host
for ~65 ms of GPU work). Inductor's CUDA graphs (``mode="reduce-overhead"``) need whole-model compile, since
cudagraph trees refuse the same compiled block run many times in one step, and whole-model compile rounds
unlike eager unless told to emulate its casts, which costs time. This hook graphs the step around whatever the
transformer is (eager, regionally compiled, FP8, split over ranks), so regional compile keeps its rounding.

Written as diffusers writes its hooks: a config, a state with ``reset()``, a ``ModelHook`` whose ``new_forward``
only decides eager, capture or replay, one ``apply_step_graph``. The hook wraps the transformer's own forward,
so it must be registered after every hook that should run inside the graph (context parallelism's split and
gather): ``configure`` applies it last.

- The first ``warmup_calls`` calls with a new signature (tensor shapes, dtypes and devices; every other
  argument's value) run as usual: compile and autotune happen there, never inside a capture.
- The next call is captured with copies of its tensors as the graph's static inputs; later calls copy their
  tensors into those and replay. The output is cloned, so a caller may keep it across calls.
- A new signature warms up and captures again; the old graph is dropped.
- Whatever the graph reads outside its arguments (weights, buffers) must stay where it is: hot-swapped LoRA
  weights (copied in place) are fine, moved or reallocated weights are not. Host-side decisions inside the
  forward (step caches) cannot be graphed: ``configure`` refuses that combination.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

_HOOK = "step_graph"


@dataclass
class StepGraphConfig:
    warmup_calls: int = 2  # calls before capture with a new signature (compile, autotune, cuBLAS workspaces)


class StepGraphState:
    def __init__(self) -> None:
        self.captures = 0  # over the hook's lifetime
        self.replays = 0
        self.reset()

    def reset(self) -> None:
        """Forget the graph (a new signature, or a caller that changed what the graph reads)."""
        self.signature = None
        self.calls = 0
        self.graph = None
        self.static_inputs: list = []
        self.static_output = None


def signature(leaves: list, spec) -> tuple:
    """What a graph is valid for: the call's structure, each tensor's shape, dtype and device, the other values."""
    return spec, tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in leaves)


def _clone(tree):
    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


class StepGraphHook(ModelHook):
    """Not one of diffusers' stateful hooks: the per-request resets they get (a step cache's) keep the graph, which
    stays valid for every call of the same signature; ``state.reset()`` drops it."""

    def __init__(self, config: StepGraphConfig) -> None:
        super().__init__()
        self.config = config
        self.state = StepGraphState()

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        leaves, spec = tree_flatten((args, kwargs))
        st = self.state
        sig = signature(leaves, spec)
        if sig != st.signature:
            st.reset()
            st.signature = sig
        if st.graph is None:
            st.calls += 1
            if st.calls <= self.config.warmup_calls:
                return forward(*args, **kwargs)
            st.static_inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
            static_args, static_kwargs = tree_unflatten(st.static_inputs, spec)
            st.graph, st.static_output = self.capture(forward, static_args, static_kwargs)
            st.captures += 1
        else:
            for buf, x in zip(st.static_inputs, leaves, strict=True):
                if isinstance(x, torch.Tensor):
                    buf.copy_(x)
        st.graph.replay()  # the capture only recorded: the first replay computes the captured call too
        st.replays += 1
        return _clone(st.static_output)

    def capture(self, forward, args: tuple, kwargs: dict):
        """(graph, output) of one call recorded as a CUDA graph on ``args``/``kwargs``, which stay its inputs."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls (the NCCL watchdog's event queries) may go on during the capture,
        # as inductor's own CUDA graphs allow them
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = forward(*args, **kwargs)
        return graph, out


def apply_step_graph(transformer: torch.nn.Module, config: StepGraphConfig | None = None) -> StepGraphHook:
    """Graph every call of ``transformer`` from now on (register after the hooks that must run inside it)."""
    hook = StepGraphHook(config or StepGraphConfig())
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, _HOOK)
    return hook


def step_graph_hook(transformer: torch.nn.Module) -> StepGraphHook | None:
    """The transformer's step-graph hook, if it has one (its state counts captures and replays)."""
    registry = getattr(transformer, "_diffusers_hook", None)
    return registry.get_hook(_HOOK) if registry is not None else None
