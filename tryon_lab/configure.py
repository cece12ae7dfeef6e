"""The one way to make a pipeline: ``PipelineOptions`` + ``build_pipeline(model_dir, options)``.

Every knob of the slim pipeline is an option here, applied in the one order that works:

    load (slim, safetensors, cached text embeddings)
    -> LoRA adapters (+ hotswap rank)      before FP8 (adapters stay in the model dtype) and before compiling
    -> fused QKV                            before FP8, so the fused Linear is quantized
    -> FP8 (torchao)                        or the memory mode's FP8 + offload / VAE tiling
    -> context parallelism                  hooks split the inputs around whatever the blocks are
    -> compile artefacts, then compile      regional or full
    -> TeaCache hook                        on the transformer itself, never on a compiled block

Widget, notebooks, scripts, context parallelism and tests all call ``build_pipeline`` (or ``get_pipeline``, the
one warm-pipeline cache keyed by model and options); nothing else composes load -> quantize -> compile.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import compiling, quant
from .checkpoint import check_model_dir
from .loading import SlimPipeline, load_slim, resolve_device_dtype
from .lora import load_lora, prepare_hotswap
from .parallel import ContextParallel
from .teacache import TeaCacheConfig, apply_teacache


class OptionsError(ValueError):
    """Options that cannot be combined (or not on this device); the message says which and what to use."""


@dataclass(frozen=True)
class PipelineOptions:
    device: str = "auto"  # "auto": CUDA when there is a GPU, else CPU
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on the CPU; or "bfloat16" / "float16" / "float32"
    fp8: str = "none"  # quant.QUANT_MODES
    fuse_qkv: bool = False  # one QKV matmul per attention (diffusers' fuse_qkv_projections)
    compile: str = "none"  # compiling.COMPILE_MODES: "regional" (repeated blocks) or "full"
    compile_mode: str | None = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"
    compile_backend: str = "inductor"
    compile_artifacts: str | None = None  # a mega-cache file loaded before compiling (compiling.load_compile_artifacts)
    attention: str = "native"  # diffusers attention backend ("native" = torch SDPA, picks cuDNN/flash on a GPU)
    memory: str | None = None  # memory.MemoryMode name, e.g. "bf16+group-offload" or "fp8+vae-tiling"
    context_parallel: ContextParallel | None = None  # under torchrun: split the sequence over the ranks
    loras: tuple[tuple[str, str], ...] = ()  # (adapter name, path), loaded before FP8 and compile
    hotswap_rank: int | None = None  # pad adapters to this rank, so later adapters swap in without recompiling
    teacache: TeaCacheConfig | None = None  # TeaCache for the pipeline's lifetime (per call: teacache.enabled)
    hot_path: bool = False  # the preallocated denoise loop by default (TryOnSettings.hot_path overrides)
    embeddings_file: str | None = None  # cached text embeddings; default: the model's own cache

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_device_dtype(self.device, self.dtype)[1]

    def resolved(self) -> PipelineOptions:
        """The same options with ``auto`` device and dtype made concrete for this machine."""
        device, dtype = resolve_device_dtype(self.device, self.dtype)
        return replace(self, device=device, dtype=str(dtype).removeprefix("torch."))

    @property
    def key(self) -> str:
        """A stable text key (the TeaCache config is a mutable dataclass, so options hash by their repr)."""
        return repr(self.resolved())


def check_options(options: PipelineOptions) -> None:
    """Refuse combinations that cannot work, before anything loads."""
    from .memory import MemoryMode

    o = options
    quant.check_mode(o.fp8, quant.QUANT_MODES, "quantization")
    compiling.check_compile_mode(o.compile)
    if o.fp8.startswith("fp8_dynamic") and (problem := quant.fp8_dynamic_problem(o.device)):
        raise OptionsError(f"fp8={o.fp8!r}: {problem}")
    if o.memory is not None:
        mode = MemoryMode.parse(o.memory)
        if o.fp8 != "none":
            raise OptionsError(f"memory={o.memory!r} sets FP8 itself ({'fp8' if mode.fp8 else 'bf16'}); leave fp8 at "
                               "'none' and choose 'fp8+...' or 'bf16+...' in the memory mode.")
        if mode.offload != "none" and o.compile != "none":
            raise OptionsError(f"memory={o.memory!r} offloads weights, which recompiles on every move; use "
                               "compile='none' with offloading, or a memory mode without offload.")
        if mode.offload != "none" and o.context_parallel is not None:
            raise OptionsError("context parallelism with CPU offload is not supported; pick one.")
    if o.teacache is not None and o.compile == "full":
        raise OptionsError("TeaCache decides per step in Python, which whole-model compile cannot trace; use "
                           "compile='regional' with TeaCache.")
    if o.context_parallel is not None:
        from .parallel import compile_problem

        if problem := compile_problem(o.context_parallel, o.compile):
            raise OptionsError(problem)
    if o.hotswap_rank is not None and o.hotswap_rank < 1:
        raise OptionsError(f"hotswap_rank must be >= 1 (the largest adapter rank you will swap in), got {o.hotswap_rank}.")


def apply_options(pipe: SlimPipeline, options: PipelineOptions) -> SlimPipeline:
    """Apply every knob after loading, in the order above; returns ``pipe`` (changed in place)."""
    from .memory import MemoryMode, apply_mode

    o = options
    transformer = pipe.transformer
    transformer.set_attention_backend(o.attention)
    if o.hotswap_rank is not None:
        prepare_hotswap(pipe.fill, o.hotswap_rank, pipe.lora)
    for name, path in o.loras:
        load_lora(pipe.fill, path, name, state=pipe.lora)
    if o.fuse_qkv:
        transformer.fuse_qkv_projections()
    if o.memory is not None:
        apply_mode(pipe, MemoryMode.parse(o.memory), o.device)
    else:
        pipe.build_report["quant"] = quant.quantize_transformer(transformer, o.fp8)
    if o.context_parallel is not None:
        from .parallel import enable_context_parallel

        enable_context_parallel(transformer, o.context_parallel)
        if not o.context_parallel.anything:  # an even split: pad the text with T5 padding tokens
            pipe.text_multiple = o.context_parallel.world_size
    if o.compile != "none" and o.compile_artifacts:
        pipe.build_report["artifacts"] = compiling.load_compile_artifacts(o.compile_artifacts)
    compiling.compile_transformer(transformer, o.compile, o.compile_backend,
                                  **({"mode": o.compile_mode} if o.compile_mode else {}))
    if o.teacache is not None:
        apply_teacache(transformer, o.teacache)
    pipe.hot_path, pipe.options = o.hot_path, o
    return pipe


def build_pipeline(model_dir: str | Path, options: PipelineOptions | None = None, **changes) -> SlimPipeline:
    """Load the slim pipeline from ``model_dir`` and apply ``options`` (keyword ``changes`` override fields).

    Options that cannot combine, then the folder (``checkpoint.ModelFolderError`` naming the path and the fix),
    are refused before a process group starts or anything loads.
    """
    o = replace(options or PipelineOptions(), **changes)
    if o.context_parallel is not None:
        from .parallel import compile_problem

        if problem := compile_problem(o.context_parallel, o.compile):
            raise OptionsError(problem)
    model_dir = check_model_dir(model_dir)  # both snapshots there; load_slim checks their parts and shards
    if o.context_parallel is not None:  # every rank builds on its own GPU (torchrun)
        from .parallel import init_distributed

        _, _, rank_device = init_distributed()
        o = replace(o, device=rank_device)
    o = o.resolved()
    check_options(o)
    offload = o.memory is not None and "offload" in o.memory
    pipe = load_slim(model_dir, o.torch_dtype, "cpu" if offload else o.device,
                     Path(o.embeddings_file) if o.embeddings_file else None)
    return apply_options(pipe, o)


_WARM: dict[tuple[str, str], SlimPipeline] = {}  # the one warm-pipeline cache: (model folder, options) -> pipeline


def get_pipeline(model_dir: str | Path, options: PipelineOptions | None = None, **changes) -> SlimPipeline:
    """``build_pipeline`` once per process for each model and options; later calls return the warm pipeline."""
    o = replace(options or PipelineOptions(), **changes)
    key = (str(Path(model_dir).resolve()), o.key)
    if key not in _WARM:
        _WARM[key] = build_pipeline(model_dir, o)
    return _WARM[key]


def warm_pipelines() -> int:
    """How many pipelines this process holds warm (each one was built once)."""
    return len(_WARM)
