"""Regional compile that a fresh process loads instead of tracing: AOT-compiled repeated blocks (cold start).

Regional compile (``compiling.compile_transformer(how="regional")``) traces one double- and one single-stream
block in every fresh process, even with a warm artefact cache (4.4-4.7 s on an H200, of a 20 s cold start).
torch's module AOT compile (experimental: ``torch._dynamo.config.enable_aot_compile``) saves the compiled code of
one block with no dynamo cache behind it, and a fresh process loads it without tracing. The compiled code takes
the block as an argument, so one file per block class serves all its blocks, each with its own weights.

- First process: a pre-hook on the first block of each class compiles it on its first call's inputs and
  writes ``<class>.bin`` and ``<class>.json`` (torch version, device, the call's signature, the block's parameter
  names, types and shapes) into the folder; then every block of the class runs the compiled code.
- Later processes: ``apply_aot_blocks`` loads the file (no tracing) when the JSON matches this torch, diffusers,
  device, attention backend and block layout; otherwise it compiles again on the first call and says why in its report.
- Guards are not saved (a guard on object identity cannot be checked in another process), so the hook checks
  each call's signature itself; a call with another signature (another image size) runs the class's forward
  under ordinary ``torch.compile`` instead, with a warning, and ``AotBlocksState.fallback_calls`` counts it.
- If torch refuses to AOT-compile a class (an experimental API), that class gets ordinary regional compile,
  with a warning and the error in the report; a file torch cannot read back is compiled again.
- The parameters are the block's as they are when the hook is applied (FP8 tensors included). Adapters added
  later (LoRA) would not be in the compiled code: ``configure`` and ``lora.load_lora`` refuse them.
"""

from __future__ import annotations

import json
import os
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook
from torch.utils._pytree import tree_flatten

from .step_graph import signature

_HOOK = "aot_block"
_STATE = "_aot_blocks_state"  # on each block of a class that runs (or will run) AOT-compiled code


def compile_options() -> dict:
    """No guards saved (one on object identity cannot be checked in another process). A new dict every time:
    ``torch.compile`` pops ``guard_filter_fn`` out of the options it is given."""
    return {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe}


def _aot_module(block: torch.nn.Module, backend: str):
    """The wrapper whose AOT methods compile, save or load the block's code (use it inside ``_aot()``)."""
    return torch.compile(block, fullgraph=True, backend=backend, options=compile_options())


def _aot():
    return torch._dynamo.config.patch(enable_aot_compile=True)


def call_signature(args: tuple, kwargs: dict) -> str:
    """Shapes, dtypes, devices, other values, and the grad mode: what the unguarded code is valid for."""
    return repr((signature(*tree_flatten((args, kwargs))), torch.is_grad_enabled(), torch.is_inference_mode_enabled()))


def block_layout(block: torch.nn.Module) -> list[list]:
    """Parameter names, tensor types (FP8 tensors are a subclass), dtypes and shapes: what the code was built on."""
    return [[n, type(p).__name__, str(p.dtype), list(p.shape)] for n, p in block.named_parameters()]


def environment(block: torch.nn.Module) -> dict:
    """What else the saved code depends on: torch, the device, and the code it was traced from (diffusers' block
    forward and each attention's processor and backend)."""
    import diffusers

    p = next(block.parameters())
    device = p.device.type
    if device == "cuda":
        device = f"{torch.cuda.get_device_name(p.device)} sm{''.join(map(str, torch.cuda.get_device_capability(p.device)))}"
    attention = sorted({f"{type(m.processor).__name__}:{getattr(m.processor, '_attention_backend', None)}"
                        for m in block.modules() if hasattr(m, "processor")})
    return {"torch": torch.__version__, "device": device, "diffusers": diffusers.__version__, "attention": attention,
            "code": block_code(block)}


def depends_on(block: torch.nn.Module, backend: str) -> dict:
    """Everything a class's saved code was built on and is loaded only with: the environment, the block's layout
    and the compile backend (the JSON beside the code holds these and the call signature)."""
    return {**environment(block), "layout": block_layout(block), "backend": backend}


def block_code(block: torch.nn.Module) -> list[str]:
    """The classes of the block's modules and the functions set on one of them (``compiling.sigmoid_gelu`` sets
    a diffusers ``GELU``'s ``gelu``): what changes the traced code but not the parameters."""
    names = set()
    for m in block.modules():
        names.add(f"{type(m).__module__}.{type(m).__qualname__}")
        names.update(f"{type(m).__name__}.{k}={v.__module__}.{v.__qualname__}" for k, v in vars(m).items()
                     if isinstance(v, types.FunctionType))
    return sorted(names)


@dataclass
class AotBlocksState:
    """One block class: its compiled code (None until loaded or compiled), the signature it was compiled for."""

    name: str
    folder: Path
    backend: str
    compiled: object = None  # torch's AOTCompiledFunction: called as compiled(block, *args, **kwargs)
    signature: str | None = None
    fallback: object = None  # the class's forward under ordinary torch.compile, for other signatures
    fallback_calls: int = 0
    pre_hook: object = None  # the handle of the hook that compiles on the first call (removed by that call)
    report: dict = field(default_factory=dict)

    @property
    def files(self) -> tuple[Path, Path]:
        return self.folder / f"{self.name}.bin", self.folder / f"{self.name}.json"


