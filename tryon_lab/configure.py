"""The one way to make a pipeline: ``PipelineOptions`` + ``build_pipeline(model_dir, options)``.

Every knob of the slim pipeline is an option here, applied in the one order that works:

    load (slim, safetensors, cached text embeddings)
    -> LoRA adapters (+ hotswap rank)      before FP8 (adapters stay in the model dtype) and before compiling
    -> fused QKV                            before FP8, so the fused Linear is quantized
    -> FP8 (torchao)                        or the memory mode's FP8 + offload / VAE tiling
    -> context parallelism                  hooks split the inputs around whatever the blocks are (+ VAE rows)
    -> compile artefacts, then compile      regional or full
    -> TeaCache hook                        on the transformer itself, never on a compiled block
    -> step graph                           last: one CUDA graph around all of the above, per transformer call

Widget, notebooks, scripts, context parallelism and tests all call ``build_pipeline`` (or ``get_pipeline``, the
one warm-pipeline cache keyed by model and options); nothing else composes load -> quantize -> compile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import compiling, import_cache, loading, quant
from .attention import FA3, enable_fa3, fa3_problem
from .checkpoint import FILL_SUBDIR, check_model_dir, resolve_model_dir
from .loading import EarlyReads, SlimPipeline, load_slim, resolve_device_dtype
from .timers import sync

if TYPE_CHECKING:  # imported where used: teacache pulls in diffusers' hooks package (and peft) at import
    from .parallel import ContextParallel
    from .teacache import TeaCacheConfig


class OptionsError(ValueError):
    """Options that cannot be combined (or not on this device); the message says which and what to use."""


@dataclass(frozen=True)
class PipelineOptions:
    device: str = "auto"  # "auto": CUDA when there is a GPU, else CPU
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on the CPU; or "bfloat16" / "float16" / "float32"
    fp8: str = "none"  # quant.QUANT_MODES
    fp8_calibration: int | None = None  # fp8_static_tensor: the bundled sample's height for its 2-step calibration
    fp8_weights: str | None = None  # a folder quant.save_fp8_transformer wrote (save_fp8_weights): loaded, not quantized
    fuse_qkv: bool = False  # one QKV matmul per attention (diffusers' fuse_qkv_projections)
    sigmoid_gelu: bool = False  # GELU's tanh form as x * sigmoid(2z), the same function (compiling.sigmoid_gelu)
    compile: str = "none"  # compiling.COMPILE_MODES: "regional" (repeated blocks) or "full"
    compile_mode: str | None = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"
    compile_backend: str = "inductor"
    compile_exact_casts: bool = True  # whole-model compile rounds like eager (compiling.compile_transformer)
    compile_artifacts: str | None = None  # a mega-cache file loaded before compiling (compiling.load_compile_artifacts)
    compile_aot: str | None = None  # regional compile as AOT-compiled blocks kept in this folder (aot_blocks.py)
    attention: str = "native"  # diffusers attention backend ("native" = torch SDPA, picks cuDNN/flash on a GPU;
    # "_flash_3": FlashAttention-3 on Hopper, from flash_attn_3 or the fa3-fwd wheel: attention.py)
    memory: str | None = None  # memory.MemoryMode name, e.g. "bf16+group-offload" or "fp8+vae-tiling"
    context_parallel: ContextParallel | None = None  # under torchrun: split the sequence over the ranks
    loras: tuple[tuple[str, str], ...] = ()  # (adapter name, path), loaded before FP8 and compile
    hotswap_rank: int | None = None  # pad adapters to this rank, so later adapters swap in without recompiling
    teacache: TeaCacheConfig | None = None  # TeaCache for the pipeline's lifetime (per call: teacache.enabled)
    hot_path: bool = False  # the preallocated denoise loop by default (TryOnSettings.hot_path overrides)
    embeddings_file: str | None = None  # cached text embeddings; default: the model's own cache
    step_graph: bool = False  # each transformer call replayed as one CUDA graph after warm-up (step_graph.py)
    redux_process: bool = False  # Redux in a worker process and the Fill parts without diffusers' pipeline class:
    # this process imports no transformers (a serving process's lever: redux_process.py, fill_setup.py)

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_device_dtype(self.device, self.dtype)[1]

    def resolved(self) -> PipelineOptions:
        """The same options with ``auto`` device and dtype made concrete for this machine."""
        device, dtype = resolve_device_dtype(self.device, self.dtype)
        return replace(self, device=device, dtype=str(dtype).removeprefix("torch."))

    @property
    def load_device(self) -> str:
        """Where the weights are read to: the CPU when the memory mode offloads them, else the device."""
        return "cpu" if self.memory is not None and "offload" in self.memory else self.device

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
    if problem := quant.fp8_matmul_problem(o.fp8, o.device):
        raise OptionsError(f"fp8={o.fp8!r}: {problem}")
    if o.fp8_calibration is not None and (o.fp8 != quant.STATIC or o.fp8_weights is not None):
        raise OptionsError(f"fp8_calibration={o.fp8_calibration} sets where fp8={quant.STATIC!r} calibrates on load; "
                           "here nothing is calibrated (another mode, or a saved folder's scales): leave it None.")
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
        if mode.vae_tiling and o.context_parallel is not None and o.context_parallel.split_vae:
            raise OptionsError(f"memory={o.memory!r} tiles the VAE, and split_vae splits it over the ranks already "
                               "(a band each); use one of them.")
    if o.fp8_weights is not None:
        if o.fp8 == "none":
            raise OptionsError(f"fp8_weights={o.fp8_weights!r} holds FP8 weights; set fp8 to the mode it was saved "
                               "with (quant.read_fp8_info(folder)[0]['mode']).")
        if o.memory is not None or o.loras or o.hotswap_rank is not None:
            raise OptionsError("fp8_weights loads an FP8 transformer as saved; memory modes, LoRA adapters and "
                               "hotswap are applied before FP8, so build those with fp8_weights=None.")
    if o.fuse_qkv and (o.loras or o.hotswap_rank is not None):  # measured: 0.46 rel-L2 from the unfused try-on
        raise OptionsError("fuse_qkv=True with LoRA adapters: the fused Q/K/V Linear is built from the base weights, "
                           "so adapters on to_q/to_k/to_v would be bypassed; use fuse_qkv=False with LoRAs.")
    if (o.loras or o.hotswap_rank is not None) and "peft" in import_cache.left_out():
        raise OptionsError("LoRA adapters need peft, which this process left out (import_cache.leave_out, a serving "
                           "process's lever); build this pipeline in a process that keeps peft.")
    if o.teacache is not None and o.compile == "full":
        raise OptionsError("TeaCache decides per step in Python, which whole-model compile cannot trace; use "
                           "compile='regional' with TeaCache.")
    if o.context_parallel is not None:
        from .parallel import compile_problem

        if problem := compile_problem(o.context_parallel, o.compile):
            raise OptionsError(problem)
    if o.step_graph:
        if (problem := step_graph_problem(o)) is not None:
            raise OptionsError(f"step_graph=True: {problem}")
    if o.compile_aot is not None and (problem := aot_problem(o)):
        raise OptionsError(f"compile_aot={o.compile_aot!r}: {problem}")
    if o.attention == FA3 and (problem := fa3_problem(o.resolved().device)):
        raise OptionsError(problem)
    if o.redux_process and (problem := redux_process_problem(o)):
        raise OptionsError(f"redux_process=True: {problem}")
    if o.hotswap_rank is not None and o.hotswap_rank < 1:
        raise OptionsError(f"hotswap_rank must be >= 1 (the largest adapter rank you will swap in), got {o.hotswap_rank}.")


def aot_problem(o: PipelineOptions) -> str | None:
    """Why these options cannot run AOT-compiled blocks, or None."""
    if o.compile != "regional" or o.compile_backend != "inductor" or o.compile_mode:
        return "AOT-compiled blocks are regional compile with inductor's default mode; set compile='regional'."
    if o.loras or o.hotswap_rank is not None:
        return "the compiled blocks hold the weights' layout as built, without LoRA adapters; build without LoRA."
    if o.context_parallel is not None or o.memory is not None:
        return "not built for context parallelism or memory modes; use compile_aot=None with those."
    return None


def redux_process_problem(o: PipelineOptions) -> str | None:
    """Why these options need diffusers' Fill pipeline class in this process, or None."""
    if not o.hot_path:
        return "the Fill parts run the hot path only (diffusers' pipeline call is its class's); set hot_path=True."
    if o.memory is not None or o.loras or o.hotswap_rank is not None or o.context_parallel is not None:
        return ("memory modes, LoRA adapters and context parallelism act through diffusers' pipeline class; build "
                "those with redux_process=False.")
    return None


