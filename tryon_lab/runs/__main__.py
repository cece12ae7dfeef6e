"""``python -m tryon_lab.runs ...``: the runner's CLI (see ``tryon_lab.runs.cli``)."""

from .cli import main

raise SystemExit(main())
