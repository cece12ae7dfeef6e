"""Slim loader: loads only what inference needs, safetensors only; the standard loader beside it."""

from __future__ import annotations

import shutil

import pytest
import torch

from tryon_lab import checkpoint, embeddings, loading
from tryon_lab.experiments import slim_report
from tryon_lab.experiments.assets import convert_to_safetensors


def test_slim_loads_nothing_else(slim):
    fill = slim.fill
    assert fill.text_encoder is None and fill.text_encoder_2 is None
    assert fill.tokenizer is None and fill.tokenizer_2 is None
    assert [r["component"] for r in slim.load_report][:6] == list(loading.SLIM_COMPONENTS)
    assert slim.prompt_embeds.shape[-1] == slim.transformer.config.joint_attention_dim


def test_slim_needs_no_text_encoders_on_disk(tmp_path, model_dir):
    """A snapshot without T5/CLIP loads, given the embedding cache: proof the slim path never reads them."""
    copy = tmp_path / "no_text"
    shutil.copytree(model_dir, copy)
    emb = embeddings.ensure_embeddings(model_dir, torch.float32)
    for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.rmtree(copy / checkpoint.FILL_SUBDIR / part)
    pipe = loading.load_slim(copy, torch.float32, "cpu", embeddings_file=emb)
    assert pipe.transformer is not None
    with pytest.raises(loading.ModelFolderError, match="text_encoder"):
        loading.load_standard(copy, torch.float32, "cpu")


def _pickled_copy(tmp_path, model_dir):
    """A copy of the checkpoint whose VAE is stored as a pickle ``.bin`` only; returns (copy, vae folder)."""
    from safetensors.torch import load_file

    copy = tmp_path / "pickled"
    shutil.copytree(model_dir, copy)
    vae_dir = copy / checkpoint.FILL_SUBDIR / "vae"
    st = next(vae_dir.glob("*.safetensors"))
    torch.save(load_file(str(st)), vae_dir / "diffusion_pytorch_model.bin")
    st.unlink()
    return copy, vae_dir


def test_pickle_weights_are_refused(tmp_path, model_dir):
    copy, _ = _pickled_copy(tmp_path, model_dir)
    with pytest.raises(loading.PickleCheckpointError, match="convert_to_safetensors"):
        loading.load_slim(copy, torch.float32, "cpu")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(loading.ModelFolderError, match="FLUX.1-Fill-dev"):
        loading.load_slim(tmp_path, torch.float32, "cpu")


def test_siglip_read_on_a_worker_before_the_imports_loads_the_same_model(slim, model_dir):
    """The slim loader starts SigLIP's read beside the imports and builds the model from those tensors: the same
    weights, buffers and config as transformers loading the folder itself."""
    row = next(r for r in slim.load_report if r["component"] == "image_encoder")
    assert row["read_thread"].startswith("siglip-read") and row["read_s"] > 0
    own, _ = loading.load_component("image_encoder", model_dir, slim.dtype, "cpu", slim=True)
    a, b = own.state_dict(), slim.redux.image_encoder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert own.config.to_dict() == slim.redux.image_encoder.config.to_dict() and not slim.redux.image_encoder.training


def test_standard_loads_everything(model_dir):
    std = loading.load_standard(model_dir, torch.float32, "cpu")
    assert std.fill.text_encoder is not None and std.redux.text_encoder_2 is not None
    assert len(std.load_report) == len(loading.COMPONENTS)


def test_pickle_vs_safetensors_reports_both(model_dir):
    row = slim_report.pickle_vs_safetensors(model_dir, "vae")
    assert row["safetensors_s"] > 0 and row["pickle_s"] > 0 and row["bytes"] > 0