def step_graph_problem(o: PipelineOptions) -> str | None:
    """Why these options cannot replay the transformer as one CUDA graph, or None."""
    from .memory import MemoryMode

    if o.resolved().device != "cuda":
        return "CUDA graphs need a GPU (device 'cuda'); leave it off on the CPU."
    if o.teacache is not None:
        return "TeaCache decides on the host whether a step runs the blocks, which a recorded graph cannot; pick one."
    if o.compile_mode and "reduce-overhead" in o.compile_mode:
        return f"compile_mode={o.compile_mode!r} records CUDA graphs already; use one or the other."
    if o.context_parallel is not None and o.context_parallel.anything:
        return ("ulysses_anything exchanges the split sizes on the host at every call, which a graph cannot replay; "
                "use the even split (ContextParallel(anything=False): the text is padded to the degree).")
    if o.memory is not None and MemoryMode.parse(o.memory).offload != "none":
        return f"memory={o.memory!r} moves weights between calls, which a graph cannot follow; use a mode without offload."
    return None


def apply_options(pipe: SlimPipeline, options: PipelineOptions) -> SlimPipeline:
    """Apply every knob after loading, in the order above; returns ``pipe`` (changed in place)."""
    from .memory import MemoryMode, apply_mode

    o = options
    transformer = pipe.transformer
    pipe.hot_path = o.hot_path  # first: the static-FP8 calibration try-on below runs the pipeline's own loop
    if o.attention == FA3:
        enable_fa3()  # diffusers' own FA3 backend, pointed at the kernels this process has
    transformer.set_attention_backend(o.attention)
    if o.hotswap_rank is not None or o.loras:
        from .lora import PASS_ADAPTER, load_lora, prepare_hotswap

        if o.hotswap_rank is not None:
            prepare_hotswap(pipe.fill, o.hotswap_rank, pipe.lora)
        for name, path in o.loras:
            load_lora(pipe.fill, path, name, state=pipe.lora)
        if any(name == PASS_ADAPTER for name, _ in o.loras):  # the passes' slot: each pass enables it for itself
            pipe.fill.disable_lora()
    if o.fuse_qkv and not quant.fused_qkv(transformer):  # a saved FP8 folder may come fused already
        quant.fuse_qkv(transformer)
    if o.sigmoid_gelu:
        compiling.sigmoid_gelu(transformer)
    seconds = pipe.build_report.setdefault("seconds", {})  # the cold-start phases of this step
    start = time.perf_counter()
    if o.memory is not None:
        apply_mode(pipe, MemoryMode.parse(o.memory), o.device)
    elif o.fp8_weights is not None:  # loaded already quantized
        calibrated = getattr(transformer, "fp8_info", {}).get("calibration")  # the static scales' source
        pipe.build_report["quant"] = {"quant": o.fp8, "fp8_weights": o.fp8_weights,
                                      **({"calibration": calibrated} if calibrated else {}),
                                      "weight_bytes": quant.weight_bytes(transformer),
                                      "fp8_layers": sum(quant.fp8_filter()(m, n) for n, m in transformer.named_modules())}
    else:
        pipe.build_report["quant"] = quant.quantize_transformer(transformer, o.fp8,
                                                                calibrate=lambda: calibration_tryon(pipe, o))
    sync(o.device)
    seconds["quantize"] = time.perf_counter() - start
    if o.context_parallel is not None:
        from .parallel import enable_context_parallel

        enable_context_parallel(transformer, o.context_parallel)
        if o.context_parallel.split_vae:
            from .parallel import split_vae

            split_vae(pipe.fill.vae)
        if not o.context_parallel.anything:  # an even split: pad the text with T5 padding tokens
            pipe.text_multiple = o.context_parallel.world_size
    if o.compile != "none" and o.compile_artifacts:
        start = time.perf_counter()
        pipe.build_report["artifacts"] = compiling.load_compile_artifacts(o.compile_artifacts)
        seconds["artifacts"] = time.perf_counter() - start
    # whole-model compile under context parallelism: the output gather (torch's all_gather along the sequence
    # dim) is not traceable, so dynamo may break the graph there, after every block
    whole_cp = o.compile == "full" and o.context_parallel is not None
    if o.compile_aot is not None:  # loaded now when saved before (counted as artefact loading), else built lazily
        from .aot_blocks import apply_aot_blocks, report

        start = time.perf_counter()
        pipe.aot_blocks = apply_aot_blocks(transformer, o.compile_aot, o.compile_backend)
        seconds["artifacts"] = seconds.get("artifacts", 0.0) + time.perf_counter() - start
        pipe.build_report["aot_blocks"] = report(pipe.aot_blocks)
    else:
        compiling.compile_transformer(transformer, o.compile, o.compile_backend, fullgraph=not whole_cp,
                                      exact_casts=o.compile_exact_casts,
                                      **({"mode": o.compile_mode} if o.compile_mode else {}))
    if o.teacache is not None:
        from .teacache import apply_teacache

        apply_teacache(transformer, o.teacache)
    if o.step_graph:  # last, so context parallelism's split and gather run inside the graph
        from .step_graph import apply_step_graph

        apply_step_graph(transformer)
    pipe.options = o
    return pipe


