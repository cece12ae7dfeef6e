"""The step-graph hook's own logic on the CPU: signatures, warm-up, static inputs, replay, cloned outputs.

A CUDA graph needs a GPU, so here the capture is a stand-in with a graph's contract: replay reruns the recorded
call on the same input tensors and writes into the same output tensors. What is checked is everything around it.
The GPU benchmarks time the real graph and check its output against the same call without it.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import graph_on_the_cpu, make_request_images
from tryon_lab import configure, pipeline
from tryon_lab.step_graph import apply_step_graph, step_graph_hook


@pytest.fixture
def recorded(monkeypatch):
    graph_on_the_cpu(monkeypatch.setattr)


def _tryon(pipe, height: int = 192, steps: int = 4):
    person, garment, mask = make_request_images(h=height)
    request = pipeline.TryOnRequest(person, garment, mask, seed=3)
    return pipeline.tryon(pipe, request, pipeline.TryOnSettings(steps=steps, progress=False))


def test_replayed_steps_equal_the_plain_ones_and_a_new_shape_captures_again(model_dir, recorded):
    pipe = configure.build_pipeline(model_dir, device="cpu", dtype="float32")
    plain = _tryon(pipe)
    hook = apply_step_graph(pipe.transformer)
    assert step_graph_hook(pipe.transformer) is hook
    graphed = _tryon(pipe)  # 4 calls: 2 warm-up, then a capture and 2 replays
    assert (hook.state.captures, hook.state.replays) == (1, 2)
    assert torch.equal(graphed.latents, plain.latents)
    again = _tryon(pipe)  # same signature: every call replays, on this call's inputs
    assert (hook.state.captures, hook.state.replays) == (1, 6) and torch.equal(again.latents, plain.latents)
    _tryon(pipe, height=256)  # new shapes: warm up and capture anew
    assert hook.state.captures == 2


def test_outputs_are_the_callers_and_inputs_are_copied(recorded):
    lin = torch.nn.Linear(4, 4)
    hook = apply_step_graph(lin, None)
    xs = [torch.randn(2, 4) for _ in range(4)]
    outs = [lin(x) for x in xs]
    assert hook.state.replays == 2
    for x, out in zip(xs, outs, strict=True):  # each kept output is still its own call's
        assert torch.allclose(out, torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert not any(hook.state.static_inputs[0] is x for x in xs)  # the graph reads its own buffer


def test_options_refuse_what_a_graph_cannot_follow(model_dir, monkeypatch):
    with pytest.raises(configure.OptionsError, match="CUDA graphs need a GPU"):
        configure.build_pipeline(model_dir, device="cpu", step_graph=True)
    monkeypatch.setattr(configure.PipelineOptions, "resolved", lambda self: self.__class__(device="cuda"))
    o = configure.PipelineOptions(step_graph=True)
    assert configure.step_graph_problem(o) is None
    assert "reduce-overhead" in configure.step_graph_problem(configure.PipelineOptions(compile_mode="reduce-overhead"))
    assert "moves weights" in configure.step_graph_problem(configure.PipelineOptions(memory="bf16+group-offload"))
    from tryon_lab.parallel import ContextParallel
    from tryon_lab.teacache import TeaCacheConfig

    assert "even split" in configure.step_graph_problem(configure.PipelineOptions(
        context_parallel=ContextParallel(ulysses_degree=2, anything=True)))
    assert configure.step_graph_problem(configure.PipelineOptions(
        context_parallel=ContextParallel(ulysses_degree=2, anything=False))) is None

    assert "TeaCache" in configure.step_graph_problem(configure.PipelineOptions(teacache=TeaCacheConfig()))
