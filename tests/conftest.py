"""Shared fixtures: one random embedded checkpoint and one slim pipeline per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Generated checkpoints go to a per-session cache unless the caller chose one (CI runs clean).
os.environ.setdefault("TRYON_LAB_CACHE", tempfile.mkdtemp(prefix="tryon_lab_cache_"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def model_dir():
    from tryon_lab import checkpoint

    return checkpoint.random_checkpoint()


@pytest.fixture(scope="session")
def slim(model_dir):
    from tryon_lab import loading

    return loading.load_slim(model_dir, torch.float32, "cpu")


def make_request_images(w: int = 128, h: int = 192, seed: int = 0):
    """A person, a garment and a mask with a box in the middle (pure arrays: no sample set needed)."""
    rng = np.random.default_rng(seed)
    person = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    garment = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 6: 5 * w // 6] = 255
    return person, garment, Image.fromarray(mask, "L")


def write_test_notebooks(d: Path, extra: dict[str, str] | None = None) -> dict[str, Path]:
    """The small runner-test notebooks (tests/notebooks/*.py) as .ipynb in ``d``, plus ``extra`` {stem: py text}."""
    import jupytext

    out = {}
    for py in sorted((Path(__file__).parent / "notebooks").glob("*.py")):
        out[py.stem] = d / f"{py.stem}.ipynb"
        jupytext.write(jupytext.read(py), out[py.stem], fmt="ipynb")
    for stem, text in (extra or {}).items():
        out[stem] = d / f"{stem}.ipynb"
        jupytext.write(jupytext.reads(text, fmt="py:percent"), out[stem], fmt="ipynb")
    return out


class RecordedGraph:
    """A CUDA graph's contract on the CPU, for the step-graph hook: replay reruns the recorded call on the same
    input tensors and writes into the same output tensors (``graph_on_the_cpu`` puts it in place of a capture)."""

    def __init__(self, forward, args, kwargs):
        self.run = lambda: forward(*args, **kwargs)
        self.out = self.run()

    def replay(self):
        from torch.utils._pytree import tree_leaves

        for kept, new in zip(tree_leaves(self.out), tree_leaves(self.run()), strict=True):
            kept.copy_(new)


def graph_on_the_cpu(patch) -> None:
    """Make ``StepGraphHook`` record ``RecordedGraph``s; ``patch(obj, name, value)``: a monkeypatch's setattr."""
    from tryon_lab.step_graph import StepGraphHook

    def capture(self, forward, args, kwargs):
        g = RecordedGraph(forward, args, kwargs)
        return g, g.out

    patch(StepGraphHook, "capture", capture)
