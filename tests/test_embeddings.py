"""The text-embedding cache: round trip and the errors when it does not fit the model."""

from __future__ import annotations

import pytest
import torch

from tryon_lab import embeddings


@pytest.fixture(scope="module")
def tcfg(slim):
    return dict(slim.transformer.config)


def test_round_trip(tmp_path, model_dir, tcfg):
    path = embeddings.build_embeddings(model_dir, torch.float32, path=tmp_path / "e.safetensors")
    pe, pooled, meta = embeddings.load_embeddings(path, tcfg, torch.float32)
    live, live_pooled = embeddings.encode_prompt(model_dir, dtype=torch.float32)
    assert torch.equal(pe, live) and torch.equal(pooled, live_pooled)
    assert meta["dtype"] == "float32" and meta["encoder_fingerprint"] == embeddings.encoder_fingerprint(model_dir)
    assert "clothing" in meta["prompt"]


def test_cache_per_device_type(tmp_path, model_dir, monkeypatch):
    """A GPU's encoders round unlike the CPU's: their caches are kept apart, except for a folder without encoders
    (its tensors came from elsewhere); the built file names its device."""
    from tryon_lab.checkpoint import TRAINED_DIR

    cpu, gpu = (embeddings.embeddings_path(model_dir, torch.bfloat16, d) for d in ("cpu", "cuda:1"))
    assert cpu != gpu and gpu.name.endswith("-bfloat16.safetensors") and "-cuda" in gpu.name
    assert embeddings.embeddings_path(TRAINED_DIR, torch.bfloat16, "cuda").name == "toy-tryon-bfloat16-cuda.safetensors"
    assert embeddings.embeddings_path(TRAINED_DIR, torch.bfloat16).name == "toy-tryon-bfloat16.safetensors"
    monkeypatch.setattr(embeddings, "has_text_encoders", lambda _: False)
    assert embeddings.embeddings_path(model_dir, torch.float32, "cuda") == embeddings.embeddings_path(model_dir,
                                                                                                   torch.float32)
    monkeypatch.undo()
    path = embeddings.build_embeddings(model_dir, torch.float32, path=tmp_path / "e.safetensors")
    assert embeddings.read_metadata(path)["device"] == "cpu" and not list(tmp_path.glob("*.tmp"))


def _save(tmp_path, pe, pooled, fp="x"):
    return embeddings.save_embeddings(tmp_path / "bad.safetensors", pe, pooled, "p", fp)


def test_wrong_width_is_refused(tmp_path, tcfg):
    path = _save(tmp_path, torch.zeros(1, 8, tcfg["joint_attention_dim"] + 1), torch.zeros(1, tcfg["pooled_projection_dim"]))
    with pytest.raises(embeddings.EmbeddingMismatchError, match="joint_attention_dim"):
        embeddings.load_embeddings(path, tcfg, torch.float32)
    path = _save(tmp_path, torch.zeros(1, 8, tcfg["joint_attention_dim"]), torch.zeros(1, 3))
    with pytest.raises(embeddings.EmbeddingMismatchError, match="pooled_projection_dim"):
        embeddings.load_embeddings(path, tcfg, torch.float32)


def test_wrong_dtype_is_refused(tmp_path, tcfg):
    path = _save(tmp_path, torch.zeros(1, 8, tcfg["joint_attention_dim"], dtype=torch.bfloat16),
                 torch.zeros(1, tcfg["pooled_projection_dim"], dtype=torch.bfloat16))
    with pytest.raises(embeddings.EmbeddingMismatchError, match="bfloat16.*float32"):
        embeddings.load_embeddings(path, tcfg, torch.float32)


def test_other_encoders_are_refused(tmp_path, tcfg):
    path = _save(tmp_path, torch.zeros(1, 8, tcfg["joint_attention_dim"]), torch.zeros(1, tcfg["pooled_projection_dim"]),
                 fp="0" * 64)
    with pytest.raises(embeddings.EmbeddingMismatchError, match="text encoders"):
        embeddings.load_embeddings(path, tcfg, torch.float32, encoder_fp="1" * 64)


def test_missing_and_pickle_files(tmp_path, tcfg):
    with pytest.raises(FileNotFoundError, match="compute_embeddings"):
        embeddings.load_embeddings(tmp_path / "nope.safetensors", tcfg, torch.float32)
    pkl = tmp_path / "e.pt"
    torch.save({}, pkl)
    with pytest.raises(embeddings.EmbeddingMismatchError, match="pickle"):
        embeddings.load_embeddings(pkl, tcfg, torch.float32)


