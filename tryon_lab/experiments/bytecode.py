"""Bytecode for the cold path's packages: written at image build, and counted in each cold process.

An image built with ``pip install --no-compile`` (or with ``PYTHONDONTWRITEBYTECODE`` set) compiles every imported
module from source in every fresh process, inside its imports; ``compile_bytecode`` writes the caches once, as an
image build step, and ``bytecode_report`` says what a process still compiled.
"""

from __future__ import annotations

import os
import sys
import time

# the cold path's Python packages, byte-compiled at image build by ``compile_bytecode``: the wheels this project
# installs, then what the cold processes on the H200 image still compiled from source in every process (its torch
# ships no bytecode and PYTHONDONTWRITEBYTECODE is set: 2499 modules per slim process, 11-30 fourth session)
BYTECODE_PACKAGES = ("diffusers", "torchao", "transformers", "peft", "huggingface_hub", "safetensors", "accelerate",
                     "tryon_lab", "torch", "torchgen", "functorch", "triton", "sympy", "mpmath", "networkx", "numpy",
                     "jinja2", "markupsafe", "requests", "urllib3", "idna", "charset_normalizer", "certifi",
                     "filelock", "fsspec", "httpx", "psutil", "packaging", "regex", "pynvml", "typing_extensions",
                     "scipy", "sklearn")

def bytecode_report(since: float) -> dict:
    """Imported modules this process compiled from source (no bytecode beside them, or written after ``since``):
    an image built with ``pip install --no-compile`` pays that in every fresh process, inside "imports"."""
    import importlib.util

    compiled: dict[str, int] = {}
    n = 0
    for name, module in list(sys.modules.items()):
        source = getattr(module, "__file__", None)
        if not source or not source.endswith(".py"):
            continue
        n += 1
        cached = importlib.util.cache_from_source(source)
        if not os.path.exists(cached) or os.path.getmtime(cached) >= since:
            top = name.split(".")[0]
            compiled[top] = compiled.get(top, 0) + 1
    return {"dont_write_bytecode": sys.dont_write_bytecode, "python_modules": n,
            "compiled_here": sum(compiled.values()), "compiled_here_by_package": compiled}


def compile_bytecode(packages: tuple[str, ...] = BYTECODE_PACKAGES) -> dict:
    """Write the bytecode caches of ``packages`` (as ``pip install`` does unless told ``--no-compile``): an image
    build step, timed apart from every cold start. Packages not installed, or read-only, are listed as such."""
    import compileall
    import importlib.util

    start, done, skipped, failed_files = time.perf_counter(), [], [], []
    for name in packages:
        spec = importlib.util.find_spec(name)
        roots = list(spec.submodule_search_locations or []) if spec else []
        single = spec is not None and not roots and (spec.origin or "").endswith(".py")  # a one-file module
        where = [os.path.dirname(spec.origin)] if single else roots
        if not where or not all(os.access(r, os.W_OK) for r in where):
            skipped.append(name)
            continue
        done.append(name)
        ok = (compileall.compile_file(spec.origin, quiet=2) if single else
              all([compileall.compile_dir(r, quiet=2, workers=0) for r in roots]))
        if not ok:
            failed_files.append(name)  # a file that does not compile (e.g. a template) is left to the import
    return {"seconds": time.perf_counter() - start, "compiled": done, "not_compiled": skipped,
            "with_files_that_failed": failed_files}
