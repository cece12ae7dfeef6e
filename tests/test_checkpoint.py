"""The embedded default: deterministic, in the real diffusers layout, loadable by stock diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tryon_lab import checkpoint, provenance


def test_factory_is_deterministic(tmp_path, model_dir):
    again = checkpoint.random_checkpoint(root=tmp_path / "again")
    assert provenance.fingerprint(again) == provenance.fingerprint(model_dir)
    other = checkpoint.random_checkpoint(checkpoint.SmallModelConfig(seed=1), root=tmp_path / "other")
    assert provenance.fingerprint(other) != provenance.fingerprint(model_dir)


def test_layout_matches_the_public_snapshots(model_dir):
    fill, redux = model_dir / checkpoint.FILL_SUBDIR, model_dir / checkpoint.REDUX_SUBDIR
    index = json.loads((fill / "model_index.json").read_text())
    assert index["_class_name"] == "FluxFillPipeline"
    for part in ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert part in index and (fill / part).is_dir()
    assert json.loads((redux / "model_index.json").read_text())["_class_name"] == "FluxPriorReduxPipeline"
    weights = list(model_dir.rglob("*.safetensors"))
    assert weights and not [p for p in model_dir.rglob("*") if p.suffix in checkpoint.PICKLE_SUFFIXES]
    # every weight file stays small (the transformer is sharded like the real one)
    assert max(p.stat().st_size for p in weights) < 16 * 2**20
    cfg = json.loads((fill / "transformer" / "config.json").read_text())
    vae = json.loads((fill / "vae" / "config.json").read_text())
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    assert cfg["in_channels"] == 4 * vae["latent_channels"] * 2 + 4 * scale**2  # Fill channels follow the VAE


def test_stock_diffusers_loads_every_part(model_dir):
    from diffusers import FluxFillPipeline, FluxPriorReduxPipeline

    fill = FluxFillPipeline.from_pretrained(model_dir / checkpoint.FILL_SUBDIR, local_files_only=True)
    redux = FluxPriorReduxPipeline.from_pretrained(model_dir / checkpoint.REDUX_SUBDIR, local_files_only=True)
    assert fill.text_encoder is not None and fill.tokenizer_2 is not None and redux.image_embedder is not None
    ids = fill.tokenizer_2(checkpoint.TRYON_PROMPT).input_ids
    assert fill.tokenizer_2.unk_token_id not in ids  # the local tokenizer covers the task prompt
    with torch.no_grad():
        out = fill.text_encoder_2(torch.tensor([ids])).last_hidden_state
    assert out.shape[-1] == fill.transformer.config.joint_attention_dim


def test_fingerprint_changes_with_weights(tmp_path, model_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert provenance.fingerprint(copy) == provenance.fingerprint(model_dir)
    vae = next((copy / checkpoint.FILL_SUBDIR / "vae").glob("*.safetensors"))
    data = bytearray(vae.read_bytes())
    data[-1] ^= 0xFF
    vae.write_bytes(bytes(data))
    assert provenance.fingerprint(copy) != provenance.fingerprint(model_dir)


def test_resolve_model_dir(monkeypatch, tmp_path, model_dir):
    monkeypatch.setenv("TRYON_LAB_MODELS", str(tmp_path))
    assert checkpoint.resolve_model_dir("default") == tmp_path
    assert checkpoint.resolve_model_dir("random") == model_dir
    assert "random weights" in checkpoint.describe_model(model_dir)


def test_a_trained_model_outside_the_checkout_is_not_called_random(tmp_path, model_dir):
    """A model the trainer assembled elsewhere carries its card: its line says trained, and not the committed one."""
    import shutil

    copy = tmp_path / "assembled"
    shutil.copytree(model_dir, copy)
    (copy / provenance.CARD_FILE).write_text('{"trained_on": "cpu"}')
    line = checkpoint.describe_model(copy)
    assert line.startswith("trained toy try-on model (not committed) at ") and "random" not in line


def test_committed_results_name_no_machine_folders():
    """Results files that are committed say where a model is relative to the checkout, and ~ for the home folder."""
    line = checkpoint.describe_model(checkpoint.TRAINED_DIR)
    assert str(provenance.REPO_ROOT) in line  # the live line names the folder as it is here
    shown = provenance.portable(line)
    assert "at checkpoints/toy-tryon [fingerprint " in shown and str(provenance.REPO_ROOT) not in shown
    assert provenance.portable(f"{Path.home()}/.cache/tryon_lab/x") == "~/.cache/tryon_lab/x"


def test_candidate_shapes_are_sized_and_timed_against_the_committed_one(tmp_path):
    """``experiments.model_sizes`` (scripts/size_default_model.py): each candidate built with random weights from
    the committed shape; its bf16 bytes follow from its parameters, and its try-on is timed beside the first."""
    from tryon_lab.experiments import model_sizes

    rows = model_sizes.run({model_sizes.COMMITTED: {}, "wider": {"num_attention_heads": 6, "text_tokens": 32}},
                           height=64, steps=1, repeats=1, threads=1, results=tmp_path / "r.json")
    first, wider = json.loads((tmp_path / "r.json").read_text())["default_model_sizes_cpu"]["candidates"].values()
    assert first["vs_first"] == 1.0 and wider["vs_first"] == pytest.approx(wider["tryon_s"] / first["tryon_s"])
    assert wider["params"]["transformer"] > first["params"]["transformer"]
    assert wider["params"]["vae"] == first["params"]["vae"]  # only the transformer's width changed
    assert first["checkpoint_mb"] == pytest.approx(2 * sum(first["params"].values()) / 1e6)
    assert first["tokens"] - wider["tokens"] == 512 - 32  # the same image tokens, the prompt padded shorter
    assert [r["shape"] for r in rows] == [model_sizes.COMMITTED, "wider"]
    assert (tmp_path / "default_model_sizes_cpu.md").read_text().count("\n|") == 4  # header, rule, two rows