def test_batch_of_two_is_refused_at_load(tmp_path, tcfg):
    path = _save(tmp_path, torch.zeros(2, 8, tcfg["joint_attention_dim"]), torch.zeros(2, tcfg["pooled_projection_dim"]))
    with pytest.raises(embeddings.EmbeddingMismatchError, match=r"batch of 2 .*prompt_embeds\[:1\]"):
        embeddings.load_embeddings(path, tcfg, torch.float32)


def test_save_without_encoder_fingerprint_is_noted_not_a_type_error(tmp_path, tcfg):
    path = _save(tmp_path, torch.zeros(1, 8, tcfg["joint_attention_dim"]), torch.zeros(1, tcfg["pooled_projection_dim"]),
                 fp=None)
    _, _, meta = embeddings.load_embeddings(path, tcfg, torch.float32, encoder_fp="1" * 64)
    assert "encoder_fingerprint" not in meta
    assert "no encoder metadata" in embeddings.metadata_notes(path, meta)[0]
    assert "compute_embeddings.py" in embeddings.metadata_notes(path, meta)[0]


def test_from_tensors_checks_shapes_and_records_the_cast(tmp_path, model_dir, tcfg):
    from safetensors.torch import save_file

    src = tmp_path / "mine.safetensors"
    save_file({"prompt_embeds": torch.ones(1, 8, tcfg["joint_attention_dim"], dtype=torch.float16),
               "pooled_prompt_embeds": torch.ones(1, tcfg["pooled_projection_dim"], dtype=torch.float16)}, str(src))
    out = embeddings.embeddings_from_tensors(model_dir, src, torch.float32, tmp_path / "out.safetensors")
    pe, _, meta = embeddings.load_embeddings(out, tcfg, torch.float32)
    assert pe.dtype == torch.float32 and meta["kind"] == "user-tensors" and meta["cast_from"] == "float16"
    assert "user's own encoder outputs" in embeddings.metadata_notes(out, meta)[0]
    save_file({"prompt_embeds": torch.ones(1, 8, 3), "pooled_prompt_embeds": torch.ones(1, 3)}, str(src))
    with pytest.raises(embeddings.EmbeddingMismatchError, match="joint_attention_dim"):
        embeddings.embeddings_from_tensors(model_dir, src, torch.float32, tmp_path / "out2.safetensors")


def test_a_model_padded_to_fewer_text_tokens_caches_that_many_and_slim_still_equals_stock():
    """``SmallModelConfig(text_tokens=16)``: its caches hold 16 T5 tokens, stock encodes live at that length, and the
    slim try-on equals the stock one bit for bit; a default model's config (512) keeps the key it had before."""
    from dataclasses import asdict

    from tests.conftest import make_request_images
    from tryon_lab import checkpoint, loading, pipeline

    short = checkpoint.random_checkpoint(checkpoint.SmallModelConfig(text_tokens=16))
    assert checkpoint.text_tokens(short) == 16 and checkpoint.text_tokens(checkpoint.random_checkpoint()) == 512
    assert "text_tokens" not in checkpoint._config_dict(checkpoint.SmallModelConfig())
    assert "text_tokens" in asdict(checkpoint.SmallModelConfig())
    slim = loading.load_slim(short, torch.float32, "cpu")
    assert slim.prompt_embeds.shape[1] == 16
    std = loading.load_standard(short, torch.float32, "cpu")
    person, garment, mask = make_request_images()
    fast = pipeline.TryOnSettings(steps=2, progress=False)
    a = pipeline.tryon(slim, pipeline.TryOnRequest(person, garment, mask, seed=1), fast)
    b = pipeline.tryon_standard(std, pipeline.TryOnRequest(person, garment, mask, seed=1), fast)
    assert torch.equal(a.latents, b.latents)


def test_training_text_is_checked_against_the_models_length(tmp_path):
    from tryon_lab.experiments import default_model

    path = tmp_path / "text.safetensors"
    pe, pooled = default_model.load_text(path, 16)  # made on first use, at that length
    assert path.exists() and pe.shape[1] == 16 and pooled.ndim == 2
    with pytest.raises(ValueError, match="holds 16 text tokens but the model is padded to 32 .*--embeddings"):
        default_model.load_text(path, 32)
    assert default_model.training_embeddings(512) == default_model.TRAINING_EMBEDDINGS
    assert default_model.training_embeddings(32).name == "training-text-32tok-float32.safetensors"
