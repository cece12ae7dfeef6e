"""Experiments: calibration, sweeps, equivalence and variant runs, cold start, benchmarks.

They import the flow and the parts; nothing in the package imports them (notebooks and scripts do)."""
