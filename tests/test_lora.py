"""LoRA adapters: the file format, hotswap without recompiling, and the rank error (tiny transformer, CPU)."""

from __future__ import annotations

import pytest
import torch

from tryon_lab import compiling, lora
from tryon_lab.checkpoint import SmallModelConfig, transformer_config
from tryon_lab.metrics import rel_l2

TINY = SmallModelConfig(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=32,
                        axes_dims_rope=(8, 12, 12), joint_attention_dim=64, pooled_projection_dim=32)


def tiny_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**transformer_config(TINY)).eval().requires_grad_(False)


def tiny_inputs(t, n: int = 16, txt: int = 8) -> dict:
    g, c = torch.Generator().manual_seed(1), t.config
    return dict(hidden_states=torch.randn(1, n, c.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, txt, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([30.0]), img_ids=torch.zeros(n, 3),
                txt_ids=torch.zeros(txt, 3), return_dict=False)


def tiny_fill(seed: int = 0):
    """A FluxFillPipeline holding only a tiny transformer: all that LoRA loading needs."""
    from diffusers import FluxFillPipeline

    return FluxFillPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=tiny_transformer(seed=seed))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    t = tiny_transformer()
    return {r: lora.make_lora(t, r, seed=r, path=root / f"rank{r}") for r in (2, 4, 8)}


