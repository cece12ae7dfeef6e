"""Screenshot the interactive try-on widget (notebook 04) as JupyterLab renders it in headless Chromium.

``screenshot_widget``: copies ``notebooks/04_interactive_tryon.ipynb`` into a temporary folder (so the
notebook's run outputs land there, not in the repository), starts ``jupyter lab`` on 127.0.0.1 with a random
token on a free port and no browser, opens the notebook in headless Chromium, runs all cells from the Run menu,
waits until the widget shows its output images and timing table and the remaining cells have finished, scrolls
the widget to the top and fits the window to it, takes a full-page screenshot, stops the server and shrinks the
PNG if needed (``max_kb``). With ``error_out`` it then also shows the widget after an error, as a user meets
it: it types a logo box outside the garment image (``BAD_BOXES``) into the widget's "logo boxes" field, presses
the widget's Run button, waits for the red "Error:" line and takes a second screenshot.

Needs Playwright's Python package (an optional tool, not a dependency of the workbench; no Playwright-managed
browser) and a system Chromium (e.g. Debian's ``apt-get install chromium``).
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ..provenance import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "04_interactive_tryon.ipynb"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The kernel is started and idle (status bar: "Python 3 (ipykernel) | Idle").
KERNEL_IDLE_JS = """() => {
    const bar = document.querySelector('#jp-main-statusbar');
    return bar !== null && /\\bIdle\\b/.test(bar.innerText);
}"""
# The widget's output: the three result images carry data, and the timing table is filled in.
OUTPUT_READY_JS = """() => {
    const out = [...document.querySelectorAll('.jp-OutputArea-output .widget-vbox')];
    const imgs = [...document.querySelectorAll('.jp-OutputArea-output img')]
        .filter(i => i.src && i.naturalWidth > 0);
    const tables = [...document.querySelectorAll('.jp-OutputArea-output .widget-html-content table')];
    return out.length > 0 && imgs.length >= 4 && tables.length > 0;
}"""
# Run All has finished (or stopped at an error): no cell is queued or running, and the kernel is idle.
ALL_DONE_JS = """() => {
    const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
    const bar = document.querySelector('#jp-main-statusbar');
    return !prompts.some(p => p.innerText.includes('*')) && bar !== null && /\\bIdle\\b/.test(bar.innerText);
}"""
# The widget shows an error line (after a bad input), and Run has cleared its outputs.
ERROR_SHOWN_JS = """() => [...document.querySelectorAll('.jp-OutputArea-output .widget-vbox .widget-html-content')]
    .some(e => e.innerText.startsWith('Error:'))"""
# A logo box far outside the (small) garment image: Run rejects it before any model call.
BAD_BOXES = "10,10,40,40; 900,900,1000,1000"
# Scroll the notebook so the widget starts just below the toolbar.
TO_TOP_JS = """e => {
    e.scrollIntoView({block: 'start'});
    const scroller = e.closest('.jp-WindowedPanel-outer');
    if (scroller) { scroller.scrollTop -= 6; }
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"jupyter lab did not answer at {url.split('?')[0]} within {timeout:.0f}s")


