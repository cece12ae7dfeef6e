"""Experiments behind the scripts: LoRA hotswap measured, the memory benchmark's tables, thin scripts."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from tests.test_lora import tiny_fill, tiny_inputs
from tryon_lab import compiling, lora
from tryon_lab.experiments import lora_swap, memory_bench

ROOT = Path(__file__).resolve().parent.parent


def test_swap_benchmark_hotswaps_without_recompiling(tmp_path):
    compiling.reset_compiled()
    maker = tiny_fill(seed=3).transformer
    paths = [lora.make_lora(maker, r, seed=r, path=tmp_path / f"r{r}") for r in (2, 4)]
    pipe = tiny_fill()
    x = tiny_inputs(pipe.transformer)

    def call():
        with torch.no_grad():
            return pipe.transformer(**x)[0]

    out = lora_swap.swap_benchmark(pipe, paths, call, "regional", "aot_eager")
    assert out["recompiles_after_swap"] == 0 and out["graphs_first"] > 0
    assert out["swap_changed_rel_l2"] > 1e-3  # B is not A ...
    assert out["swap_vs_reload_rel_l2"] < 1e-5  # ... and swapping in B equals loading B after an unload


def test_memory_budget_table_and_report():
    res = {"components": {"transformer": {"bytes": 2**30}, "logo crops, per logo": {"bytes": 2**28}},
           "modes": {"bf16": {"peak_bytes": 3 * 2**30, "s_per_image": 2.0, "ok": True, "timings": {}}},
           "logo_resident_bytes": {"bf16": 2**30}, "caps": {"16 GB": {"completed": False, "error": "x"}},
           "model": "m", "request": "r"}
    table = memory_bench.budget_table(res)
    assert table["modes"]["bf16"] == {"peak_bytes": 3 * 2**30, "s_per_image": 2.0, "ok": True}
    assert table["logo"] == {"per_logo_bytes": 2**28, "resident_bytes": {"bf16": 2**30}}
    md = memory_bench.report(res)
    assert "| bf16 |" in md and "16 GB" in md
    merged = {"modes": {"bf16": {"ok": True}}}
    memory_bench.merge(merged, memory_bench._failed("fp8", "boom"))
    assert merged["modes"] == {"bf16": {"ok": True}, "fp8": {"ok": False, "error": "boom"}}


def test_scripts_are_thin_and_import_no_script():
    """Scripts parse arguments and call into tryon_lab; none imports another script (tests neither)."""
    for path in [*(ROOT / "scripts").glob("*.py"), *(ROOT / "tests").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "scripts" or n.startswith("scripts.") for n in names), f"{path.name} imports a script"


def test_text_tokens_bench_writes_one_row_per_length_against_the_first(tmp_path):
    """The text-length benchmark at a tiny size: a stamped entry, a row per length, each compared with the first."""
    import json

    from tryon_lab.experiments import text_tokens_bench

    rows = text_tokens_bench.run("random", (512, 16), steps=1, repeats=1, pairs=1, eval_steps=1,
                                 results=tmp_path / "r.json")
    assert [r["text_tokens"] for r in rows] == [512, 16]
    assert rows[0]["masked_psnr_vs_first"] == 100.0 and rows[0]["tryon_speedup"] == 1.0
    assert rows[1]["masked_psnr_vs_first"] < 100.0  # 16 tokens of other text embeddings move the output
    entry = json.loads((tmp_path / "r.json").read_text())[text_tokens_bench.NAME]
    assert entry["trained_text_tokens"] == 512 and "random weights" in entry["model"] and entry["stamp"]["date"]
    assert (tmp_path / f"{text_tokens_bench.NAME}.md").read_text().count("\n| ") == 3  # header + two rows
