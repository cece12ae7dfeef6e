"""The notebooks themselves: paired and stripped in git, and executing headlessly under papermill."""

from __future__ import annotations

import json

import pytest

from tryon_lab import runs


def test_notebooks_are_paired_and_stripped():
    problems = runs.sync_notebooks(check=True)
    assert not problems, "\n".join(problems)


def run_notebook(tmp_path, notebook: str, params: dict) -> tuple:
    """Run one notebook through the runner; returns (its output folder, its manifest entry)."""
    run_dir = runs.run([notebook], params, name="test", runs_root=tmp_path, progress=False)
    entry = json.loads((run_dir / "manifest.json").read_text())["notebooks"][0]
    assert entry["status"] == "ok", entry.get("traceback") or entry.get("error")
    return run_dir / entry["dir"], entry


@pytest.mark.slow
def test_notebook_01_runs_headless(tmp_path):
    out, entry = run_notebook(tmp_path, "notebooks/01_slim_pipeline.ipynb", {"steps": 3, "model": "random"})
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["equivalence"]["latent max abs diff"] == 0.0
    assert "random weights" in metrics["model"]
    assert (out / "tryon_slim.png").exists() and entry["inputs"]["model"]["files"]


@pytest.mark.slow
def test_every_notebook_runs_on_the_default_model_and_verifies(tmp_path):
    """`make demo` in small: every notebook headless on the default model, then `verify` on notebook 01."""
    notebooks = runs.all_notebooks()
    assert len(notebooks) >= 3
    run_dir = runs.run(notebooks, {}, name="demo", runs_root=tmp_path, progress=False)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    failed = {e["stem"]: (e.get("error") or "")[-2000:] for e in manifest["notebooks"] if e["status"] != "ok"}
    assert not failed, failed
    assert manifest["git"]["commit"] and manifest["packages"]["diffusers"]
    first = runs.run([notebooks[0]], {}, name="verify-me", runs_root=tmp_path, progress=False)
    ok, report = runs.verify(first)
    assert ok, report
