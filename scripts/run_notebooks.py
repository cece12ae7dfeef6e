#!/usr/bin/env python
"""Run, sweep, verify and sync the workbench notebooks; same CLI as ``python -m tryon_lab.runs``.

    python scripts/run_notebooks.py run notebooks/01_slim_pipeline.ipynb -p steps=4 --name demo
    python scripts/run_notebooks.py run --all
    python scripts/run_notebooks.py sweep notebooks/01_slim_pipeline.ipynb --grid fp8=false,true
    python scripts/run_notebooks.py verify runs/<run-folder>
    python scripts/run_notebooks.py sync --check
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tryon_lab.runs import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