def test_resolve_device_dtype():
    assert loading.resolve_device_dtype("cpu", "auto") == ("cpu", torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        loading.resolve_device_dtype("cpu", "int8")


def test_convert_makes_a_refused_folder_loadable(tmp_path, model_dir):
    copy, vae_dir = _pickled_copy(tmp_path, model_dir)
    convert_to_safetensors(vae_dir)
    assert loading.load_slim(copy, torch.float32, "cpu").fill.vae is not None


@pytest.mark.parametrize("loader", [loading.load_slim, loading.load_standard])
def test_a_missing_model_folder_fails_first_naming_the_path_and_the_fix(tmp_path, monkeypatch, loader):
    def never(*a, **k):
        raise AssertionError("a component was loaded from a folder that does not exist")

    monkeypatch.setattr(loading, "load_component", never)
    missing = tmp_path / "no" / "such" / "models"
    with pytest.raises(loading.ModelFolderError, match=f"model folder {missing} does not exist; .*'random'.*"
                                                        "FLUX.1-Fill-dev/ and FLUX.1-Redux-dev/.*TRYON_LAB_MODELS"):
        loader(missing, torch.float32, "cpu")
    (tmp_path / "file").write_text("")
    with pytest.raises(loading.ModelFolderError, match="is a file, not a folder"):
        loader(str(tmp_path / "file"), torch.float32, "cpu")
    (tmp_path / checkpoint.FILL_SUBDIR).mkdir()
    with pytest.raises(loading.ModelFolderError, match=f"has no {checkpoint.REDUX_SUBDIR}/ inside"):
        loader(tmp_path, torch.float32, "cpu")


def test_resolve_and_describe_refuse_missing_folders(tmp_path, monkeypatch, model_dir):
    missing = tmp_path / "nope"
    with pytest.raises(checkpoint.ModelFolderError, match=f"{missing} does not exist"):
        checkpoint.resolve_model_dir(missing)
    monkeypatch.setenv("TRYON_LAB_MODELS", str(missing))
    with pytest.raises(checkpoint.ModelFolderError, match=f"{missing} \\(from TRYON_LAB_MODELS\\) does not exist"):
        checkpoint.resolve_model_dir("default")
    monkeypatch.setattr(checkpoint, "TRAINED_DIR", missing)
    with pytest.raises(checkpoint.ModelFolderError, match="train_default_model.py"):
        checkpoint.resolve_model_dir("trained")
    for folder in (missing, tmp_path):  # missing, and empty: never a line with the fingerprint of nothing
        with pytest.raises(checkpoint.ModelFolderError, match=str(folder)):
            checkpoint.describe_model(folder)
    assert checkpoint.resolve_model_dir(model_dir) == model_dir
    assert "[fingerprint " in checkpoint.describe_model(model_dir)


def _never(*a, **k):
    raise AssertionError("a component was loaded before the folder was checked")


def test_folder_without_text_encoders_fails_before_loading_then_shape_only_or_own_tensors_load(
        tmp_path, model_dir, monkeypatch, slim):
    from safetensors.torch import save_file

    from tryon_lab.experiments.assets import compute_embeddings

    copy = tmp_path / "other_shape"
    shutil.copytree(model_dir, copy)
    for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "model_index.json"):
        target = copy / checkpoint.FILL_SUBDIR / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    monkeypatch.setattr(loading, "load_component", _never)
    with pytest.raises(embeddings.NoTextEncodersError, match="no text encoders.*--from-tensors FILE.*--shape-only"):
        loading.load_slim(copy, torch.float32, "cpu")
    with pytest.raises(embeddings.NoTextEncodersError, match="--from-tensors"):  # the script's own path, no OSError
        compute_embeddings(str(copy), "float32", "cpu")
    monkeypatch.undo()

    path = compute_embeddings(str(copy), "float32", "cpu", shape_only=True)
    assert embeddings.read_metadata(path)["kind"] == "shape-only"
    pipe = loading.load_slim(copy, torch.float32, "cpu")
    assert any("SHAPE-ONLY" in n for n in pipe.notes) and "SHAPE-ONLY" in pipe.description
    assert pipe.load_report[-1]["notes"] == pipe.notes

    mine = tmp_path / "mine.safetensors"
    save_file({"prompt_embeds": slim.prompt_embeds, "pooled_prompt_embeds": slim.pooled_prompt_embeds}, str(mine))
    own = compute_embeddings(str(copy), "float32", "cpu", out=tmp_path / "own.safetensors", from_tensors=mine)
    pipe = loading.load_slim(copy, torch.float32, "cpu", embeddings_file=own)
    assert torch.equal(pipe.prompt_embeds, slim.prompt_embeds) and "SHAPE-ONLY" not in pipe.description
    assert "user's own encoder outputs" in pipe.notes[0]


def test_redux_width_that_does_not_fit_the_transformer_is_refused_from_the_configs(tmp_path, model_dir, monkeypatch):
    import json

    copy = tmp_path / "mixed"
    shutil.copytree(model_dir, copy)
    cfg_path = copy / checkpoint.REDUX_SUBDIR / "image_embedder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "txt_in_features": cfg["txt_in_features"] * 2}))
    monkeypatch.setattr(loading, "load_component", _never)
    with pytest.raises(loading.ModelMismatchError, match=r"image_embedder outputs tokens \d+ wide.*joint_attention_dim"):
        loading.load_slim(copy, torch.float32, "cpu")
    cfg_path.write_text(json.dumps({**cfg, "redux_dim": cfg["redux_dim"] + 1}))
    with pytest.raises(loading.ModelMismatchError, match=r"image_encoder outputs features \d+ wide.*\(redux_dim\)"):
        loading.load_slim(copy, torch.float32, "cpu")


def test_truncated_or_corrupt_shard_is_named_before_loading(tmp_path, model_dir, monkeypatch):
    copy = tmp_path / "broken"
    shutil.copytree(model_dir, copy)
    shard = next((copy / checkpoint.FILL_SUBDIR / "transformer").glob("*.safetensors"))
    data = shard.read_bytes()
    monkeypatch.setattr(loading, "load_component", _never)
    for loader in (loading.load_slim, loading.load_standard):
        shard.write_bytes(data[:-100])
        with pytest.raises(loading.CorruptCheckpointError, match=f"{shard.name} is truncated.*100 missing.*again"):
            loader(copy, torch.float32, "cpu")
    shard.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(loading.CorruptCheckpointError, match=f"{shard.name} is corrupt.*header"):
        loading.load_slim(copy, torch.float32, "cpu")
    shard.write_bytes(data[:20])
    with pytest.raises(loading.CorruptCheckpointError, match=f"{shard.name} is truncated or corrupt"):
        loading.load_slim(copy, torch.float32, "cpu")


def test_embeddings_without_encoder_metadata_are_noted_in_the_load_report(tmp_path, model_dir, slim):
    path = embeddings.save_embeddings(tmp_path / "nometa.safetensors", slim.prompt_embeds, slim.pooled_prompt_embeds,
                                      "p", encoder_fp=None)
    pipe = loading.load_slim(model_dir, torch.float32, "cpu", embeddings_file=path)
    assert "no encoder metadata" in pipe.notes[0] and pipe.load_report[-1]["notes"] == pipe.notes
    assert not slim.notes and "notes" not in slim.load_report[-1]
