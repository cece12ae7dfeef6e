"""Tests for tryon_lab.runs: headless runs, manifests, sweeps, verify and notebook sync.

Kernel starts are the expensive part, so runs are shared through module-scoped fixtures.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from PIL import Image

from tests.conftest import write_test_notebooks
from tryon_lab import provenance, runs

HERE = Path(__file__).parent

# Names its model the way checkpoint.describe_model does, at a checkout given by FAKE_CLONE (another clone).
NB_MODEL = """# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% tags=["parameters"]
output_dir = "runs/scratch/nb_model"
fingerprint = "ab12cd34ab12cd34"

# %%
import os

from PIL import Image

from tryon_lab.runs import save_image, save_metrics

clone = os.environ["FAKE_CLONE"]
save_image(output_dir, "tile", Image.new("RGB", (4, 4), (10, 20, 30)))
save_metrics(output_dir, {"model": f"embedded default with random weights at {clone}/models/m [fingerprint {fingerprint}]",
                          "value": 1.5})
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def nbs(tmp_path_factory) -> dict[str, Path]:
    return write_test_notebooks(tmp_path_factory.mktemp("nbs"), {"nb_model": NB_MODEL})


@pytest.fixture(scope="module")
def input_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("inputs") / "coeffs.json"
    p.write_text('{"a": 1}\n')
    return p


@pytest.fixture(scope="module")
def ok_run(nbs, root, input_file) -> Path:
    return runs.run([nbs["nb_ok"]], {"seed": 3, "size": 5, "input_file": str(input_file)},
                    name="ok", runs_root=root, progress=False)


