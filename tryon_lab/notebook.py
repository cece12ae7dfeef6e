"""The one call every notebook opens with, and the few display helpers the notebooks share.

    lab = notebook.setup(model, device, dtype, output_dir)

resolves the model folder, device and dtype, makes the output folder, quiets known third-party noise (each
message by its text, so anything else still shows) and shows which model, device and commit the results come
from. ``lab.pipeline()`` / ``lab.build()`` make pipelines through ``configure`` with the lab's options.
On the CPU, timings are shared-machine noise: ``lab.timing(label)`` marks a label "indicative (CPU)".

Importing this module is cheap and silent; ``configure`` (whose import pulls in diffusers' hooks and, through
transformers, torchao, which warns at import) is imported only after the filters are in place, so a notebook
imports ``notebook`` and calls ``setup`` before importing the rest of the package.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .loading import resolve_device_dtype
from .plots import markdown_table
from .provenance import REPO_ROOT, stamp

if TYPE_CHECKING:
    from .configure import PipelineOptions
    from .loading import SlimPipeline

# (logger, message pattern, CPU only): warnings known to say nothing about the results. A message that does not
# match is shown as before; only WARNING records are ever dropped.
KNOWN_NOISE: tuple[tuple[str, str, bool], ...] = (
    # torchao's CUDA kernels (FP8 GEMMs, MX formats) cannot load on a CPU-only machine; its Python path still works
    ("torchao", r"^Failed to load .*torchao/_C.*\.so: Could not load this library", True),
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported by torch\.compile", False),
    ("diffusers.quantizers.torchao.torchao_quantizer", r"^Unable to import `torchao` Tensor objects", False),
    ("diffusers.models.modeling_utils", r"^Attention backends are an experimental feature", False),
    ("transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back to", False),
)
# (category, message pattern) of Python warnings, each an announced deprecation inside a library we call
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"(?s).*(is deprecated|deprecated and will be removed|will be removed in version)"),
)
CPU_TIMING = "indicative (CPU)"


def timed(label: str, cpu: bool) -> str:
    """``label`` marked "indicative (CPU)" when the seconds come from a CPU, unchanged on a GPU."""
    return f"{label}, {CPU_TIMING}" if cpu else label


class _DropKnown(logging.Filter):
    """Drops WARNING records whose message matches one pattern; everything else passes."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def quiet_known_noise(device: str = "cpu") -> list[str]:
    """Install the filters of ``KNOWN_NOISE`` (CPU-only ones only when ``device`` is the CPU) and
    ``KNOWN_WARNINGS``; idempotent. Also turns off the weight-loading progress bars. Returns the loggers filtered."""
    cpu = torch.device(device).type == "cpu"
    by_logger: dict[str, list[str]] = {}
    for name, pattern, cpu_only in KNOWN_NOISE:
        if cpu or not cpu_only:
            by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, _DropKnown)]:
            logger.removeFilter(f)
        logger.addFilter(_DropKnown(patterns))
    for category, pattern in KNOWN_WARNINGS:
        for module in (r"diffusers(\..*)?", r"transformers(\..*)?"):
            warnings.filterwarnings("ignore", message=pattern, category=category, module=module)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    return sorted(by_logger)


def human_bytes(n: float | None) -> str:
    """``74.5 GiB``, ``3.2 MiB``, ``512 B`` (binary units, three significant digits); '' for None."""
    if n is None:
        return ""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class Lab:
    """What a notebook's results depend on: model folder, device, dtype, options, output folder, provenance."""

    model_dir: Path
    device: str
    dtype: torch.dtype
    output_dir: Path
    options: PipelineOptions
    description: str  # checkpoint.describe_model: kind, path and fingerprint
    stamp: dict = field(default_factory=dict)  # provenance.stamp: device name, commit, date, versions

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def cpu(self) -> bool:
        """On the CPU every timing is shared-machine noise: show pass counts, label seconds ``CPU_TIMING``."""
        return torch.device(self.device).type == "cpu"

    def timing(self, label: str) -> str:
        """``label`` marked "indicative (CPU)" on the CPU, unchanged on a GPU."""
        return timed(label, self.cpu)

    def pipeline(self, **changes) -> SlimPipeline:
        """The warm pipeline for this model and the lab's options (``changes`` override fields), built once."""
        from .configure import get_pipeline

        return get_pipeline(self.model_dir, replace(self.options, **changes))

    def build(self, **changes) -> SlimPipeline:
        """A fresh pipeline for this model and the lab's options (``changes`` override fields)."""
        from .configure import build_pipeline

        return build_pipeline(self.model_dir, replace(self.options, **changes))

    def header(self) -> str:
        """Markdown: which model, device, dtype and commit the results below come from."""
        s = self.stamp
        timing = f"; timings are {CPU_TIMING}" if self.cpu else ""
        return (f"**Model:** {self.description}  \n**Device:** {s.get('device')}, dtype {self.dtype_name}{timing}  \n"
                f"**Commit:** {s.get('commit')}; torch {s.get('torch')}, diffusers {s.get('diffusers')}  \n"
                f"**Output:** `{self.output_dir}`")


