"""The notebooks themselves: paired and stripped in git, and executing headlessly under papermill."""

from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path

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


def stray_outputs(executed: Path) -> list[str]:
    """What an executed notebook shows that it should not: a value left at the end of a cell, known library noise."""
    from tryon_lab.notebook import KNOWN_NOISE

    nb = json.loads(executed.read_text())
    problems = []
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        for out in cell.get("outputs", []):
            if out["output_type"] == "execute_result":
                problems.append(f"cell {i}: a value is shown: {''.join(out['data'].get('text/plain', ''))[:80]}")
            text = "".join(out.get("text", "")) if out["output_type"] == "stream" else ""
            problems += [f"cell {i}: known noise: {p}" for _, p, _ in KNOWN_NOISE if re.search(p, text, re.M)]
    return problems


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
    stray = {e["stem"]: problems for e in manifest["notebooks"]
             if (problems := stray_outputs(run_dir / e["dir"] / f"{e['stem']}.ipynb"))}
    assert not stray, stray
    assert manifest["git"]["commit"] and manifest["packages"]["diffusers"]
    first = runs.run([notebooks[0]], {}, name="verify-me", runs_root=tmp_path, progress=False)
    ok, report = runs.verify(first)
    assert ok, report


# ------------------------------------------------------------------------------ thin notebooks (fast, no kernel)
NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.py"))
HAND_BUILT = ("load_slim(", "quantize_transformer(", "compile_transformer(", "apply_mode(", "apply_options(",
              "resolve_device_dtype(", "resolve_model_dir(")
SHOWS_NOTHING = {"display", "print", "plt.show", "notebook.markdown", "notebook.table", "notebook.images",
                 "notebook.recorded"}
MAX_STATEMENTS = 12  # a cell with more logic than this is a function waiting to move into tryon_lab


def code_cells(py: Path) -> list:
    import jupytext

    return [c for c in jupytext.read(py).cells if c.cell_type == "code"]


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_opens_with_parameters_then_one_setup_call(py):
    cells = code_cells(py)
    assert "parameters" in cells[0].metadata.get("tags", [])
    setup = ast.parse(cells[1].source).body
    assert ast.unparse(setup[0]) == "from tryon_lab import notebook"
    assert ast.unparse(setup[1]).startswith("lab = notebook.setup(model, device, dtype, output_dir")
    assert sum(c.source.count("notebook.setup(") for c in cells) == 1


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter(py):
    """papermill's own reading of the parameters cell (``--help-notebook``, type hints) finds every assignment: a
    line it cannot parse (a quote or '=' in a comment can do that) is skipped with a warning to the user."""
    from papermill.translators import PythonTranslator

    cell = code_cells(py)[0]
    assigned = [t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets]
    assert [p.name for p in PythonTranslator.inspect(cell)] == assigned


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_make_pipelines_only_through_configure(py):
    src = "\n".join(c.source for c in code_cells(py))
    assert [f for f in HAND_BUILT if f in src] == []


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_cells_are_short_and_end_without_a_stray_value(py):
    for i, cell in enumerate(code_cells(py)[1:], start=1):
        body = ast.parse(cell.source).body
        assert len(body) <= MAX_STATEMENTS or all(isinstance(s, ast.Import | ast.ImportFrom | ast.Assign)
                                                  for s in body), f"cell {i} of {py.name} is long"
        assert not any(isinstance(s, ast.For | ast.While | ast.FunctionDef | ast.ClassDef | ast.Try) for s in body), \
            f"cell {i} of {py.name} holds logic that belongs in a function"
        if body and isinstance(body[-1], ast.Expr):  # a value left at the end of a cell is shown as an output
            value = body[-1].value
            assert isinstance(value, ast.Call) and ast.unparse(value.func) in SHOWS_NOTHING, \
                f"cell {i} of {py.name} ends with a value: {ast.unparse(value)[:80]}"


# ------------------------------------------------------------------------------ the setup call and its helpers
def test_setup_resolves_model_device_dtype_and_output(tmp_path, model_dir):
    from tryon_lab import notebook

    lab = notebook.setup(model_dir, "cpu", "auto", tmp_path / "out", quiet=False, show=False)
    assert (lab.model_dir, lab.device, lab.dtype_name, lab.cpu) == (model_dir, "cpu", "float32", True)
    assert lab.output_dir.is_dir() and lab.options.device == "cpu" and lab.options.dtype == "float32"
    assert "random weights" in lab.description and lab.stamp["commit"]
    assert "indicative (CPU)" in lab.header() and lab.timing("load s") == "load s, indicative (CPU)"


