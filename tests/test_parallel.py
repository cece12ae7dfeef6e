"""Tests for tryon_lab.parallel: sweeps and TeaCache calibration on Ray (2 CPU workers), and diffusers' context
parallelism on CPU (gloo, world size 2, spawned processes) against one process.

Ray starts once for the module (``ray.init(num_cpus=2)``, no dashboard) and is shut down after it.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import jupytext
import pytest

from tryon_lab import parallel, runs

HERE = Path(__file__).parent

# Fails on the first ``fail_times`` executions of a point (counted in a file per point), then succeeds.
FLAKY = '''# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% tags=["parameters"]
output_dir = "runs/scratch/flaky"
counter_dir = ""
fail_times = 0

# %%
from pathlib import Path

from tryon_lab.runs import save_metrics

f = Path(counter_dir) / f"attempts-{fail_times}"
attempt = int(f.read_text()) + 1 if f.exists() else 1
f.write_text(str(attempt))
if attempt <= fail_times:
    raise RuntimeError(f"deliberate failure, attempt {attempt}")
save_metrics(output_dir, {"fail_times": fail_times, "attempt": attempt})
'''


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TRYON_LAB_CACHE": os.environ["TRYON_LAB_CACHE"]}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def nbs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("nbs")
    out = {}
    for py in sorted((HERE / "notebooks").glob("*.py")):
        out[py.stem] = d / f"{py.stem}.ipynb"
        jupytext.write(jupytext.read(py), out[py.stem], fmt="ipynb")
    out["flaky"] = d / "flaky.ipynb"
    jupytext.write(jupytext.reads(FLAKY, fmt="py:percent"), out["flaky"], fmt="ipynb")
    return out


def _points(sweep_dir: Path) -> list[tuple]:
    """What must not depend on how the sweep ran: points, statuses, output hashes, summary rows."""
    rec = json.loads((sweep_dir / "sweep.json").read_text())
    outs = []
    for pt in rec["points"]:
        m = json.loads((sweep_dir / pt["run"] / "manifest.json").read_text())
        assert m["sweep_point"] == pt["params"]
        outs.append((pt["run"], pt["params"], pt["status"],
                     [(e["stem"], e["status"], e["parameters"]["seed"], e["outputs"]) for e in m["notebooks"]]))
    return outs + [list(csv.DictReader((sweep_dir / "summary.csv").open()))]


def test_ray_sweep_matches_sequential(ray_local, nbs, tmp_path, monkeypatch):
    grid = {"seed": [1, 2, 3], "size": [4]}
    seq = runs.sweep([nbs["nb_ok"]], {"input_file": ""}, grid, name="seq", runs_root=tmp_path, progress=False)

    def not_here(*args, **kwargs):
        raise AssertionError("a point ran in the driver process, not in a Ray worker")

    monkeypatch.setattr(runs, "_run_in", not_here)  # the workers import their own copy of runs
    par = runs.sweep([nbs["nb_ok"]], {"input_file": ""}, grid, name="par", runs_root=tmp_path, progress=False,
                     executor="ray")
    assert json.loads((par / "sweep.json").read_text())["executor"] == "ray"
    a, b = _points(seq), _points(par)
    assert [p[2] for p in a[:-1]] == ["ok"] * 3
    assert a == b  # same sub-runs, statuses, image/metrics sha256, summary values
    assert len({p[3][0][3]["image.png"] for p in b[:-1]}) == 3  # and the seeds did reach the notebooks
    assert all((par / p[0] / "nb_ok" / "nb_ok.html").is_file() for p in b[:-1])


def test_ray_sweep_retries_once_then_records_failure(ray_local, nbs, tmp_path, capsys):
    counters = tmp_path / "counters"
    counters.mkdir()
    # through the CLI; fail_times 0: ok at once, 1: ok on Ray's retry, 2: fails twice -> recorded as failed
    rc = runs.main(["sweep", str(nbs["flaky"]), "-p", f"counter_dir={counters}", "--grid", "fail_times=0,1,2",
                    "--runs-root", str(tmp_path), "--name", "flaky", "--no-progress", "--ray"])
    assert rc == 1  # the sweep exits non-zero
    (sweep_dir,) = tmp_path.glob("*-flaky")
    rec = json.loads((sweep_dir / "sweep.json").read_text())
    assert [pt["status"] for pt in rec["points"]] == ["ok", "ok", "failed"]
    attempts = {ft: int((counters / f"attempts-{ft}").read_text()) for ft in (0, 1, 2)}
    assert attempts == {0: 1, 1: 2, 2: 2}  # retried once, and only once
    failed = rec["points"][2]
    assert "deliberate failure, attempt 2" in failed["error"]
    m = json.loads((sweep_dir / failed["run"] / "manifest.json").read_text())  # the last attempt's folder is kept
    assert m["status"] == "failed" and "attempt 2" in m["notebooks"][0]["error"]
    kept = json.loads((sweep_dir / rec["points"][1]["run"] / "flaky" / "metrics.json").read_text())
    assert kept == {"fail_times": 1, "attempt": 2}
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert "failed" in capsys.readouterr().out


def test_pack_unpack_round_trip(tmp_path):
    src = tmp_path / "a"
    (src / "nb").mkdir(parents=True)
    (src / "manifest.json").write_text("{}")
    (src / "nb" / "x.bin").write_bytes(bytes(range(256)))
    parallel.unpack(parallel.pack(src), tmp_path / "b")
    assert (tmp_path / "b" / "nb" / "x.bin").read_bytes() == bytes(range(256))
    assert (tmp_path / "b" / "manifest.json").read_text() == "{}"