def start_reads(model_dir: str | Path, options: PipelineOptions | None = None, gil_switch_ms: float | None = 0.5,
                **changes) -> EarlyReads:
    """A serving script's call right after ``import torch``: the weight reads ``build_pipeline`` would start (the
    saved FP8 transformer, SigLIP) start now on worker threads, so that they, and the CUDA context they create,
    run while the script imports diffusers and torchao. Pass the result to ``build_pipeline(..., reads=...)``
    with the same options. ``gil_switch_ms``: the GIL switch interval while the reads run (Python's is 5 ms; None
    leaves it), so that the importing thread holds the readers up less (``bulk_read.SWITCH_INTERVAL``)."""
    o = replace(options or PipelineOptions(), **changes)
    if o.context_parallel is not None:
        raise OptionsError("start_reads with context_parallel: a rank's device is known once its process group "
                           "starts (in build_pipeline); build without reads=.")
    o = o.resolved()
    return loading.start_reads(resolve_model_dir(model_dir), o.load_device, o.fp8_weights, siglip=not o.redux_process,
                               switch_ms=gil_switch_ms)


def build_pipeline(model_dir: str | Path, options: PipelineOptions | None = None, redux=None,
                   reads: EarlyReads | None = None, **changes) -> SlimPipeline:
    """Load the slim pipeline from ``model_dir`` (a folder, or ``"default"``, ``"trained"``, ``"random"``) and
    apply ``options`` (keyword ``changes`` override fields). ``redux``: with ``redux_process``, the
    ``redux_process.RemoteRedux`` a serving script started first thing (its imports overlap this process's);
    None starts one here. ``reads``: what ``start_reads`` started for these options.

    Options that cannot combine, then the folder (``checkpoint.ModelFolderError`` naming the path and the fix),
    are refused before a process group starts or anything loads.
    """
    o = replace(options or PipelineOptions(), **changes)
    if o.context_parallel is not None:
        from .parallel import compile_problem

        if problem := compile_problem(o.context_parallel, o.compile):
            raise OptionsError(problem)
    model_dir = check_model_dir(resolve_model_dir(model_dir))  # both snapshots there; load_slim checks the parts
    if o.context_parallel is not None:  # every rank builds on its own GPU (torchrun)
        from .parallel import init_distributed

        _, _, rank_device = init_distributed()
        o = replace(o, device=rank_device)
    o = o.resolved()
    check_options(o)
    # a saved FP8 folder of another mode, dtype, model or QKV fusing is refused there, before any load
    if o.redux_process and redux is None:
        from .redux_process import RemoteRedux

        redux = RemoteRedux(model_dir, o.device, o.dtype)
    pipe = load_slim(model_dir, o.torch_dtype, o.load_device,
                     Path(o.embeddings_file) if o.embeddings_file else None,
                     (o.fp8_weights, o.fp8) if o.fp8_weights else None, o.fuse_qkv,
                     redux if o.redux_process else None, reads)
    return apply_options(pipe, o)


