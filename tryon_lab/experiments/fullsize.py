"""Full-size FLUX Fill + Redux with random weights, for timing on a GPU: the one builder every benchmark uses.

Shapes come from the published configs (``benchmarks/flux_fill_config.json``); weights are seeded random and
created directly in the target dtype on the device. Timings are real, outputs are not. ``tiny=True`` gives
the same structure at toy size, so the benchmark code runs on a CPU in seconds.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..checkpoint import SCHEDULER_CONFIG, SmallModelConfig, transformer_config, vae_config
from ..loading import SlimPipeline
from ..provenance import REPO_ROOT

CONFIG_FILE = REPO_ROOT / "benchmarks" / "flux_fill_config.json"
# published configs of the text encoders FLUX uses (google/t5-v1_1-xxl, openai/clip-vit-large-patch14): built
# only to make the stock pipeline's resident memory real; prompts are never encoded in the benchmarks
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
TINY = SmallModelConfig(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=32,
                        axes_dims_rope=(8, 12, 12), joint_attention_dim=64, pooled_projection_dim=32,
                        vae_block_out_channels=(32, 32, 32, 32))
TINY_REDUX = {"image_encoder": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                    image_size=16, patch_size=8, image_tokens=4),
              "image_embedder": dict(redux_dim=32, txt_in_features=64)}


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


@dataclass
class Shape:
    """What a benchmark builds: configs, the diptych size and the number of text tokens (T5 + Redux)."""

    device: str
    dtype: str
    transformer: dict
    vae: dict
    scheduler: dict
    height: int
    width: int
    text_tokens: int
    t5: dict
    clip: dict
    redux: dict = field(default_factory=dict)  # {"image_encoder": SigLIP config + image_tokens, "image_embedder"}

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def redux_tokens(self) -> int:
        """Redux image tokens among ``text_tokens`` (the rest are the cached T5 prompt's)."""
        return self.redux["image_encoder"]["image_tokens"] if self.redux else 0

    @property
    def image_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)

    def flops_per_step(self) -> float:
        """2 x multiply-adds of one transformer call: 12 d^2 per token per block (QKV, out, MLP) + attention."""
        c = self.transformer
        d = c["num_attention_heads"] * c["attention_head_dim"]
        n_img, n_txt = self.image_tokens, self.text_tokens
        seq = n_img + n_txt
        blocks = c["num_layers"] + c["num_single_layers"]
        macs = blocks * (12 * d * d * seq + 2 * seq * seq * d)
        macs += n_img * d * (c["in_channels"] + c["out_channels"]) + n_txt * c["joint_attention_dim"] * d
        return 2.0 * macs

    def describe(self) -> str:
        return (f"{self.height}x{self.width} ({self.image_tokens} image + {self.text_tokens} text tokens), "
                f"{self.dtype}, {self.flops_per_step() / 1e12:.1f} TFLOP/step")


def shape(tiny: bool = False, height: int = 768, width: int = 1024, text_tokens: int | None = None,
          config: str | Path = CONFIG_FILE, device: str | None = None) -> Shape:
    """Full-size FLUX Fill on CUDA in bf16 (the published configs), or the tiny model on the CPU in fp32."""
    if tiny:
        return Shape(device or "cpu", "float32", transformer_config(TINY), vae_config(TINY), dict(SCHEDULER_CONFIG),
                     64, 128, text_tokens or 12, dict(T5_XXL, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4),
                     dict(CLIP_L, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          projection_dim=32), TINY_REDUX)
    cfg = json.loads(Path(config).read_text())
    txt = cfg["text_embeddings"]["t5_prompt_embeds"][1] + cfg["redux"]["image_encoder"]["image_tokens"]
    return Shape(device or "cuda", "bfloat16", _strip(cfg["transformer"]), _strip(cfg["vae"]), _strip(cfg["scheduler"]),
                 height, width, text_tokens or txt, T5_XXL, CLIP_L,
                 {k: _strip(v) for k, v in cfg["redux"].items()})


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_fill(s: Shape, seed: int = 0):
    """diffusers ``FluxFillPipeline`` (transformer + VAE + scheduler, no text encoders) with seeded random weights."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxTransformer2DModel,
    )

    torch.manual_seed(seed)
    with torch.device(s.device), default_dtype(s.torch_dtype):
        transformer = FluxTransformer2DModel(**s.transformer).eval().requires_grad_(False)
        vae = AutoencoderKL(**s.vae).eval().requires_grad_(False)
    fill = FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**s.scheduler), vae=vae, transformer=transformer,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    fill.set_progress_bar_config(disable=True)
    return fill


def build_text_encoders(s: Shape) -> list[torch.nn.Module]:
    """T5-XXL and CLIP-L with random weights: what the stock pipeline keeps resident."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device(s.device), default_dtype(s.torch_dtype):
        return [T5EncoderModel(T5Config(**s.t5)).eval(), CLIPTextModel(CLIPTextConfig(**s.clip)).eval()]