class AotBlockHook(ModelHook):
    """Runs the block through its class's AOT-compiled code when the call has the compiled signature."""

    def __init__(self, state: AotBlocksState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        st = self.state
        if st.compiled is not None and call_signature(args, kwargs) == st.signature:
            return st.compiled(module, *args, **kwargs)
        if st.fallback is None:
            warnings.warn(f"{st.name}: this call's inputs differ from those its AOT-compiled code in {st.folder} was "
                          "built for (another image size?): compiling it as regional compile does. Delete the "
                          "folder to build the AOT code for the new size.", stacklevel=2)
            st.fallback = torch.compile(type(module).forward, fullgraph=True, backend=st.backend)
        st.fallback_calls += 1
        return st.fallback(module, *args, **kwargs)


def _compile(block: torch.nn.Module, st: AotBlocksState, args: tuple, kwargs: dict) -> None:
    from torch._dynamo.aot_compile import ModelInput

    start = time.perf_counter()
    with _aot():
        wrapper = _aot_module(block, st.backend)
        wrapper._aot_compile([ModelInput(args=args, kwargs=kwargs, contexts=[])])
        data = wrapper._save_aot_compiled_module()
    st.compiled, st.signature = wrapper.forward.compiled_results[0], call_signature(args, kwargs)
    binary, meta = st.files
    st.folder.mkdir(parents=True, exist_ok=True)
    info = json.dumps({**depends_on(block, st.backend), "signature": st.signature}, indent=1)
    for path, content in ((binary, data), (meta, info.encode())):  # whole files only: other processes may read
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)
    st.report.update(compiled_s=time.perf_counter() - start, bytes=len(data))


def _load(block: torch.nn.Module, st: AotBlocksState) -> str | None:
    """Load the class's saved code; None when loaded, else why not (the first call compiles it then)."""
    binary, meta_file = st.files
    if not (binary.is_file() and meta_file.is_file()):
        return "no saved code"
    meta = json.loads(meta_file.read_text())
    for key, now in depends_on(block, st.backend).items():
        if meta.get(key) != now:
            return f"saved for another {key}"
    start = time.perf_counter()
    try:
        with _aot():
            wrapper = _aot_module(block, st.backend)
            wrapper._load_aot_compiled_module(binary.read_bytes())
    except Exception as e:  # noqa: BLE001 -- a file torch cannot read back is compiled again
        return f"could not load ({type(e).__name__}: {str(e)[:300]})"
    st.compiled, st.signature = wrapper.forward.compiled_results[0], meta["signature"]
    st.report.update(loaded_s=time.perf_counter() - start, bytes=binary.stat().st_size)
    return None


def apply_aot_blocks(transformer: torch.nn.Module, folder: str | Path, backend: str = "inductor") -> dict:
    """Run each repeated block class (``transformer._repeated_blocks``) through AOT-compiled code kept in
    ``folder``: loaded now when it fits, else compiled on the first call and saved. Returns the states by class."""
    states = {}
    for name in transformer._repeated_blocks:
        blocks = [m for m in transformer.modules() if type(m).__name__ == name]
        if not blocks:
            continue
        st = states[name] = AotBlocksState(name, Path(folder), backend)
        for b in blocks:
            setattr(b, _STATE, st)
        why = _load(blocks[0], st)
        st.report["loaded"] = why is None
        if why is not None:
            st.report["compile_reason"] = why

            def compile_first(block, args, kwargs, st=st, blocks=blocks):
                st.pre_hook.remove()  # this call runs eager (its forward was chosen before this hook ran)
                try:
                    _compile(block, st, args, kwargs)
                except Exception as e:  # noqa: BLE001 -- an experimental torch API: the image must still come
                    st.report["error"] = f"{type(e).__name__}: {e}"[:500]
                    warnings.warn(f"{st.name}: AOT compile failed ({st.report['error']}); using ordinary regional "
                                  "compile for this class.", stacklevel=2)
                    for b in blocks:
                        delattr(b, _STATE)
                        b.compile(fullgraph=True, backend=st.backend)
                    return
                _install(blocks, st)

            st.pre_hook = blocks[0].register_forward_pre_hook(compile_first, with_kwargs=True)
        else:
            _install(blocks, st)
    return states


def _install(blocks: list[torch.nn.Module], st: AotBlocksState) -> None:
    for b in blocks:
        HookRegistry.check_if_exists_or_initialize(b).register_hook(AotBlockHook(st), _HOOK)


def installed(transformer: torch.nn.Module) -> bool:
    """Whether any block runs AOT-compiled code (or will after its first call): LoRA must not be added then."""
    return any(getattr(m, _STATE, None) is not None for m in transformer.modules())


def report(states: dict[str, AotBlocksState]) -> dict:
    """What each class did: loaded or compiled (and why), seconds, bytes, calls that fell back."""
    return {k: {**st.report, "fallback_calls": st.fallback_calls} for k, st in states.items()}