@pytest.fixture
def quiet():
    """``quiet_known_noise`` for one test: its filters and the progress bars are put back afterwards."""
    import diffusers
    import transformers

    from tryon_lab import notebook

    names = notebook.quiet_known_noise("cpu")
    yield names
    for name in names:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, notebook._DropKnown)]:
            logger.removeFilter(f)
    diffusers.utils.logging.enable_progress_bar()
    transformers.utils.logging.enable_progress_bar()


def test_known_noise_is_dropped_by_its_text_and_nothing_else(quiet, caplog):
    assert "torchao" in quiet
    with caplog.at_level(logging.WARNING):
        logging.getLogger("diffusers.models.modeling_utils").warning(
            "Attention backends are an experimental feature and the API may be subject to change.")
        logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_mxfp8.so: Could not load this library: /x")
        logging.getLogger("torchao").warning("something else went wrong")
        logging.getLogger("diffusers.models.modeling_utils").error("Attention backends are an experimental feature")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong",
                                                        "Attention backends are an experimental feature"]


def test_human_bytes():
    from tryon_lab.notebook import human_bytes

    assert [human_bytes(n) for n in (512, 3.3e6, 80e9, None)] == ["512 B", "3.15 MiB", "74.5 GiB", ""]


def test_report_helpers_keep_the_notebooks_selections():
    from tryon_lab.experiments import teacache_report, variants_report

    reqs, targets = list("abcdef"), list("ABCDEF")
    assert teacache_report.held_out(reqs, targets, 4, 2) == (["e", "f"], ["E", "F"])
    assert teacache_report.held_out(reqs[:4], targets[:4], 4, 0) == (["d"], ["D"])
    assert "speedup" not in teacache_report.sweep_columns(cpu=True)
    assert "speedup" in teacache_report.sweep_columns(cpu=False)
    assert variants_report.variant_list(["full"]) == ["full"]
    every = variants_report.variant_list([], all_variants=True)
    assert len(every) == 16 and "fp8_dynamic_row+full+lora" in every and "" not in every
    assert variants_report.backends("cpu") == ("aot_eager", "aot_eager")
    assert variants_report.backends("cuda", "eager", "auto") == ("eager", "inductor")
    assert variants_report.image_name("fp8_weight_only+regional@inductor", 0) == "fp8_weight_only_regional_at_inductor_0"


def test_memory_plans_are_recorded_as_before():
    from tryon_lab import memory
    from tryon_lab.experiments import memory_report

    budget = memory.load_budget()
    plans, text = memory_report.plans([80, 24, 1], budget, logos=4)
    assert plans["80 GB"]["mode"] and set(plans["80 GB"]) == {"mode", "logo batch", "peak GiB", "s per image"}
    assert plans["1 GB"]["mode"] is None and "no measured mode fits" in plans["1 GB"]["error"]
    assert "**24 GB:**" in text
    fig = memory_report.plot_modes(budget, [80, 24])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["80 GB card (74.5 GiB)", "24 GB card (22.4 GiB)"]


def test_logo_comparison_uses_one_call_when_batched(slim):
    from tryon_lab import logos, samples
    from tryon_lab.experiments import logos_report

    ref = samples.load_sample("s001")
    c = logos_report.compare_passes(slim, ref, ref.garment_logo_boxes, steps=1, seed=0)
    calls = {r["mode"]: r["pipeline calls"] for r in c.rows}
    assert c.found >= 1 and calls == {"sequential": c.found, "batched": 1}
    assert isinstance(c.max_abs, int) and c.max_abs <= 2
    assert all(isinstance(m, logos.LogoMatch) for m in c.matches)
    assert "logos found" in logos_report.display_rows(c, cpu=True)[0]


def test_setup_refuses_an_unknown_sample_id_before_anything_loads(tmp_path):
    from tryon_lab import notebook
    from tryon_lab.samples import UnknownSampleError

    with pytest.raises(UnknownSampleError, match="valid ids: s000"):
        notebook.setup("/no/such/model", "cpu", "auto", tmp_path / "out", show=False, sample_ids=("s000", "s999"))
    assert not (tmp_path / "out").exists()  # refused before the model folder or the output folder was touched
