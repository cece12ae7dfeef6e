"""FlashAttention-3 for diffusers' ``_flash_3`` attention backend, from the ``fa3-fwd`` wheel.

diffusers dispatches ``_flash_3`` to FA3's Hopper kernels when the ``flash_attn_3`` distribution, built from
source, is installed. The same forward kernels ship on PyPI as ``fa3-fwd`` (module ``fa3_fwd_interface``, built on
torch's stable ABI): ``enable_fa3`` points diffusers' own backend at them, so ``set_attention_backend("_flash_3")``
runs diffusers' code (its custom op for compiling, its LSE layout) on these kernels. Forward only: inference.

Measured on an H200 at the full-size FLUX shape (1 x 24 heads x 4313 tokens x 128): FA3 bf16 0.47 ms a call
against cuDNN's 0.52 ms; a first call of 2 ms against cuDNN's 1.1 s in a fresh process, where cuDNN loads its
engines and plans for the shape (in a cold start the first transformer call was 0.15 s shorter).
"""

from __future__ import annotations

import importlib.util

FA3 = "_flash_3"  # diffusers' name for the backend
FA3_FWD = "fa3_fwd_interface"  # the fa3-fwd wheel's module
MISSING = (f"attention={FA3!r} needs FlashAttention-3: `pip install fa3-fwd` (its forward kernels, a 28 MB wheel for "
           "CUDA 13 builds of torch) or flash_attn_3 built from source; or use attention='native'.")


def fa3_problem(device: str) -> str | None:
    """Why the ``_flash_3`` backend cannot run on ``device`` in this process, or None."""
    if device != "cuda":
        return f"attention={FA3!r} runs FlashAttention-3's Hopper kernels (CUDA); use attention='native' on {device!r}."
    from diffusers.utils import is_flash_attn_3_available

    if not is_flash_attn_3_available() and importlib.util.find_spec(FA3_FWD) is None:
        return MISSING
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9:
        name = torch.cuda.get_device_name()
        return f"attention={FA3!r}: FlashAttention-3 is built for Hopper (H100/H200), not {name}; use 'native'."
    return None


def enable_fa3() -> str:
    """Make diffusers' ``_flash_3`` backend usable in this process; returns the module its kernels come from
    (``flash_attn_interface`` when diffusers found FA3 itself, else ``fa3_fwd_interface``)."""
    from diffusers.models import attention_dispatch

    if not attention_dispatch._CAN_USE_FLASH_ATTN_3:
        try:
            module = importlib.import_module(FA3_FWD)
        except ImportError as e:  # apply_options without check_options: the same fix, not a bare import error
            raise ModuleNotFoundError(f"{MISSING} ({e})") from e
        # the two names diffusers' backend reads when it runs: its requirement check and the kernel its op calls
        attention_dispatch.flash_attn_3_func = module.flash_attn_func
        attention_dispatch._CAN_USE_FLASH_ATTN_3 = True
    return attention_dispatch.flash_attn_3_func.__module__
