#!/usr/bin/env python
"""Screenshot the interactive try-on widget (notebook 04) as rendered by JupyterLab in headless Chromium.

    python scripts/screenshot_widget_ui.py          # writes docs/widget_ui.png and docs/widget_error.png
    python scripts/screenshot_widget_ui.py --chromium "$(command -v chromium)" --out ui.png --error-out ""

docs/widget_ui.png: the widget after Run All; docs/widget_error.png: the same widget after its Run button was
pressed with a logo box outside the garment image (the red error line, outputs cleared); ``--error-out ""``
skips that second screenshot.

How: ``tryon_lab.experiments.screenshot``. Needs, besides the workbench environment (jupyterlab, ipywidgets,
ipykernel, pillow):

* Playwright's Python package (``pip install playwright``); it is an optional tool, not a dependency
  of the workbench, and no Playwright-managed browser is needed;
* a system Chromium (e.g. Debian's ``apt-get install chromium``), passed with ``--chromium``.

On CPU the notebook's model takes a minute or two; ``--timeout`` bounds the wait for the widget output.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tryon_lab.experiments import screenshot  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=screenshot.REPO_ROOT / "docs" / "widget_ui.png")
    ap.add_argument("--error-out", default=str(screenshot.REPO_ROOT / "docs" / "widget_error.png"),
                    help='the widget after a bad logo box ("" to skip)')
    ap.add_argument("--chromium", default=None, help="a Chromium executable (default: chromium on PATH)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1500)
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for the widget output")
    ap.add_argument("--max-kb", type=int, default=400)
    args = ap.parse_args(argv)
    screenshot.screenshot_widget(args.out, args.chromium, args.width, args.height, args.timeout, args.max_kb,
                                 error_out=args.error_out or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
