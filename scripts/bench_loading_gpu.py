"""Standard against slim loading of full-size FLUX.1 Fill + Redux (random weights), one GPU run.

Builds every component at the published sizes (``benchmarks/flux_fill_config.json``; T5-XXL and
CLIP-L at their published shapes) in bf16, saves them in the real snapshot layout on local disk as
safetensors, then loads them in fresh processes, the stock way and the slim way, recording per
component parameters, bytes, load time and CUDA peak memory (``loading.load_component``, the same
code the notebooks use). Page cache is dropped before each load where the machine allows it.

    python scripts/bench_loading_gpu.py --out $OUT          # on the GPU machine
    python scripts/bench_loading_gpu.py --tiny --out /tmp/x  # same path on a CPU, small shapes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tryon_lab import bench, checkpoint, embeddings, loading  # noqa: E402

T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768)


def build(root: Path, cfg: dict, tiny: bool, device: str) -> None:
    """Random full-size models straight in bf16 on the device, saved in the diffusers layout."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        T5Config,
        T5EncoderModel,
    )

    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_") and k != "image_tokens"}  # noqa: E731
    tcfg, vcfg, scfg = strip(cfg["transformer"]), strip(cfg["vae"]), strip(cfg["redux"]["image_encoder"])
    t5, clip = dict(T5_XXL), dict(CLIP_L)
    if tiny:
        tcfg.update(num_layers=1, num_single_layers=1, num_attention_heads=2, joint_attention_dim=256)
        t5.update(d_model=256, d_ff=512, num_layers=1, num_heads=4)
        clip.update(num_hidden_layers=1)
        scfg.update(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2)
        vcfg.update(block_out_channels=[32, 32, 32, 32])
    tok_dir = root / "_tok"
    n_clip, n_t5 = checkpoint.build_tokenizers(tok_dir)
    clip.update(vocab_size=max(n_clip, 49408), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    t5.update(vocab_size=max(n_t5, t5["vocab_size"]), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: fp32-then-cast would double the peak
    fill, redux = root / checkpoint.FILL_SUBDIR, root / checkpoint.REDUX_SUBDIR
    with torch.device(device):
        parts = {
            (fill, "transformer"): FluxTransformer2DModel(**tcfg),
            (fill, "vae"): AutoencoderKL(**vcfg),
            (fill, "text_encoder"): CLIPTextModel(CLIPTextConfig(**clip)),
            (fill, "text_encoder_2"): T5EncoderModel(T5Config(**t5)),
            (redux, "image_encoder"): SiglipVisionModel(SiglipVisionConfig(**scfg)),
            (redux, "image_embedder"): ReduxImageEncoder(redux_dim=scfg["hidden_size"],
                                                         txt_in_features=tcfg["joint_attention_dim"]),
        }
    torch.set_default_dtype(torch.float32)
    for (sub, name), model in parts.items():
        model.save_pretrained(sub / name, safe_serialization=True, max_shard_size="10GB")
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    FlowMatchEulerDiscreteScheduler(**strip(cfg["scheduler"])).save_pretrained(fill / "scheduler")
    import shutil

    from transformers import SiglipImageProcessor

    for t in ("tokenizer", "tokenizer_2"):
        shutil.copytree(tok_dir / t, fill / t)
    SiglipImageProcessor(size={"height": scfg["image_size"], "width": scfg["image_size"]}).save_pretrained(
        redux / "feature_extractor")
    index = {"_class_name": "FluxFillPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (fill / "model_index.json").write_text(json.dumps(index))
    (redux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPriorReduxPipeline"}))


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def child(root: Path, mode: str, device: str, dtype: torch.dtype, out: Path) -> None:
    """One fresh process: load the standard or the slim pipeline, write its report."""
    start = time.perf_counter()
    if mode == "slim":
        pipe = loading.load_slim(root, dtype, device, embeddings_file=root / "embeddings.safetensors")
    else:
        pipe = loading.load_standard(root, dtype, device)
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else bench.peak_rss_bytes()
    out.write_text(json.dumps({"mode": mode, "total_load_s": total, "peak_memory_bytes": peak,
                               "components": pipe.load_report}, default=str))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_loading")
    ap.add_argument("--work", default="/tmp/bench_loading_work")
    ap.add_argument("--config", default=str(REPO / "benchmarks" / "flux_fill_config.json"))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    root, out = Path(args.work), Path(args.out)
    if args.child:
        child(root, args.child[0], device, dtype, Path(args.child[1]))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build(root, json.loads(Path(args.config).read_text()), args.tiny, device)
    build_s = time.perf_counter() - t0
    print(f"built and saved in {build_s:.0f}s", flush=True)
    # the slim pipeline's one-time step: encode the prompt with T5 + CLIP and cache it
    t0 = time.perf_counter()
    embeddings.build_embeddings(root, dtype, device, root / "embeddings.safetensors")
    emb_s = time.perf_counter() - t0
    results = {"stamp": bench.stamp(device), "model": "full-size FLUX.1 Fill + Redux shapes, random weights"
               if not args.tiny else "tiny shapes (CPU smoke test)", "build_and_save_s": build_s,
               "embedding_cache_build_s": emb_s, "runs": {}}
    for mode in ("standard", "slim"):
        dropped = drop_page_cache()
        rep = out / f"load_{mode}.json"
        subprocess.run([sys.executable, __file__, "--work", str(root), "--child", mode, str(rep)], check=True)
        results["runs"][mode] = {**json.loads(rep.read_text()), "page_cache_dropped": dropped}
        r = results["runs"][mode]
        print(f"{mode}: {r['total_load_s']:.1f}s, peak {r['peak_memory_bytes'] / 1e9:.2f} GB, dropped cache {dropped}",
              flush=True)
    rows = []
    for mode, r in results["runs"].items():
        for c in r["components"]:
            rows.append({"pipeline": mode, "component": c["component"], "params (M)": c["params"] / 1e6,
                         "bytes (GB)": c["bytes"] / 1e9, "load (s)": c["load_s"], "peak (GB)": c["memory_bytes"] / 1e9})
        rows.append({"pipeline": mode, "component": "TOTAL (process)", "params (M)": sum(c["params"] for c in r["components"]) / 1e6,
                     "bytes (GB)": sum(c["bytes"] for c in r["components"]) / 1e9, "load (s)": r["total_load_s"],
                     "peak (GB)": r["peak_memory_bytes"] / 1e9})
    st = results["stamp"]
    table = (f"# Standard vs slim loading ({results['model']})\n\n{st['device']}, commit {st['commit']}, {st['date']}, "
             f"torch {st['torch']}, diffusers {st['diffusers']}\n\n" + bench.markdown_table(rows))
    (out / "bench_loading.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "bench_loading.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
