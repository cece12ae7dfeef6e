"""Standard against slim loading of full-size FLUX.1 Fill + Redux (random weights), one GPU run.

Builds every component at the published sizes (``fullsize``: transformer, VAE, T5-XXL, CLIP-L, SigLIP + Redux
embedder) straight in the model dtype on the device, saves them in the real snapshot layout on local disk as
safetensors, then loads them in fresh processes, the stock way (``loading.load_standard``) and the slim way
(``configure.build_pipeline``), recording per component parameters, bytes, load time and peak memory
(``loading.load_component``, the same code the notebooks use). Page cache is dropped before each load where
the machine allows it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from .. import checkpoint, embeddings, loading, plots, provenance
from ..configure import build_pipeline
from ..timers import peak_memory_bytes
from . import fullsize


def compare_reads(path: Path, device: str) -> dict:
    """The saved FP8 file read onto ``device`` both ways, timed: safetensors' ``load_file`` (tensor by tensor out of
    the memory map) and ``bulk_read`` (chunked reads in flight through pinned buffers, what the cases use); the
    two must agree byte for byte."""
    from safetensors.torch import load_file

    from ..bulk_read import read_safetensors
    from ..oom import free_cached
    from ..timers import sync

    seconds, reads = {}, {}
    for name, read in (("load_file", lambda: load_file(str(path), device=device)),
                       ("bulk_read", lambda: read_safetensors(path, device)[0])):
        sync(device)
        begin = time.perf_counter()
        reads[name] = read()
        sync(device)
        seconds[name] = time.perf_counter() - begin
    a, b = reads.pop("load_file"), reads.pop("bulk_read")
    equal = a.keys() == b.keys() and all(torch.equal(a[k].reshape(-1).view(torch.uint8),
                                                     b[k].reshape(-1).view(torch.uint8)) for k in a)
    del a, b
    free_cached()  # both copies' GPU memory back before the cases' processes start
    size = path.stat().st_size
    return {"bytes": size, "equal": equal, **{f"{k}_s": v for k, v in seconds.items()},
            **{f"{k}_gb_per_s": size / v / 1e9 for k, v in seconds.items()}}


def build_snapshot(root: Path, s: fullsize.Shape) -> None:
    """Random models of shape ``s`` saved as ``root/FLUX.1-Fill-dev`` and ``root/FLUX.1-Redux-dev`` (safetensors)."""
    from diffusers import FluxFillPipeline, FluxPriorReduxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    tok_dir = Path(tempfile.mkdtemp())
    try:
        n_clip, n_t5 = checkpoint.build_tokenizers(tok_dir)
        # the encoders must cover the generated tokenizers' vocabularies and special-token ids
        s = replace(s, clip=dict(s.clip, vocab_size=max(n_clip, s.clip["vocab_size"]), bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1),
                    t5=dict(s.t5, vocab_size=max(n_t5, s.t5["vocab_size"]), pad_token_id=0, eos_token_id=1,
                            decoder_start_token_id=0))
        fill = fullsize.build_fill(s)
        t5, clip = fullsize.build_text_encoders(s)
        stock = FluxFillPipeline(scheduler=fill.scheduler, vae=fill.vae, transformer=fill.transformer,
                                 text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(tok_dir / "tokenizer"),
                                 text_encoder_2=t5, tokenizer_2=T5TokenizerFast.from_pretrained(tok_dir / "tokenizer_2"))
        stock.save_pretrained(root / checkpoint.FILL_SUBDIR, safe_serialization=True, max_shard_size="10GB")
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    del fill, stock, t5, clip
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    redux = fullsize.build_redux(s)
    FluxPriorReduxPipeline(image_encoder=redux.image_encoder, image_embedder=redux.image_embedder,
                           feature_extractor=redux.feature_extractor).save_pretrained(
        root / checkpoint.REDUX_SUBDIR, safe_serialization=True, max_shard_size="10GB")


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def load_report(root: Path, mode: str, device: str, dtype: str) -> dict:
    """Load the standard or the slim pipeline in this process; total seconds, peak memory, per-component rows."""
    start = time.perf_counter()
    if mode == "slim":
        pipe = build_pipeline(root, device=device, dtype=dtype, embeddings_file=str(root / "embeddings.safetensors"))
    else:
        pipe = loading.load_standard(root, getattr(torch, dtype), device)
    return {"mode": mode, "total_load_s": time.perf_counter() - start, "peak_memory_bytes": peak_memory_bytes(device),
            "components": pipe.load_report}


def table(results: dict) -> str:
    rows = []
    for mode, r in results["runs"].items():
        for c in r["components"]:
            rows.append({"pipeline": mode, "component": c["component"], "params (M)": c["params"] / 1e6,
                         "bytes (GB)": c["bytes"] / 1e9, "load (s)": c["load_s"], "peak (GB)": c["memory_bytes"] / 1e9})
        rows.append({"pipeline": mode, "component": "TOTAL (process)",
                     "params (M)": sum(c["params"] for c in r["components"]) / 1e6,
                     "bytes (GB)": sum(c["bytes"] for c in r["components"]) / 1e9, "load (s)": r["total_load_s"],
                     "peak (GB)": r["peak_memory_bytes"] / 1e9})
    st = results["stamp"]
    return (f"# Standard vs slim loading ({results['model']})\n\n{st['device']}, commit {st['commit']}, {st['date']}, "
            f"torch {st['torch']}, diffusers {st['diffusers']}\n\n" + plots.markdown_table(rows))


def run(out: str | Path, work: str | Path = "/tmp/bench_loading_work", tiny: bool = False,
        config: str | Path = fullsize.CONFIG_FILE) -> dict:
    """Build and save the snapshot in ``work``, build the embedding cache, then time both loaders in fresh
    processes; ``out`` gets ``bench_loading.json``, ``bench_loading.md`` and each load's report."""
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    s = fullsize.shape(tiny, config=config, device=device)
    root, out = Path(work), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_snapshot(root, s)
    build_s = time.perf_counter() - t0
    print(f"built and saved in {build_s:.0f}s", flush=True)
    t0 = time.perf_counter()  # the slim pipeline's one-time step: encode the prompt with T5 + CLIP and cache it
    embeddings.build_embeddings(root, s.torch_dtype, device, root / "embeddings.safetensors")
    results = {"stamp": provenance.stamp(device), "model": "full-size FLUX.1 Fill + Redux shapes, random weights"
               if not tiny else "tiny shapes (CPU smoke test)", "build_and_save_s": build_s,
               "embedding_cache_build_s": time.perf_counter() - t0, "runs": {}}
    for mode in ("standard", "slim"):
        dropped = drop_page_cache()
        rep = out / f"load_{mode}.json"
        subprocess.run([sys.executable, "-m", __name__, str(root), mode, device, s.dtype, str(rep)], check=True,
                       cwd=provenance.REPO_ROOT)
        r = results["runs"][mode] = {**json.loads(rep.read_text()), "page_cache_dropped": dropped}
        print(f"{mode}: {r['total_load_s']:.1f}s, peak {r['peak_memory_bytes'] / 1e9:.2f} GB, dropped cache {dropped}",
              flush=True)
    md = table(results)
    (out / "bench_loading.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "bench_loading.md").write_text(md)
    print(md)
    return results


if __name__ == "__main__":  # a fresh process of ``run``: root, mode, device, dtype, report file
    _root, _mode, _device, _dtype, _out = sys.argv[1:6]
    Path(_out).write_text(json.dumps(load_report(Path(_root), _mode, _device, _dtype), default=str))