def start_lab(root: Path, port: int, token: str, log) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--LabApp.check_for_updates_class="
           "jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # e.g. in containers
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_lab(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fit_to_widget(page, widget, width: int, height: int) -> bytes:
    """Put the widget at the top of the notebook panel and shorten the window so the panel ends just below it
    (the line above it names the model's local path; the next cell's stderr would show local library paths);
    a full-page screenshot."""
    page.set_viewport_size({"width": width, "height": height})
    widget.evaluate(TO_TOP_JS)
    page.wait_for_timeout(1000)
    box = widget.bounding_box()
    panel = page.locator(".jp-NotebookPanel .jp-WindowedPanel-outer").first.bounding_box()
    if box and panel:
        below = height - (panel["y"] + panel["height"])  # status bar and margins
        page.set_viewport_size({"width": width, "height": int(box["y"] + box["height"] + 16 + below)})
        widget.evaluate(TO_TOP_JS)
    page.wait_for_timeout(2000)  # let the images lay out
    return page.screenshot(full_page=True)


def shoot(url: str, chromium: str, user_data: Path, width: int, height: int, timeout: float,
          with_error: bool = False) -> tuple[bytes, bytes | None]:
    """The widget after Run All (PNG) and, ``with_error``, after a Run with ``BAD_BOXES`` (PNG, else None)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(user_data), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            # The kernel must be up before "Run All Cells" is useful.
            page.wait_for_function(KERNEL_IDLE_JS, timeout=180_000, polling=1000)
            page.keyboard.press("Control+b")  # collapse the left sidebar
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            page.wait_for_function(OUTPUT_READY_JS, timeout=timeout * 1000, polling=1000)
            # Let the remaining cells finish too, so the progress bar and kernel status are final.
            page.wait_for_function(ALL_DONE_JS, timeout=timeout * 1000, polling=1000)
            page.add_style_tag(content=".Toastify { display: none !important; }")  # "Jupyter news?" toast
            widget = page.locator(".jp-OutputArea-output .widget-vbox").first
            ok = fit_to_widget(page, widget, width, height)
            if not with_error:
                return ok, None
            boxes = widget.locator(".widget-textarea textarea").first
            boxes.fill(BAD_BOXES)  # continuous_update: the kernel gets the new value as it is typed
            boxes.press("Tab")
            page.wait_for_timeout(1000)
            widget.locator("button.jupyter-button", has_text="Run").first.click()
            page.wait_for_function(ERROR_SHOWN_JS, timeout=120_000, polling=500)
            page.wait_for_function(ALL_DONE_JS, timeout=120_000, polling=1000)
            return ok, fit_to_widget(page, widget, width, height)
        finally:
            context.close()


def shrink(png: bytes, max_kb: int) -> bytes:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    for colors in (None, 256, 128, 64):
        candidate = img if colors is None else img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
        buf = io.BytesIO()
        candidate.save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_kb * 1024:
            return buf.getvalue()
    while True:
        img = img.resize((img.width * 4 // 5, img.height * 4 // 5), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.quantize(colors=128).save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_kb * 1024 or img.width < 400:
            return buf.getvalue()


def screenshot_widget(out: str | Path = REPO_ROOT / "docs" / "widget_ui.png", chromium: str | None = None,
                      width: int = 1400, height: int = 1500, timeout: float = 600, max_kb: int = 400,
                      error_out: str | Path | None = None) -> list[Path]:
    """Run notebook 04 in JupyterLab, screenshot its widget with ``chromium`` (default: chromium on PATH) and
    write the PNG (at most ``max_kb``) to ``out``; ``timeout``: seconds to wait for the widget output. With
    ``error_out``, also the widget after a Run with a logo box outside the garment image, to ``error_out``."""
    chromium = chromium or shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    with tempfile.TemporaryDirectory(prefix="widget-ui-") as tmp:
        root = Path(tmp) / "lab"
        root.mkdir()
        shutil.copy2(NOTEBOOK, root / NOTEBOOK.name)
        port, token = free_port(), secrets.token_hex(16)
        base = f"http://127.0.0.1:{port}"
        with open(Path(tmp) / "lab.log", "wb") as log:
            proc = start_lab(root, port, token, log)
            try:
                wait_for_server(f"{base}/api/status?token={token}", proc, timeout=120)
                url = f"{base}/lab/tree/{NOTEBOOK.name}?reset&token={token}"
                pngs = shoot(url, chromium, Path(tmp) / "chromium-profile", width, height, timeout,
                             with_error=error_out is not None)
            except Exception:
                log.flush()
                sys.stderr.write((Path(tmp) / "lab.log").read_text(errors="replace")[-4000:])
                raise
            finally:
                stop_lab(proc)
    written = []
    for path, png in zip((out, error_out), pngs, strict=True):
        if path is None or png is None:
            continue
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(shrink(png, max_kb))
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
        written.append(path)
    return written