def calibration_tryon(pipe: SlimPipeline, o: PipelineOptions) -> str:
    """The static-FP8 calibration run: a 2-step try-on of the bundled sample (at ``o.fp8_calibration`` pixels
    high, else as stored); returns what it ran on."""
    from .pipeline import TryOnRequest, TryOnSettings, tryon
    from .samples import load_sample

    s = load_sample(0, height=o.fp8_calibration)
    with torch.no_grad():
        tryon(pipe, TryOnRequest(s.person, s.garment, s.mask, seed=0), TryOnSettings(steps=2, progress=False))
    pipe.redux_cache.clear()  # the sample's Redux tokens are no request's
    return f"sample {s.id} at {s.person.width}x{s.person.height}, 2 steps, seed 0"


def save_fp8_weights(model_dir: str | Path, folder: str | Path, fp8: str, device: str = "auto",
                     dtype: str = "auto", fuse_qkv: bool = False, calibration: int | None = None) -> dict:
    """Quantize the model's transformer exactly as ``build_pipeline`` does (fused QKV first, if asked) and save
    it for ``fp8_weights``; ``calibration``: ``fp8_calibration`` for the static mode.

    Loading the folder later reads the FP8 bytes straight onto the device and skips the bf16 read and the
    quantization; make it once per model, mode, dtype and fusing, where the mode can run (dynamic FP8: a GPU).
    """
    if fp8 == "none":
        raise OptionsError("save_fp8_weights needs an FP8 mode; choose one of " + ", ".join(quant.QUANT_MODES[1:]))
    pipe = build_pipeline(model_dir, device=device, dtype=dtype, fp8=fp8, fuse_qkv=fuse_qkv, fp8_calibration=calibration)
    return quant.save_fp8_transformer(pipe.transformer, folder, source=pipe.model_dir / FILL_SUBDIR / "transformer",
                                      calibration=pipe.build_report["quant"].get("calibration"))


_WARM: dict[tuple[str, str], SlimPipeline] = {}  # the one warm-pipeline cache: (model folder, options) -> pipeline


def get_pipeline(model_dir: str | Path, options: PipelineOptions | None = None, **changes) -> SlimPipeline:
    """``build_pipeline`` once per process for each model and options; later calls return the warm pipeline."""
    o = replace(options or PipelineOptions(), **changes)
    model_dir = resolve_model_dir(model_dir)
    key = (str(model_dir.resolve()), o.key)
    if key not in _WARM:
        _WARM[key] = build_pipeline(model_dir, o)
    return _WARM[key]


def warm_pipelines() -> int:
    """How many pipelines this process holds warm (each one was built once)."""
    return len(_WARM)
