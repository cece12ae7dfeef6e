"""AOT-compiled repeated blocks (``compile_aot``): a second fresh process loads them and traces nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tryon_lab import aot_blocks, checkpoint, configure

ROOT = Path(__file__).resolve().parent.parent


def _child(folder: Path, cache: Path, name: str, other_size: bool, eager: bool, fp8: str) -> tuple[dict, str]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    p = subprocess.run([sys.executable, "-m", "tests.aot_child", str(folder), str(int(other_size)),
                        str(int(eager)), name, fp8], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads([x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1][7:]), p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fp8", ["fp8_weight_only", "fp8_static_tensor"])
def test_aot_blocks_compile_once_then_load_in_a_fresh_process_without_tracing(tmp_path, fp8):
    """Process 1 (FP8 weights, or static FP8 as a serving image would ship it; CPU inductor) compiles each block
    class on its first call and saves it; its image equals eager's. Process 2, with an empty inductor folder, loads
    both classes, compiles no graph at all and draws the same image bit for bit; a request of another size falls
    back to ordinary compile, with a warning."""
    folder = tmp_path / "aot"
    first, _ = _child(folder, tmp_path / "inductor-a", "a", other_size=False, eager=True, fp8=fp8)
    for name in ("FluxTransformerBlock", "FluxSingleTransformerBlock"):
        built = first["after"][name]
        assert built["loaded"] is False and built["compile_reason"] == "no saved code" and built["bytes"] > 0
        assert (folder / f"{name}.bin").is_file() and (folder / f"{name}.json").is_file()
    assert first["max_abs_vs_eager"] <= 2 and first["same_twice"]

    second, stderr = _child(folder, tmp_path / "inductor-b", "b", other_size=True, eager=False, fp8=fp8)
    assert second["graphs"] == 0  # nothing traced by dynamo for the two images
    for name in ("FluxTransformerBlock", "FluxSingleTransformerBlock"):
        assert second["build"][name]["loaded"] is True and second["build"][name]["fallback_calls"] == 0
        assert second["after"][name]["fallback_calls"] > 0  # the other size
    assert "differ from those its AOT-compiled code" in stderr
    assert (np.load(folder / "image-a.npy") == np.load(folder / "image-b.npy")).all()

    # saved for another torch: not loaded, compiled again on the first call, and the report says why
    meta = folder / "FluxSingleTransformerBlock.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "torch": "0.0"}))
    pipe = configure.build_pipeline(checkpoint.random_checkpoint(), device="cpu", dtype="float32", fp8=fp8,
                                    compile="regional", compile_aot=str(folder))
    rep = aot_blocks.report(pipe.aot_blocks)
    assert rep["FluxSingleTransformerBlock"]["compile_reason"] == "saved for another torch"
    assert rep["FluxTransformerBlock"]["loaded"] is True


@pytest.mark.parametrize("changes, words", [
    (dict(compile="none"), "compile='regional'"),
    (dict(compile="regional", compile_backend="aot_eager"), "compile='regional'"),
    (dict(compile="regional", hotswap_rank=8), "without LoRA"),
])
def test_aot_blocks_refuse_what_they_cannot_hold(changes, words):
    with pytest.raises(configure.OptionsError, match=words):
        configure.check_options(configure.PipelineOptions(compile_aot="aot", **changes))


def test_a_failed_aot_compile_falls_back_to_regional_compile_and_says_so(tmp_path, monkeypatch):
    """The experimental API may refuse a block (as it refused one for a guard it cannot serialize): the image
    still comes, from ordinary regional compile of that class, and the report and a warning say why."""
    import torch

    from tests.test_speed import tiny_inputs, tiny_transformer

    def refuse(*_):
        raise RuntimeError("PackageError: ID_MATCH guard cannot be serialized.")

    monkeypatch.setattr(aot_blocks, "_compile", refuse)
    t, ref_model = tiny_transformer(), tiny_transformer()
    x = tiny_inputs(t)
    states = aot_blocks.apply_aot_blocks(t, tmp_path / "aot", backend="eager")
    assert {r["compile_reason"] for r in aot_blocks.report(states).values()} == {"no saved code"}
    with torch.no_grad(), pytest.warns(UserWarning, match="AOT compile failed"):
        out = t(**x)[0]
    with torch.no_grad():
        again, ref = t(**x)[0], ref_model(**x)[0]
    assert torch.equal(out, ref) and torch.equal(again, ref)
    rep = aot_blocks.report(states)
    assert all("ID_MATCH" in r["error"] for r in rep.values())
    assert all(b._compiled_call_impl is not None for b in t.transformer_blocks)  # compiled the ordinary way
    assert not aot_blocks.installed(t)  # so LoRA may be loaded again
    assert not list(tmp_path.glob("aot/*.bin"))


def test_lora_is_refused_on_a_transformer_with_aot_blocks(tmp_path):
    """The compiled code holds the weights' layout as built: an adapter added afterwards would be left out."""
    from tryon_lab import lora

    pipe = configure.build_pipeline(checkpoint.random_checkpoint(), device="cpu", dtype="float32",
                                    compile="regional", compile_aot=str(tmp_path / "aot"))
    assert aot_blocks.installed(pipe.transformer)  # before the first call: the compiling pre-hooks
    path = lora.make_lora(pipe.transformer, 4, 0, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="AOT-compiled blocks"):
        lora.load_lora(pipe.fill, path)
    assert not aot_blocks.installed(configure.build_pipeline(checkpoint.random_checkpoint(), device="cpu",
                                                             dtype="float32").transformer)


def test_code_saved_with_another_gelu_is_not_loaded(tmp_path):
    """GELU as a sigmoid changes the traced code, not the parameters: blocks saved with the tanh form are
    compiled again (the report says why), never run in a transformer whose GELU is the sigmoid form."""
    from tests.test_speed import tiny_transformer
    from tryon_lab.compiling import sigmoid_gelu

    t = tiny_transformer()
    folder = tmp_path / "aot"
    folder.mkdir()
    for b in (t.transformer_blocks[0], t.single_transformer_blocks[0]):  # as _compile writes them
        name = type(b).__name__
        (folder / f"{name}.bin").write_bytes(b"x")
        (folder / f"{name}.json").write_text(json.dumps({**aot_blocks.depends_on(b, "eager"), "signature": "s"}))
    before = [aot_blocks.block_code(b) for b in (t.transformer_blocks[0], t.single_transformer_blocks[0])]
    assert sigmoid_gelu(t) > 0
    after = [aot_blocks.block_code(b) for b in (t.transformer_blocks[0], t.single_transformer_blocks[0])]
    assert before[0] != after[0] and before[1] != after[1]
    assert any("gelu_tanh_as_sigmoid" in n for n in after[0]) and any("SigmoidGELU" in n for n in after[1])
    states = aot_blocks.apply_aot_blocks(t, folder, backend="eager")
    assert {r["compile_reason"] for r in aot_blocks.report(states).values()} == {"saved for another code"}