def build_redux(s: Shape, seed: int = 0):
    """diffusers ``FluxPriorReduxPipeline`` image path (SigLIP encoder + ``ReduxImageEncoder``), seeded random weights."""
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    enc = {k: v for k, v in s.redux["image_encoder"].items() if k != "image_tokens"}
    torch.manual_seed(seed)
    with torch.device(s.device), default_dtype(s.torch_dtype):
        encoder = SiglipVisionModel(SiglipVisionConfig(**enc)).eval().requires_grad_(False)
        embedder = ReduxImageEncoder(**s.redux["image_embedder"]).eval().requires_grad_(False)
    side = enc["image_size"]
    redux = FluxPriorReduxPipeline(image_encoder=encoder, image_embedder=embedder,
                                   feature_extractor=SiglipImageProcessor(size={"height": side, "width": side}))
    redux.set_progress_bar_config(disable=True)
    return redux


def text_embeddings(s: Shape, seed: int = 0, redux: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (prompt_embeds, pooled): the cached T5 embeddings followed by the Redux tokens, as the slim path has;
    ``redux=True``: the T5 part only (a pipeline with a Redux model appends its tokens per request)."""
    g = torch.Generator().manual_seed(seed)
    tokens = s.text_tokens - (s.redux_tokens if redux else 0)
    pe = torch.randn(1, tokens, s.transformer["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, s.transformer["pooled_projection_dim"], generator=g)
    return pe.to(s.device, s.torch_dtype), pooled.to(s.device, s.torch_dtype)


def slim_pipeline(s: Shape, seed: int = 0, redux: bool = False) -> SlimPipeline:
    """A ``SlimPipeline`` over the random full-size Fill model, so ``configure.apply_options`` and ``pipeline``
    functions run on it exactly as on a loaded one. Without ``redux`` the Redux tokens are in the embeddings
    (``pipeline.denoise`` runs; ``pipeline.tryon`` needs ``redux=True``, which builds the Redux image path)."""
    fill = build_fill(s, seed)
    pe, pooled = text_embeddings(s, seed, redux)
    return SlimPipeline(fill, build_redux(s, seed) if redux else None, pe, pooled, Path("."), s.device, s.torch_dtype,
                        model_description=f"{'tiny' if s.height < 256 else 'full-size'} FLUX Fill shapes, random {s.dtype} weights (seed {seed}): "
                                          "timings are real, outputs are not")


def diptych_inputs(s: Shape, seed: int = 0) -> dict:
    """Keyword arguments for ``FluxFillPipeline.__call__``: a random diptych, a mask over the person half,
    the seeded embeddings, latent output."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (s.height // 8, s.width // 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((s.width, s.height))
    mask = np.zeros((s.height, s.width), np.uint8)
    mask[:, s.width // 2:] = 255
    pe, pooled = text_embeddings(s, seed)
    return dict(image=img, mask_image=Image.fromarray(mask, "L"), prompt_embeds=pe, pooled_prompt_embeds=pooled,
                height=s.height, width=s.width, guidance_scale=30.0, output_type="latent")