@pytest.fixture(scope="module")
def mixed_run(nbs, root) -> tuple[int, Path, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # size: declared by nb_ok only, so nb_fail does not get it
        rc = runs.main(["run", str(nbs["nb_fail"]), str(nbs["nb_ok"]), "-p", "seed=7", "-p", "size=3",
                        "--runs-root", str(root), "--name", "mixed", "--no-progress"])
    (run_dir,) = root.glob("*-mixed")
    return rc, run_dir, out.getvalue()


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


def _verify_dirs(run_dir: Path) -> list[Path]:
    return sorted(run_dir.parent.glob(f"{run_dir.name}.verify*"))


def test_parameters_are_injected(ok_run):
    with Image.open(ok_run / "nb_ok" / "image.png") as img:
        assert img.size == (5, 5)
    metrics = json.loads((ok_run / "nb_ok" / "metrics.json").read_text())
    assert metrics["seed"] == 3 and metrics["size"] == 5
    executed = nbformat.read(ok_run / "nb_ok" / "nb_ok.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    assert (ok_run / "nb_ok" / "nb_ok.html").stat().st_size > 1000
    assert "nb_ok/nb_ok.html" in (ok_run / "index.html").read_text()


def test_manifest_fields(ok_run, input_file):
    m = json.loads((ok_run / "manifest.json").read_text())
    assert m["status"] == "ok" and m["name"] == "ok" and m["format"] == 2 and m["error"] is None
    assert {"commit", "dirty"} <= set(m["git"])
    for key in ("created", "finished", "host", "python", "command", "device"):
        assert m[key]
    assert set(runs.PACKAGES) <= set(m["packages"]) and m["packages"]["papermill"]
    assert m["device"]["type"] in {"cpu", "cuda"} and m["device"]["name"]
    (e,) = m["notebooks"]
    assert e["status"] == "ok" and e["error"] is None and e["duration_s"] > 0
    assert e["parameters"]["size"] == 5 and e["parameters"]["output_dir"] == str(ok_run / "nb_ok")
    assert e["ignored_parameters"] == []
    assert e["inputs"]["data"]["files"] == {input_file.as_posix(): provenance.sha256_file(input_file)}
    assert e["tolerances"] == {}
    assert set(e["outputs"]) == {"image.png", "metrics.json"}
    assert e["outputs"]["image.png"] == provenance.sha256_file(ok_run / "nb_ok" / "image.png")


def test_verify_passes_on_untouched_run(ok_run):
    ok, report = runs.verify(ok_run)
    assert ok, report
    assert "ok    image.png (bit-exact" in report and "RESULT: OK" in report
    assert _verify_dirs(ok_run) == []  # removed after a pass


def test_verify_reports_modified_output(ok_run, tmp_path):
    copy = _copy(ok_run, tmp_path)
    Image.new("RGB", (5, 5), "red").save(copy / "nb_ok" / "image.png")
    ok, report = runs.verify(copy)
    assert not ok
    assert "output modified after run: nb_ok/image.png" in report
    assert "regression" not in report
    assert runs.main(["verify", str(copy)]) == 1


def test_verify_reports_changed_input(ok_run, input_file, tmp_path):
    copy = _copy(ok_run, tmp_path)
    original = input_file.read_text()
    try:
        input_file.write_text('{"a": 2}\n')
        ok, report = runs.verify(copy)
    finally:
        input_file.write_text(original)
    assert not ok
    assert f"input changed: data {input_file.as_posix()}" in report
    assert "regression" not in report and "output modified" not in report
    assert _verify_dirs(copy) == []  # not re-run


def test_failing_notebook_is_recorded_and_others_run(mixed_run):
    rc, run_dir, stdout = mixed_run
    assert rc == 1
    assert f"run folder: {run_dir}" in stdout and (run_dir / "index.html").as_uri() in stdout
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "failed"
    fail, ok = m["notebooks"]
    assert fail["status"] == "failed" and "ValueError: deliberate failure (seed=7)" in fail["error"]
    assert "deliberate failure" in fail["traceback"]
    partial = nbformat.read(run_dir / "nb_fail" / "nb_fail.ipynb", as_version=4)
    assert any(o.get("ename") == "ValueError" for c in partial.cells for o in c.get("outputs", []))
    assert "metrics.json" in fail["outputs"]
    assert ok["status"] == "ok" and ok["parameters"]["seed"] == 7
    assert fail["ignored_parameters"] == ["size"] and ok["ignored_parameters"] == []
    assert "failed" in (run_dir / "index.html").read_text()


def test_interrupt_leaves_consistent_manifest(nbs, root, monkeypatch):
    import papermill

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runs.run([nbs["nb_ok"], nbs["nb_fail"]], {}, name="intr", runs_root=root, progress=False)
    (run_dir,) = root.glob("*-intr")
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "interrupted"
    assert [e["status"] for e in m["notebooks"]] == ["interrupted", "pending"]


def test_expand_grid():
    assert runs.expand_grid({"threshold": [0.1, 0.2], "fp8": [False, True]}) == [
        {"threshold": 0.1, "fp8": False}, {"threshold": 0.1, "fp8": True},
        {"threshold": 0.2, "fp8": False}, {"threshold": 0.2, "fp8": True}]
    assert runs.expand_grid({"a": 1}) == [{"a": 1}]


def test_sweep_writes_summary(nbs, root, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("seed: 1\nnb_ok:\n  seed: 2\ngrid:\n  size: [2, 3]\n")
    rc = runs.main(["sweep", str(nbs["nb_ok"]), "--params-file", str(params), "--grid", "seed=5",
                    "--runs-root", str(root), "--name", "sw", "--no-progress"])
    assert rc == 0
    (sweep_dir,) = root.glob("*-sw")
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [(r["size"], r["seed"], r["status"]) for r in rows] == [("2", "5", "ok"), ("3", "5", "ok")]
    assert {"mean", "run"} <= set(rows[0])
    md = (sweep_dir / "summary.md").read_text()
    assert "| run | size | seed | status |" in md and md.count("| ok |") == 2
    assert len(list(sweep_dir.glob("*/manifest.json"))) == 2 and (sweep_dir / "index.html").exists()


def test_params_parsing_and_sections():
    assert [runs.parse_value(v) for v in ("4", "true", "1e-3", "abc", "[1, 2]")] == [4, True, 1e-3, "abc", [1, 2]]
    params = {"seed": 1, "steps": 8, "01_a": {"steps": 4}, "grid": {"x": [1]}}
    stems = ["01_a", "02_b"]
    assert runs.notebook_params(params, "01_a", stems) == {"seed": 1, "steps": 4}
    assert runs.notebook_params(params, "02_b", stems) == {"seed": 1, "steps": 8}
    merged = runs.merge_params(params, {"steps": 2}, stems)
    assert runs.notebook_params(merged, "01_a", stems)["steps"] == 2


def test_compare_output_tolerances(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (8, 8), (100, 100, 100)).save(a)
    Image.new("RGB", (8, 8), (101, 100, 100)).save(b)
    sa, sb = provenance.sha256_file(a), provenance.sha256_file(b)
    assert runs.compare_output("x.png", a, b, sa, sb, {}).startswith("FAIL  regression")
    assert runs.compare_output("x.png", a, b, sa, sb, {"image_psnr_min": 40.0}).startswith("ok")
    assert runs.compare_output("x.png", a, b, sa, sb, {"image_psnr_min": 60.0}).startswith("FAIL")
    ja, jb = tmp_path / "a.json", tmp_path / "b.json"
    ja.write_text('{"psnr": 30.0, "time_ms": 5}')
    jb.write_text('{"psnr": 30.001, "time_ms": 9}')
    sa, sb = provenance.sha256_file(ja), provenance.sha256_file(jb)
    tol = {"metrics_rtol": 1e-3, "metrics_ignore": ["*_ms"]}
    assert runs.compare_output("m.json", ja, jb, sa, sb, tol).startswith("ok")
    assert "time_ms" in runs.compare_output("m.json", ja, jb, sa, sb, {"metrics_rtol": 1e-3})
    assert runs.compare_output("m.json", ja, jb, sa, sb, {}).startswith("FAIL  regression")  # JSON: exact values


def test_compare_output_model_by_fingerprint(tmp_path):
    def described(path: str, fp: str) -> Path:
        f = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        f.write_text(json.dumps({"model": f"trained toy try-on model (committed) at {path} [fingerprint {fp}]",
                                 "psnr": 31.5}))
        return f

    old, moved, other = described("/a/repo/models/toy", "ab12"), described("/b/x/models/toy", "ab12"), \
        described("/a/repo/models/toy", "ffff")
    sha = provenance.sha256_file
    line = runs.compare_output("metrics.json", old, moved, sha(old), sha(moved), {})
    assert line.startswith("ok") and "note  metrics.json: model moved: /a/repo/models/toy -> /b/x/models/toy" in line
    assert runs.compare_output("metrics.json", old, other, sha(old), sha(other), {}).startswith(
        "FAIL  regression: metrics.json values differ: model")


def test_sync_check_catches_outputs(tmp_path):
    src = HERE / "notebooks" / "nb_ok.py"
    shutil.copy(src, tmp_path / "01_demo.py")
    jupytext.write(jupytext.read(src), tmp_path / "01_demo.ipynb", fmt="ipynb")
    assert runs.sync_notebooks(check=True, notebooks_dir=tmp_path) == []
    nb = nbformat.read(tmp_path / "01_demo.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"][1]
    code.execution_count = 1
    code.outputs = [nbformat.v4.new_output("stream", text="size 4\n")]
    nbformat.write(nb, tmp_path / "01_demo.ipynb")
    problems = runs.sync_notebooks(check=True, notebooks_dir=tmp_path)
    assert any("has outputs" in p for p in problems) and any("execution count" in p for p in problems)
    assert runs.main(["sync", "--check", "--dir", str(tmp_path)]) == 1
    assert runs.sync_notebooks(check=False, notebooks_dir=tmp_path)
    assert runs.sync_notebooks(check=True, notebooks_dir=tmp_path) == []
    (tmp_path / "02_lonely.py").write_text("# %% tags=['parameters']\nx = 1\n")
    assert any("02_lonely.ipynb: missing" in p for p in runs.sync_notebooks(notebooks_dir=tmp_path))


# ----------------------------------------------------------------------------- reviewer problems
def test_unknown_parameter_is_refused(nbs, tmp_path, capsys):
    rc = runs.main(["run", str(nbs["nb_ok"]), "-p", "sizes=3", "--runs-root", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown parameter 'sizes' (did you mean 'size'?)" in err
    assert "input_file, output_dir, psnr_min, seed, size" in err  # the declared ones
    assert list(tmp_path.iterdir()) == []  # nothing ran, no run folder
    with pytest.raises(runs.UnknownParameter, match="'nb_ok.sede' .*did you mean 'seed'"):
        runs.run([nbs["nb_ok"], nbs["nb_fail"]], {"nb_ok": {"sede": 1}}, runs_root=tmp_path, progress=False)
    with pytest.raises(runs.UnknownParameter, match="'step'"):
        runs.sweep([nbs["nb_ok"]], {}, {"step": [1, 2]}, runs_root=tmp_path, progress=False)
    # a section for a notebook not in this run, and a key only one of the notebooks declares, are fine
    runs.check_parameters([nbs["nb_ok"], nbs["nb_fail"]], {"size": 2, "07_other": {"steps": 4}})


def test_crash_outside_a_notebook_ends_the_manifest_failed(nbs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "papermill", None)  # a missing package: import papermill fails
    with pytest.raises(ImportError, match="papermill"):
        runs.run_jobs(tmp_path / "crash", [runs.Job(nbs["nb_ok"]), runs.Job(nbs["nb_fail"])], "crash")
    m = json.loads((tmp_path / "crash" / "manifest.json").read_text())
    assert m["status"] == "failed" and m["finished"]
    assert "papermill" in m["error"] and "papermill" in m["traceback"]
    assert [e["status"] for e in m["notebooks"]] == ["failed", "pending"]
    assert m["notebooks"][0]["error"].startswith("run crashed: ") and "papermill" in m["notebooks"][0]["error"]
    assert "papermill" in (tmp_path / "crash" / "index.html").read_text()


def test_records_are_portable(tmp_path, monkeypatch):
    cache_a, cache_b = tmp_path / "cache_a", tmp_path / "cache_b"
    monkeypatch.setenv("TRYON_LAB_CACHE", str(cache_a))
    (cache_a / "ckpt").mkdir(parents=True)
    (cache_a / "ckpt" / "w.bin").write_bytes(b"weights")
    root = runs.repo_root()
    saved = runs.save_metrics(tmp_path / "out", {"model": f"kind at {root}/models/toy [fingerprint ab12]",
                                                 "paths": [f"{cache_a}/ckpt/w.bin", "/elsewhere/x"]})
    assert json.loads(saved.read_text()) == {"model": "kind at models/toy [fingerprint ab12]",
                                             "paths": ["<cache>/ckpt/w.bin", "/elsewhere/x"]}
    assert runs.portable_path(root / "notebooks" / "x.py") == "notebooks/x.py"
    rec = runs.record_inputs(tmp_path / "out", {"model": cache_a / "ckpt", "nb": root / "pyproject.toml"})
    assert rec["model"] == {"paths": ["<cache>/ckpt"], "files": {"<cache>/ckpt/w.bin": provenance.sha256_file(
        cache_a / "ckpt" / "w.bin")}}
    assert rec["nb"]["paths"] == ["pyproject.toml"]
    # the same weights under another cache (another machine, TRYON_LAB_CACHE elsewhere) are the same input
    shutil.copytree(cache_a, cache_b)
    monkeypatch.setenv("TRYON_LAB_CACHE", str(cache_b))
    check_inputs = sys.modules["tryon_lab.runs.verify"]._check_inputs
    assert check_inputs(rec) == ([], False, {})
    (cache_b / "ckpt" / "w.bin").write_bytes(b"other weights")
    msgs, changed, _ = check_inputs(rec)
    assert changed and msgs == ["FAIL  input changed: model <cache>/ckpt/w.bin"]


def test_verify_notes_a_moved_input_and_each_verify_has_its_own_folder(ok_run, input_file, tmp_path):
    copy = _copy(ok_run, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    data = manifest["notebooks"][0]["inputs"]["data"]  # as recorded in another clone: same file, other path
    data["paths"] = ["/other/clone/coeffs.json"]
    data["files"] = {"/other/clone/coeffs.json": data["files"][input_file.as_posix()]}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    first = runs.verify(copy, keep=True)
    second = runs.verify(copy, keep=True)
    for ok, report in (first, second):
        assert ok, report
        assert f"note  input moved: data /other/clone/coeffs.json -> {input_file.as_posix()} (same sha256)" in report
    dirs = _verify_dirs(copy)
    assert len(dirs) == 2  # the second verify did not wipe the first one's folder
    for d, (_, report) in zip(dirs, (first, second), strict=True):
        assert f"re-run kept in {d}" in report and (d / "verify.txt").read_text().strip() == report
        assert json.loads((d / "manifest.json").read_text())["status"] == "ok"
    moved = sys.modules["tryon_lab.runs.verify"]._moved
    assert moved("data", data, {"paths": ["b.json"], "files": {"b.json": "0" * 64}}).startswith(
        "FAIL  input changed: data /other/clone/coeffs.json -> b.json")


def test_model_described_in_another_clone_verifies(nbs, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CLONE", "/home/alice/tryon")
    run_dir = runs.run([nbs["nb_model"]], {}, name="model", runs_root=tmp_path, progress=False)
    index = (run_dir / "index.html").read_text()
    assert "embedded default with random weights at /home/alice/tryon/models/m" in index  # the model is named
    for href in ("nb_model/tile.png", "nb_model/metrics.json", "manifest.json", "nb_model/nb_model.html"):
        assert f'href="{href}"' in index
    assert "{'type'" not in index and "device: " in index  # readable, not a dict
    monkeypatch.setenv("FAKE_CLONE", "/home/bob/work/tryon")  # the reviewer's clone
    ok, report = runs.verify(run_dir)
    assert ok, report
    assert "note  metrics.json: model moved: /home/alice/tryon/models/m -> /home/bob/work/tryon/models/m" in report
    assert "ok    tile.png (bit-exact" in report


def test_source_hash_names_the_commit_a_copied_tree_ran(tmp_path, monkeypatch):
    # A results file stamped in a copy whose git metadata is stale still names its code: the working tree's
    # source hash equals the one computed from the commit it was copied from, and any edit changes it.
    import subprocess

    (tmp_path / "tryon_lab").mkdir()
    (tmp_path / "scripts").mkdir()
    (tmp_path / "tryon_lab" / "a.py").write_text("x = 1\n")
    (tmp_path / "scripts" / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.md").write_text("not a source\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    committed = provenance.source_hash_at("HEAD")
    assert provenance.source_hash() == committed and len(committed) == 16
    assert provenance.stamp()["source"] == committed
    (tmp_path / "notes.md").write_text("edited\n")  # not a source: same hash
    assert provenance.source_hash() == committed
    (tmp_path / "tryon_lab" / "a.py").write_text("x = 2\n")
    assert provenance.source_hash() != committed and provenance.source_hash_at("HEAD") == committed