def test_make_lora_writes_diffusers_flux_format(adapters):
    from safetensors.torch import load_file

    state = load_file(adapters[4] / lora.WEIGHT_NAME)
    assert all(k.startswith("transformer.") for k in state)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in state
    assert "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight" in state
    assert lora.lora_rank(adapters[4]) == 4 and lora.lora_rank(adapters[8]) == 8
    assert all(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # non-zero B: it changes outputs


def test_lora_changes_output_and_unload_restores(adapters):
    pipe = tiny_fill()
    x = tiny_inputs(pipe.transformer)
    with torch.no_grad():
        base = pipe.transformer(**x)[0]
        lora.load_lora(pipe, adapters[4], "a")
        with_lora = pipe.transformer(**x)[0]
        pipe.unload_lora_weights()
        again = pipe.transformer(**x)[0]
    assert rel_l2(with_lora, base) > 1e-3
    assert torch.equal(again, base)


def test_hotswap_on_compiled_model_does_not_recompile(adapters):
    compiling.reset_compiled()
    pipe, eager = tiny_fill(), tiny_fill()
    x = tiny_inputs(pipe.transformer)
    state = lora.LoraState()
    lora.prepare_hotswap(pipe, 8, state)
    lora.load_lora(pipe, adapters[4], "style", state=state)
    compiling.compile_transformer(pipe.transformer, "regional", backend="aot_eager")
    with torch.no_grad():
        with compiling.count_recompiles() as first:
            out_a = pipe.transformer(**x)[0]
        swap = lora.load_lora(pipe, adapters[8], "style", hotswap=True, state=state)  # rank 4 -> rank 8, same compiled graphs
        with compiling.count_recompiles(strict=True) as after:
            out_b = pipe.transformer(**x)[0]
        lora.load_lora(eager, adapters[8], "style")
        ref_b = eager.transformer(**x)[0]
    assert first["graphs"] > 0 and after["graphs"] == 0
    assert swap["rank"] == 8 and swap["seconds"] < 5
    assert rel_l2(out_b, out_a) > 1e-3  # the swap took effect ...
    assert rel_l2(out_b, ref_b) < 1e-5  # ... and equals loading that adapter directly


def test_rank_above_hotswap_target_is_our_clear_error(adapters):
    pipe, state = tiny_fill(), lora.LoraState()
    lora.prepare_hotswap(pipe, 4, state)
    lora.load_lora(pipe, adapters[2], "style", state=state)
    assert state.loaded == {"style": str(adapters[2])}
    with pytest.raises(lora.LoraRankError, match="rank 8, above the hotswap target rank 4.*prepare_hotswap"):
        lora.load_lora(pipe, adapters[8], "style", hotswap=True, state=state)
    other = lora.LoraState()
    lora.prepare_hotswap(tiny := tiny_fill(), 4, other)
    with pytest.raises(lora.LoraRankError):
        lora.load_lora(tiny, adapters[8], "first", state=other)


def test_make_lora_refuses_a_transformer_with_adapters(adapters, tmp_path):
    pipe = tiny_fill()
    lora.load_lora(pipe, adapters[2], "a")
    with pytest.raises(ValueError, match="without adapters"):
        lora.make_lora(pipe.transformer, 2, 0, tmp_path / "x")


def test_the_committed_logo_adapter_belongs_to_the_committed_model_and_changes_the_pass():
    """``checkpoints/toy-tryon-logo-lora``: found beside the trained model (its card names that model's weights), and
    it changes what the logo pass draws."""
    from tryon_lab import checkpoint, configure, logos, samples
    from tryon_lab.pipeline import TryOnSettings

    adapter = lora.adapter_for(checkpoint.TRAINED_DIR, "logo")
    assert adapter is not None and lora.lora_rank(adapter) == 16
    pipe = configure.build_pipeline(checkpoint.TRAINED_DIR, device="cpu", dtype="float32")
    s = samples.load_sample("s001")
    known = logos.known_matches(s.garment_logo_boxes, s.target_logo_boxes)
    settings = TryOnSettings(steps=2, progress=False)
    plain = logos.logo_pass(pipe, s.target, s.garment, known, settings, seed=0)
    adapted = logos.logo_pass(pipe, s.target, s.garment, known, settings, lora=adapter, seed=0)
    assert adapted.lora == str(adapter) and plain.lora is None
    from tryon_lab.metrics import max_abs

    assert len(plain.patches) == len(known) > 0
    assert max(max_abs(a, b) for a, b in zip(adapted.patches, plain.patches, strict=True)) > 8


def test_logo_adapter_lookup_refuses_an_adapter_of_other_weights(tmp_path):
    import json

    from tryon_lab import checkpoint, provenance

    model = checkpoint.random_checkpoint()
    assert lora.adapter_for(model, "logo") is None  # nothing beside it
    assert lora.resolve_adapter("none", model, "logo") is None and lora.resolve_adapter("auto", model, "logo") is None
    with pytest.raises(FileNotFoundError, match="no pytorch_lora_weights"):
        lora.resolve_adapter(tmp_path, model, "logo")
    mine = tmp_path / "m"
    mine.symlink_to(model, target_is_directory=True)
    folder = tmp_path / ("m" + lora.ADAPTER_SUFFIXES["logo"])
    lora.make_lora(tiny_transformer(), 2, seed=0, path=folder)
    (folder / provenance.CARD_FILE).write_text(json.dumps({"base_fingerprint": "0" * 64}))
    with pytest.raises(ValueError, match="trained on other weights"):
        lora.adapter_for(mine, "logo")
    (folder / provenance.CARD_FILE).write_text(json.dumps({"base_fingerprint": provenance.fingerprint(model)}))
    assert lora.adapter_for(mine, "logo") == folder == lora.resolve_adapter("auto", mine, "logo")


def test_tryon_and_logo_adapters_share_one_slot_and_swap_under_regional_compile_without_recompiling(tmp_path):
    """The production shape: a try-on adapter on the main pass, the logo adapter on the logo pass, one compiled
    model; after the first round every swap is a hotswap (0 graphs compiled) and the images equal eager ones."""
    from tryon_lab import checkpoint, configure, flow, samples
    from tryon_lab.metrics import max_abs, psnr
    from tryon_lab.pipeline import TryOnRequest, TryOnSettings

    compiling.reset_compiled()
    logo = lora.adapter_for(checkpoint.TRAINED_DIR, "logo")
    scratch = configure.build_pipeline(checkpoint.TRAINED_DIR, device="cpu", dtype="float32")
    tryon_adapter = lora.make_lora(scratch.fill.transformer, 8, seed=3, path=tmp_path / "tryon", b_std=0.2)
    s = samples.load_sample("s001")
    req, settings = TryOnRequest(s.person, s.garment, s.mask, seed=0), TryOnSettings(steps=2, progress=False)

    def run(pipe, tryon_lora=tryon_adapter):
        return flow.tryon_with_logos(pipe, req, settings, s.garment_logo_boxes, logo_lora=logo,
                                     match_threshold=0.0, tryon_lora=tryon_lora)

    compiled = configure.build_pipeline(checkpoint.TRAINED_DIR, configure.PipelineOptions(
        device="cpu", dtype="float32", compile="regional", compile_backend="aot_eager",
        **lora.pass_slot([tryon_adapter, logo])))
    try:
        with torch.no_grad():
            with compiling.count_recompiles() as first:
                run(compiled)  # first round: each graph once
            with compiling.count_recompiles(strict=True) as steady:
                out = run(compiled)
            ref, plain = run(scratch), run(scratch, tryon_lora=None)
    finally:  # the LoRA layers' frames stay in dynamo's caches otherwise, and count against later tests' limit
        compiling.reset_compiled()
    assert first["graphs"] > 0 and steady["graphs"] == 0 and out.logos.calls == 1
    assert compiled.lora.loaded[lora.PASS_ADAPTER] == str(logo) and compiled.lora.target_rank == 16
    assert psnr(out.tryon.images[0], ref.tryon.images[0]) > 40 and psnr(out.image, ref.image) > 40
    assert max_abs(ref.tryon.images[0], plain.tryon.images[0]) > 8  # the try-on adapter took effect


def test_notebook_04s_adapter_choices_resolve_and_say_what_they_are(tmp_path):
    from tryon_lab import checkpoint

    logo, tryon = lora.resolve_pass_adapters(checkpoint.TRAINED_DIR, "auto", "auto")  # no trained try-on adapter yet
    assert logo == lora.adapter_for(checkpoint.TRAINED_DIR, "logo") and lora.lora_rank(tryon) == 8
    assert lora.adapter_label(logo) == "trained (toy-tryon-logo-lora)"
    assert lora.adapter_label(tryon) == "random stand-in, rank 8" and lora.adapter_label(None) == "none"
    assert lora.resolve_pass_adapters(checkpoint.TRAINED_DIR, "none", "none") == (None, None)
    with pytest.raises(FileNotFoundError, match="'auto', 'stand-in' or 'none'"):
        lora.resolve_pass_adapters(checkpoint.TRAINED_DIR, "none", tmp_path)


@pytest.mark.parametrize("changes", [dict(loras=(("logo", "unused"),)), dict(hotswap_rank=8)])
def test_fused_qkv_with_lora_adapters_is_refused_before_loading(changes):
    """diffusers fuses Q/K/V from the base weights, so adapters on to_q/to_k/to_v would be bypassed without a word
    (measured on the trained model: 0.46 rel-L2 from the same adapter unfused); refused before anything loads."""
    from tryon_lab import configure

    with pytest.raises(configure.OptionsError, match="fuse_qkv=False with LoRAs"):
        configure.build_pipeline("trained", device="cpu", fuse_qkv=True, **changes)
