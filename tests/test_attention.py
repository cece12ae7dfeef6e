"""The FlashAttention-3 knob on the CPU: what it refuses, and how it points diffusers' own ``_flash_3`` backend at
the fa3-fwd kernels. The kernels need a Hopper GPU: the GPU benchmark times them and compares the final latents
with bf16 eager (``fp8_static_fused_regional_fa3``)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from diffusers.models import attention_dispatch as ad

from tryon_lab import attention, configure


def test_fa3_is_refused_off_cuda_with_the_fix(model_dir):
    with pytest.raises(configure.OptionsError, match="attention='native'"):
        configure.build_pipeline(model_dir, device="cpu", attention=attention.FA3)
    configure.check_options(configure.PipelineOptions(device="cpu"))  # the default stays allowed


def test_fa3_without_kernels_says_what_to_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no device to ask for its architecture
    monkeypatch.setattr("diffusers.utils.is_flash_attn_3_available", lambda: False)
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: None)
    assert "pip install fa3-fwd" in attention.fa3_problem("cuda")
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: object())  # the wheel is there
    assert attention.fa3_problem("cuda") is None


def test_enable_without_kernels_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, attention.FA3_FWD, None)  # not installed
    monkeypatch.setattr(ad, "_CAN_USE_FLASH_ATTN_3", False)
    with pytest.raises(ModuleNotFoundError, match="pip install fa3-fwd"):
        attention.enable_fa3()
    assert ad._CAN_USE_FLASH_ATTN_3 is False  # diffusers left as it was


def test_enable_points_diffusers_backend_at_the_wheel(monkeypatch, model_dir):
    def flash_attn_func(**kwargs):
        raise AssertionError("not called on the CPU")

    flash_attn_func.__module__ = attention.FA3_FWD
    monkeypatch.setitem(sys.modules, attention.FA3_FWD, types.SimpleNamespace(flash_attn_func=flash_attn_func))
    monkeypatch.setattr(ad, "_CAN_USE_FLASH_ATTN_3", False)  # as in an environment without flash_attn_3
    monkeypatch.setattr(ad, "flash_attn_3_func", None)
    with pytest.raises(RuntimeError, match="Flash Attention 3"):
        ad._check_attention_backend_requirements(ad.AttentionBackendName._FLASH_3)
    assert attention.enable_fa3() == attention.FA3_FWD
    ad._check_attention_backend_requirements(ad.AttentionBackendName._FLASH_3)  # diffusers accepts it now
    assert ad.flash_attn_3_func is flash_attn_func  # the kernel diffusers' FA3 op calls
    assert attention.enable_fa3() == attention.FA3_FWD  # a second call changes nothing
    pipe = configure.build_pipeline(model_dir, device="cpu")
    pipe.transformer.set_attention_backend(attention.FA3)
    backends = {m.processor._attention_backend for m in pipe.transformer.modules() if hasattr(m, "processor")}
    assert backends == {ad.AttentionBackendName._FLASH_3}
