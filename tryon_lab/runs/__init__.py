"""Headless notebook runs: manifests, sweeps, verification and notebook hygiene.

Modules: ``record`` (what notebooks and runs record: save_image / save_metrics / record_inputs /
record_tolerances, portable paths, JSON, environment), ``execute`` (papermill runs, manifests, index.html),
``sweep`` (grids, sweeps, summaries; Ray through ``tryon_lab.jobs``), ``verify``, ``hygiene`` (paired,
stripped notebooks) and ``cli`` (``python -m tryon_lab.runs``). The names below are the public API; the
functions ``runs.sweep`` and ``runs.verify`` shadow the modules of the same name (those are
``sys.modules["tryon_lab.runs.sweep"]`` / ``["tryon_lab.runs.verify"]``).

Notebook conventions
--------------------
* Notebooks live in ``notebooks/NN_name.ipynb``, paired with ``notebooks/NN_name.py`` (jupytext percent
  format, metadata ``jupytext: formats: ipynb,py:percent``) and are committed with outputs stripped
  (``python -m tryon_lab.runs sync --check`` enforces this; ``sync`` rewrites each .ipynb from its .py).
* The first code cell is tagged ``parameters``.  Every notebook declares ``output_dir`` (str) and usually
  ``seed``.  A parameter that no notebook of the run declares is refused before anything runs (CLI exit
  code 2, naming the declared ones and the closest match); a global key declared by only some of the
  notebooks goes to those (the manifest lists it under the others' ``ignored_parameters``).  The runner sets
  ``output_dir`` to ``<run>/<NN_name>/`` and executes with the repo root as working directory.
* Notebooks record what they produce and use with the import-light helpers: ``save_image(output_dir, name,
  image)``, ``save_metrics(output_dir, metrics, name="metrics")`` (paths under the repo or the cache inside
  strings are written portably), ``record_inputs(output_dir, {"transformer": "models/flux-fill", "coeffs":
  ["a.json", "b.json"]})`` (sha256 of every file, folders recursed, hidden files skipped) and, for outputs
  that are not bit-exact (compiled, FP8), ``record_tolerances(output_dir, {"image_psnr_min": 40.0,
  "metrics_rtol": 1e-3, "metrics_ignore": ["*_ms", "peak_mem_*"]})``.  Timings belong in
  ``metrics_ignore`` (fnmatch patterns on dotted keys), otherwise a re-run can never match.

Records are portable: paths are repo-relative when under the checkout, ``<cache>/...`` when under the
workbench cache (``TRYON_LAB_CACHE``), absolute otherwise; hashes come from ``tryon_lab.provenance``.

Run folder: ``runs/<YYYY-MM-DD-HHMMSS>-<name>/`` with ``manifest.json``, ``index.html`` and per notebook
``<NN_name>/`` holding ``<NN_name>.ipynb`` (executed, partial on failure), ``<NN_name>.html``, the record
files ``_inputs.json`` / ``_tolerances.json`` and whatever the notebook wrote to ``output_dir``.
A sweep folder holds one such run per grid point plus ``sweep.json``, ``summary.csv``, ``summary.md``.
``verify`` re-runs into its own ``<run>.verify-<YYYYmmdd-HHMMSS>[-n]/`` next to the run.

``manifest.json`` (rewritten atomically after every notebook)::

    {"format": 2, "name", "created", "finished", "command", "status": running|ok|failed|interrupted,
     "error", "traceback" (a crash outside the notebooks), "git": {"commit", "dirty"}, "host", "python",
     "platform", "packages": {"torch": "2.6.0" | null, ...}, "device": {"type": "cuda"|"cpu", "name", ...},
     "notebooks": [{"notebook" (portable), "stem", "dir", "notebook_sha256",
                    "status": pending|running|ok|failed|interrupted, "parameters" (as injected; output_dir
                    portable), "ignored_parameters", "duration_s", "error", "traceback",
                    "inputs": {name: {"paths": [...], "files": {path: sha256 | null}}},
                    "tolerances": {...}, "outputs": {relative path: sha256}}]}
"""

from __future__ import annotations

from typing import Any

from .cli import main, parse_value
from .execute import (
    Job,
    UnknownParameter,
    all_notebooks,
    check_parameters,
    declared_parameters,
    merge_params,
    notebook_params,
    resolve_notebooks,
    run,
    run_jobs,
    run_sweep_point,
    write_index,
)
from .hygiene import sync_notebooks
from .record import (
    CACHE_PREFIX,
    IMAGE_SUFFIXES,
    INPUTS_FILE,
    PACKAGES,
    TOLERANCES_FILE,
    device_text,
    environment,
    hash_inputs,
    portable_path,
    read_json,
    record_inputs,
    record_tolerances,
    repo_root,
    resolve_path,
    save_image,
    save_metrics,
    write_json,
)
from .sweep import expand_grid, sweep, write_summary
from .verify import compare_output, verify

__all__ = [
    "CACHE_PREFIX", "IMAGE_SUFFIXES", "INPUTS_FILE", "PACKAGES", "TOLERANCES_FILE", "Job", "UnknownParameter",
    "all_notebooks", "check_parameters", "compare_output", "declared_parameters", "device_text", "environment",
    "expand_grid", "file_hashes", "hash_inputs", "main", "merge_params", "notebook_params", "parse_value",
    "portable_path", "read_json", "record_inputs", "record_tolerances", "repo_root", "resolve_notebooks",
    "resolve_path", "run", "run_jobs", "run_sweep_point", "save_image", "save_metrics", "sha256_file", "sweep",
    "sync_notebooks", "verify", "write_index", "write_json", "write_summary",
]


def __getattr__(name: str) -> Any:
    """``sha256_file`` / ``file_hashes`` are provenance's (imported on first use: provenance imports torch)."""
    if name in ("sha256_file", "file_hashes"):
        from .. import provenance

        return getattr(provenance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
