"""Notebook hygiene: every ``notebooks/NN_name.ipynb`` paired with its jupytext ``.py``, stripped of outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .record import PathLike, repo_root


def _cells(nb: Any) -> list[tuple]:
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", []))) for c in nb.cells]


def _problems(nb: Any, paired: Any) -> list[str]:
    out = []
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code" and c.get("outputs"):
            out.append(f"cell {i} has outputs")
        if c.cell_type == "code" and c.get("execution_count") is not None:
            out.append(f"cell {i} has an execution count")
    if "py:percent" not in str(nb.metadata.get("jupytext", {}).get("formats", "")):
        out.append("metadata lacks jupytext formats ipynb,py:percent")
    code = [c for c in nb.cells if c.cell_type == "code"]
    if not code or "parameters" not in code[0].metadata.get("tags", []):
        out.append("first code cell is not tagged 'parameters'")
    if _cells(nb) != _cells(paired):
        out.append("out of sync with its paired .py")
    return out


def sync_notebooks(check: bool = True, notebooks_dir: PathLike | None = None) -> list[str]:
    """check=True: problems (outputs, execution counts, unpaired, out of sync), empty if clean.
    check=False: rewrite each problematic .ipynb from its .py, stripped (pairing a lone .ipynb first)."""
    import jupytext

    d = Path(notebooks_dir) if notebooks_dir else repo_root() / "notebooks"
    msgs = []
    for stem in sorted({p.stem for p in d.glob("*.ipynb")} | {p.stem for p in d.glob("[0-9][0-9]_*.py")}):
        ipynb, py = d / f"{stem}.ipynb", d / f"{stem}.py"
        if not py.exists():
            if check:
                msgs.append(f"{ipynb.name}: no paired {py.name}")
                continue
            jupytext.write(jupytext.read(ipynb), py, fmt="py:percent")
            msgs.append(f"wrote {py.name} from {ipynb.name}")
        src = jupytext.read(py)
        src.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
        problems = _problems(jupytext.read(ipynb), src) if ipynb.exists() else ["missing (paired .py exists)"]
        if check:
            msgs += [f"{ipynb.name}: {p}" for p in problems]
        elif problems:
            for c in src.cells:
                if c.cell_type == "code":
                    c.outputs, c.execution_count = [], None
            jupytext.write(src, ipynb, fmt="ipynb")
            msgs.append(f"wrote {ipynb.name} from {py.name} ({'; '.join(problems)})")
    return msgs