def setup(model: str | Path | None = "default", device: str = "auto", dtype: str = "auto",
          output_dir: str | Path = "runs/scratch", quiet: bool = True, show: bool = True,
          sample_ids: tuple[str, ...] = ()) -> Lab:
    """The notebook preamble in one call: resolve ``model`` (``checkpoint.resolve_model_dir``), ``device`` and
    ``dtype`` (``"auto"``: CUDA + bf16 when there is a GPU, else CPU + fp32), make ``output_dir``, quiet the
    known third-party warnings (``quiet``) and display the model / device / commit header (``show``).
    ``sample_ids`` are checked against the manifest first, so a wrong id fails in seconds, before any model loads.

    Relative paths in a notebook's parameters are relative to the repository root, where headless runs execute;
    a kernel started inside the checkout (JupyterLab on ``notebooks/``, ``make lab``) moves there first."""
    if REPO_ROOT in Path.cwd().resolve().parents:
        os.chdir(REPO_ROOT)
    from .samples import check_sample_id

    for sample_id in sample_ids:
        check_sample_id(sample_id)
    resolved_device, torch_dtype = resolve_device_dtype(device, dtype)
    if quiet:
        quiet_known_noise(resolved_device)
    from .checkpoint import describe_model, resolve_model_dir
    from .configure import PipelineOptions

    options = PipelineOptions(device=device, dtype=dtype).resolved()
    model_dir = resolve_model_dir(model)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lab = Lab(model_dir, options.device, torch_dtype, out, options, describe_model(model_dir), stamp(options.device))
    if show:
        markdown(lab.header())
    return lab


# ------------------------------------------------------------------------------------------- display
def markdown(text: str) -> None:
    """Show markdown text as a cell output (nothing for empty text)."""
    from IPython.display import Markdown, display

    if text:
        display(Markdown(text))


def table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = "{:.3g}", note: str = "") -> None:
    """Show rows as a markdown table (with an optional line under it); nothing for no rows but the note."""
    if not rows and not note:
        return
    markdown((markdown_table(rows, columns, floatfmt) if rows else "") + (f"\n{note}" if note else ""))


def images(pictures: list, titles: list[str], scale: float = 2.2):
    """Images side by side as a plain figure (shown in the HTML export too); returns the Figure."""
    import matplotlib.pyplot as plt

    from .plots import image_row

    fig = image_row(pictures, titles, scale)
    plt.show()
    return fig


def legend_outside(fig, ax=None, fontsize: int = 8):
    """Move ``ax``'s legend (default: the first axes') to the right of the figure, off the data; returns ``fig``."""
    ax = ax if ax is not None else fig.axes[0]
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    fig.tight_layout()
    if handles:  # figure coordinates: x=1 is the right edge; the notebook's tight bounding box keeps it in view
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.97), fontsize=fontsize, frameon=False)
    return fig


def recorded(output_dir: str | Path) -> None:
    """List what the notebook recorded in ``output_dir`` (the files a ``runs verify`` compares, and the records)."""
    out = Path(output_dir)
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.suffix != ".ipynb"
                   and p.suffix != ".html")
    markdown(f"Recorded in `{out}`: " + (", ".join(f"`{n}`" for n in names) or "nothing"))
