"""A file cache of what diffusers and transformers compute from the installed files while they are imported.

- ``importlib.metadata.packages_distributions()``: the map from import names to installed distributions, which
  diffusers and transformers each build to see which optional packages are there, by walking every installed
  distribution's file list. On the H200 image (200 distributions) one walk took 0.54 s; a process makes two.
- transformers' ``define_import_structure``: the lazy-import table of ``transformers`` and ``transformers.models``,
  built by reading every model file's source for its ``__all__`` (3,121 files on the H200 image, about 1 s).

``leave_out`` is the other half of a serving image: packages installed for the workbench that the slim serving
path imports but never calls (peft for LoRAs; scipy and scikit-learn for schedulers, losses and generation it does
not use; sentencepiece for tokenizers it does not run) marked absent in the serving process, so diffusers' and
transformers' availability checks skip them as if they were not installed.

The cached tables only change when packages are installed or removed, which changes the modification time of the
folder they live in, so the cache is keyed by ``sys.path``, the modification times of its folders and transformers' folders:
an install, a removal or another path makes it miss, and a miss computes everything as before and rewrites the
file. Call ``use(path)`` before the first import of diffusers or transformers (a serving script's first lines);
write the file at image build with ``write(path)``, as pip writes bytecode at install time.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
import warnings
from pathlib import Path

_ORIGINAL_MAP = importlib.metadata.packages_distributions
DEFAULT_FILE = "import-cache.json"
SLIM_IMPORTS = ("diffusers.pipelines.flux.pipeline_flux_fill", "diffusers.pipelines.flux.pipeline_flux_prior_redux")
_STRUCTURE_MODULE = "transformers.utils.import_utils"
_state: dict = {"left_out": []}  # "cache": this process's cache once use() ran; "left_out": leave_out()'s packages
# imported by diffusers' and transformers' modules on the slim path behind availability checks, never called by it
SERVING_LEFT_OUT = ("peft", "scipy", "sklearn", "sentencepiece")
WITHOUT_TRANSFORMERS = (*SERVING_LEFT_OUT, "transformers")  # with Redux in its own process (redux_process.py)


def _transformers_spec():
    """transformers' spec found on ``sys.path`` itself, as if nothing had imported or left it out: a serving process
    that leaves it out (``leave_out``) keys and reads the same file as the image build that imported it."""
    return importlib.machinery.PathFinder.find_spec("transformers")


def path_key() -> list[list]:
    """``sys.path``'s folders and transformers' own folders with their modification times (ns): what a package
    install or removal changes."""
    spec = _transformers_spec()
    own = [os.path.join(d, sub) for d in (spec.submodule_search_locations or [])
           for sub in ("", "models")] if spec else []
    # absolute and once each: "" (the current folder under -c) and -m's script folder name the same place
    folders = dict.fromkeys(os.path.abspath(p or os.getcwd()) for p in [*sys.path, *own])
    return [[p, os.stat(p).st_mtime_ns] for p in folders if os.path.isdir(p)]


def _encode(structure: dict) -> list:
    return [[sorted(backends), {m: sorted(names) for m, names in modules.items()}]
            for backends, modules in structure.items()]


def _decode(rows: list) -> dict:
    return {frozenset(backends): {m: set(names) for m, names in modules.items()} for backends, modules in rows}


class _Cache:
    """The map and the import structures of this process: served from the file, added to on a miss."""

    def __init__(self, path: Path, data: dict | None):
        self.path, self.hit = path, data is not None
        self.data = data or {"key": path_key(), "python": sys.version, "map": _ORIGINAL_MAP(), "structures": {}}
        self.structure_misses, self.wrapped = 0, []  # (module, its own define_import_structure)

    def packages_distributions(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.data["map"].items()}  # each caller its own copy

    def wrap_structures(self, module) -> None:
        """Serve ``module.define_import_structure`` (transformers' import utilities, just executed) from the cache."""
        original = module.define_import_structure
        self.wrapped.append((module, original))

        @functools.cache
        def define_import_structure(module_path, prefix=None):
            key = f"{module_path}|{prefix}"
            if key not in self.data["structures"]:
                self.structure_misses += 1
                self.data["structures"][key] = _encode(original(module_path, prefix))
                self.save()  # once per table: the next process finds it
            return _decode(self.data["structures"][key])

        define_import_structure.__doc__ = original.__doc__
        module.define_import_structure = define_import_structure

    def save(self) -> None:
        """Write the file; a place that cannot be written only costs the next process the walks (a warning)."""
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")  # a reader never sees a half-written file
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)
        except OSError as e:
            warnings.warn(f"import cache not written to {self.path} ({e}); this process runs as without it. "
                          "Give use()/write() a writable path (e.g. beside the model folder at image build).",
                          stacklevel=3)


