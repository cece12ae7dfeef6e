"""tryon_lab: a notebook workbench for fast FLUX.1 Fill + Redux virtual try-on."""

__version__ = "0.1.0"