class _AfterLoad(importlib.abc.MetaPathFinder):
    """Runs ``then(module)`` right after ``name`` executes, before anything imports names from it."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; the real finders find the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run, then = spec.loader.exec_module, self.then

        def exec_module(module):
            run(module)
            then(module)

        spec.loader.exec_module = exec_module
        return spec


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("key") == path_key() and data.get("python") == sys.version else None


def use(path: str | Path) -> dict:
    """Serve the package map and transformers' import structures from the cache at ``path`` in this process (a
    missing or stale file is rebuilt now, its structures when transformers is first imported); returns
    {"hit", "seconds"}. Must run before diffusers or transformers is imported to save anything."""
    start = time.perf_counter()
    cache = _Cache(Path(path), _read(Path(path)))
    importlib.metadata.packages_distributions = cache.packages_distributions
    if _STRUCTURE_MODULE in sys.modules:
        cache.wrap_structures(sys.modules[_STRUCTURE_MODULE])
    elif _transformers_spec() is not None:  # also when left out here: a forked worker brings it back
        sys.meta_path.insert(0, _AfterLoad(_STRUCTURE_MODULE, cache.wrap_structures))
    if not cache.hit:
        cache.save()  # the map now; each import structure as it is built
    _state["cache"] = cache
    return {"hit": cache.hit, "seconds": time.perf_counter() - start}


def write(path: str | Path, imports: tuple[str, ...] = SLIM_IMPORTS) -> dict:
    """Build the cache at ``path`` from scratch: the package map, and transformers' import tables by importing
    ``imports`` (each transformers model package has a table of its own: import what the serving process does;
    by default the diffusers pipelines the slim pipeline builds on, which import the CLIP, T5 and SigLIP classes).
    An image build step, in a process started as the serving processes are: the key is its ``sys.path``."""
    start = time.perf_counter()
    Path(path).unlink(missing_ok=True)
    use(path)
    cache = _state["cache"]
    for name in imports:
        importlib.import_module(name)
    cache.save()
    return {"seconds": time.perf_counter() - start, "distributions_mapped": len(cache.data["map"]),
            "import_structures": len(cache.data["structures"])}


def leave_out(packages: tuple[str, ...] = SERVING_LEFT_OUT) -> list[str]:
    """Mark ``packages`` absent in this process (``sys.modules[name] = None``: ``find_spec`` then returns None and an
    import raises ModuleNotFoundError), before anything imports them; returns the packages left out. For a serving
    process that runs the slim pipeline only: LoRA loading needs peft (``configure.check_options`` says so)."""
    if imported := [p for p in packages if sys.modules.get(p) is not None]:
        raise RuntimeError(f"cannot leave out {imported}: already imported in this process; call leave_out() "
                           "first thing, before diffusers or transformers is imported")
    for name in packages:
        sys.modules[name] = None
        if name not in _state["left_out"]:
            _state["left_out"].append(name)
    return list(packages)


def bring_back(name: str) -> None:
    """Make one left-out package importable again in this process (a forked worker that needs what its parent
    left out)."""
    if name in sys.modules and sys.modules[name] is None:
        del sys.modules[name]
    if name in _state["left_out"]:
        _state["left_out"].remove(name)


def left_out() -> list[str]:
    """The packages ``leave_out`` marked absent in this process."""
    return list(_state["left_out"])


def report() -> dict:
    """This process's cache: hit or not, and the import structures it had to build (0 when all were cached)."""
    cache = _state.get("cache")
    return {"used": False} if cache is None else {"used": True, "hit": cache.hit,
                                                  "structure_misses": cache.structure_misses}


def restore() -> None:
    """Back to importlib's and transformers' own functions, and left-out packages importable again (tests; tables
    transformers already built stay)."""
    for name in list(_state["left_out"]):
        bring_back(name)
    importlib.metadata.packages_distributions = _ORIGINAL_MAP
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterLoad)]
    cache = _state.pop("cache", None)
    for module, original in cache.wrapped if cache else []:
        module.define_import_structure = original


if __name__ == "__main__":  # the image build step: python -m tryon_lab.import_cache [PATH]
    print(json.dumps(write(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_FILE)))
