"""The embedded default checkpoint: small models with the real FLUX Fill / Redux architectures.

No weights can be downloaded, so the workbench builds its own checkpoint in the exact folder layout
of the public snapshots (``FLUX.1-Fill-dev/`` and ``FLUX.1-Redux-dev/``, diffusers layout, safetensors
only). Every loader in ``tryon_lab`` reads this folder exactly as it would read a real snapshot, so
pointing ``TRYON_LAB_MODELS`` at real weights changes nothing else.

Two flavours: ``random``, deterministic random weights from a seed, built on first use into a cache folder
(tests and shape-only runs); ``trained``, the committed toy try-on model (``checkpoints/toy-tryon``) trained by
``scripts/train_default_model.py``, the default when present.

Identity is a fingerprint: sha256 over every config and weight file (per-file hashes cached by size
and mtime, so re-fingerprinting 24 GB of real weights is instant after the first time).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .provenance import CARD_FILE, CONFIG_FILE, REPO_ROOT, cache_dir, fingerprint

TRAINED_DIR = REPO_ROOT / "checkpoints" / "toy-tryon"
FILL_SUBDIR = "FLUX.1-Fill-dev"
REDUX_SUBDIR = "FLUX.1-Redux-dev"
FLUX_TEXT_TOKENS = 512  # FLUX.1 [dev]'s T5 length, which the stock pipelines' Redux call always pads to
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# The fixed task prompt of in-context try-on (one prompt for every request: it is encoded once).
TRYON_PROMPT = (
    "The pair of images highlights a clothing and its styling on a model, high resolution, 4K, 8K; "
    "[IMAGE1] Detailed product shot of a clothing; "
    "[IMAGE2] The same cloth is worn by a model in a lifestyle setting."
)


@dataclass
class SmallModelConfig:
    """Scaled-down FLUX Fill + Redux: same block structure, fewer/narrower blocks.

    The Fill transformer's ``in_channels`` follows from the VAE: packed noise latents (4 * latent
    channels) + packed masked-image latents (same) + packed mask (4 * vae_scale_factor**2).
    """

    seed: int = 0
    num_layers: int = 2  # double-stream blocks (19 in FLUX.1)
    num_single_layers: int = 4  # single-stream blocks (38 in FLUX.1)
    num_attention_heads: int = 4
    attention_head_dim: int = 64
    axes_dims_rope: tuple[int, int, int] = (8, 28, 28)  # sums to attention_head_dim, like (16, 56, 56)
    joint_attention_dim: int = 256  # T5 width (4096 in FLUX.1)
    pooled_projection_dim: int = 64  # CLIP width (768 in FLUX.1)
    latent_channels: int = 16
    vae_block_out_channels: tuple[int, ...] = (32, 64, 64, 64)  # 4 levels -> 8x down, like FLUX
    vae_layers_per_block: int = 1
    vae_norm_num_groups: int = 32
    siglip_hidden: int = 64
    siglip_layers: int = 2
    siglip_image_size: int = 64
    siglip_patch: int = 8  # (64/8)^2 = 64 Redux image tokens (729 in FLUX.1 Redux)
    t5_layers: int = 2
    clip_layers: int = 2
    text_tokens: int = FLUX_TEXT_TOKENS  # T5 tokens the prompt is padded to; the text-embedding caches hold as many
    extra: dict = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def fill_in_channels(self) -> int:
        return 4 * self.latent_channels * 2 + 4 * self.vae_scale_factor**2


# --------------------------------------------------------------------------- configs


def transformer_config(cfg: SmallModelConfig) -> dict:
    return dict(
        patch_size=1,
        in_channels=cfg.fill_in_channels,
        out_channels=4 * cfg.latent_channels,
        num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.joint_attention_dim,
        pooled_projection_dim=cfg.pooled_projection_dim,
        guidance_embeds=True,
        axes_dims_rope=list(cfg.axes_dims_rope),
    )


def vae_config(cfg: SmallModelConfig) -> dict:
    n = len(cfg.vae_block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=cfg.latent_channels,
        block_out_channels=list(cfg.vae_block_out_channels),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=cfg.vae_layers_per_block,
        norm_num_groups=cfg.vae_norm_num_groups,
        act_fn="silu",
        mid_block_add_attention=True,
        force_upcast=True,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=256,
    )


SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


# --------------------------------------------------------------------------- tokenizers

_WORDS = (
    "the pair of images highlights a clothing and its styling on model high resolution 4k 8k "
    "[image1] [image2] detailed product shot same cloth is worn by in lifestyle setting shirt dress "
    "jacket t-shirt logo person garment photo red green blue white black striped checked , ; ."
).split()


def _clip_bpe_tokenizer():
    """A tiny byte-pair tokenizer built locally (CLIP's tokenizer is BPE), deterministically.

    Merges spell each prompt word left to right, so every word of the prompt is one token.
    (The ``tokenizers`` BPE trainer is not deterministic across processes, so it is not used.)
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    specials = ["<|startoftext|>", "<|endoftext|>", "<|unk|>"]
    words = sorted({w.lower() for w in _WORDS + TRYON_PROMPT.split()})
    chars = sorted(set("".join(words)))
    vocab = {t: i for i, t in enumerate(specials + chars + [c + "</w>" for c in chars])}
    merges: list[tuple[str, str]] = []
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                merges.append((left, right))
            left = left + right
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<|unk|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def build_tokenizers(out_root: Path) -> tuple[int, int]:
    """Write a CLIP and a T5 tokenizer (fast, tokenizer.json) into ``tokenizer/`` and ``tokenizer_2/``."""
    from tokenizers import processors
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip_tok = _clip_bpe_tokenizer()
    bos, eos = clip_tok.token_to_id("<|startoftext|>"), clip_tok.token_to_id("<|endoftext|>")
    clip_tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
    )
    clip = CLIPTokenizer(
        tokenizer_object=clip_tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|unk|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    clip.save_pretrained(out_root / "tokenizer")
    n_clip = clip_tok.get_vocab_size()

    # T5's tokenizer is a Unigram model over "▁"-prefixed pieces (sentencepiece style).
    words = sorted(set(_WORDS) | set(TRYON_PROMPT.split()))
    chars = sorted(set("".join(words)))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in chars]
    t5 = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    t5.save_pretrained(out_root / "tokenizer_2")
    return n_clip, len(vocab)


def t5_vocab_size() -> int:
    words = set(_WORDS) | set(TRYON_PROMPT.split())
    return 4 + len(words) + len(set("".join(words)))


# --------------------------------------------------------------------------- factory


def build_models(cfg: SmallModelConfig) -> dict[str, torch.nn.Module]:
    """Instantiate every model with deterministic random weights (float32)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        T5Config,
        T5EncoderModel,
    )

    n_clip_vocab, n_t5_vocab = _clip_bpe_tokenizer().get_vocab_size(), t5_vocab_size()
    torch.manual_seed(cfg.seed)
    models: dict[str, torch.nn.Module] = {}
    models["transformer"] = FluxTransformer2DModel(**transformer_config(cfg))
    models["vae"] = AutoencoderKL(**vae_config(cfg))
    models["text_encoder"] = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=n_clip_vocab, hidden_size=cfg.pooled_projection_dim, intermediate_size=2 * cfg.pooled_projection_dim,
            num_hidden_layers=cfg.clip_layers, num_attention_heads=2, max_position_embeddings=77,
            bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=cfg.pooled_projection_dim,
        )
    )
    models["text_encoder_2"] = T5EncoderModel(
        T5Config(
            vocab_size=n_t5_vocab, d_model=cfg.joint_attention_dim, d_kv=32, d_ff=2 * cfg.joint_attention_dim,
            num_layers=cfg.t5_layers, num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=0,
            eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False,
        )
    )
    models["image_encoder"] = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=cfg.siglip_hidden, intermediate_size=2 * cfg.siglip_hidden, num_hidden_layers=cfg.siglip_layers,
            num_attention_heads=2, image_size=cfg.siglip_image_size, patch_size=cfg.siglip_patch,
        )
    )
    models["image_embedder"] = ReduxImageEncoder(redux_dim=cfg.siglip_hidden, txt_in_features=cfg.joint_attention_dim)
    for m in models.values():
        m.eval()
    return models


def save_checkpoint(models: dict[str, torch.nn.Module], cfg: SmallModelConfig, root: Path,
                    max_shard_size: str = "15MB") -> Path:
    """Write models in the public snapshots' layout: ``root/FLUX.1-Fill-dev`` and ``root/FLUX.1-Redux-dev``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxPriorReduxPipeline
    from transformers import CLIPTokenizer, SiglipImageProcessor, T5TokenizerFast

    root = Path(root)
    fill_dir, redux_dir = root / FILL_SUBDIR, root / REDUX_SUBDIR
    tok_dir = Path(tempfile.mkdtemp())
    try:
        build_tokenizers(tok_dir)
        fill = FluxFillPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
            vae=models["vae"],
            text_encoder=models["text_encoder"],
            tokenizer=CLIPTokenizer.from_pretrained(tok_dir / "tokenizer"),
            text_encoder_2=models["text_encoder_2"],
            tokenizer_2=T5TokenizerFast.from_pretrained(tok_dir / "tokenizer_2"),
            transformer=models["transformer"],
        )
        fill.save_pretrained(fill_dir, safe_serialization=True, max_shard_size=max_shard_size)
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    processor = SiglipImageProcessor(
        size={"height": cfg.siglip_image_size, "width": cfg.siglip_image_size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    redux = FluxPriorReduxPipeline(
        image_encoder=models["image_encoder"], feature_extractor=processor, image_embedder=models["image_embedder"]
    )
    redux.save_pretrained(redux_dir, safe_serialization=True, max_shard_size=max_shard_size)
    (root / CONFIG_FILE).write_text(json.dumps(_config_dict(cfg), indent=2, sort_keys=True))
    return root


def _config_dict(cfg: SmallModelConfig) -> dict:
    d = copy.deepcopy(cfg.__dict__)
    d["axes_dims_rope"] = list(cfg.axes_dims_rope)
    d["vae_block_out_channels"] = list(cfg.vae_block_out_channels)
    if d["text_tokens"] == FLUX_TEXT_TOKENS:  # as before the field existed: earlier models keep key and fingerprint
        del d["text_tokens"]
    return d


def random_checkpoint(cfg: SmallModelConfig | None = None, root: Path | None = None) -> Path:
    """The random-weights embedded checkpoint, built on first use (seconds on a CPU), then reused.

    Built into a temporary folder and renamed into place, so an interrupted build never leaves a
    half-written checkpoint that later runs would load.
    """
    cfg = cfg or SmallModelConfig()
    key = hashlib.sha256(json.dumps(_config_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    root = Path(root) if root else cache_dir() / f"embedded-random-{key}"
    if (root / CONFIG_FILE).exists():
        return root
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".building-"))
    save_checkpoint(build_models(cfg), cfg, tmp)
    try:
        tmp.rename(root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def text_tokens(model_dir: str | Path) -> int:
    """How many T5 tokens this model's prompt is padded to: its ``tryon_lab_config.json`` says, else FLUX's 512."""
    info = Path(model_dir) / CONFIG_FILE
    return json.loads(info.read_text()).get("text_tokens", FLUX_TEXT_TOKENS) if info.exists() else FLUX_TEXT_TOKENS


MODEL_CHOICES = (f"use model='default', 'trained', 'random' or a folder holding {FILL_SUBDIR}/ and {REDUX_SUBDIR}/ "
                 "(or set TRYON_LAB_MODELS to such a folder)")


class ModelFolderError(FileNotFoundError):
    """A model folder that does not exist or lacks a part the loaders need; the message names the path and the fix."""


def check_model_dir(model_dir: str | Path, layout: bool = True, origin: str = "") -> Path:
    """``model_dir`` as a Path if it is an existing folder (and, with ``layout``, holds both snapshots).

    Called first by every entry (``resolve_model_dir``, ``describe_model``, ``configure.build_pipeline``,
    ``loading.load_slim``/``load_standard``), so a bad path fails here and never inside diffusers.
    """
    path = Path(model_dir).expanduser()
    where = f"model folder {path}" + (f" ({origin})" if origin else "")
    if not path.exists():
        raise ModelFolderError(f"{where} does not exist; {MODEL_CHOICES}.")
    if not path.is_dir():
        raise ModelFolderError(f"{where} is a file, not a folder; {MODEL_CHOICES}.")
    if layout:
        missing = [s for s in (FILL_SUBDIR, REDUX_SUBDIR) if not (path / s).is_dir()]
        if missing:
            raise ModelFolderError(f"{where} has no {' or '.join(m + '/' for m in missing)} inside; {MODEL_CHOICES}.")
    return path


def default_model_dir() -> Path:
    """The model folder every notebook uses unless told otherwise.

    ``TRYON_LAB_MODELS`` (a folder holding ``FLUX.1-Fill-dev/`` and ``FLUX.1-Redux-dev/``, e.g. real
    snapshots) wins (a path that does not exist is an error naming it); then the committed trained toy
    model; then the random embedded default.
    """
    env = os.environ.get("TRYON_LAB_MODELS")
    if env:
        return check_model_dir(env, layout=False, origin="from TRYON_LAB_MODELS")
    if (TRAINED_DIR / FILL_SUBDIR / "model_index.json").exists():
        return TRAINED_DIR
    return random_checkpoint()


def resolve_model_dir(model: str | Path | None) -> Path:
    """Map a notebook's ``model`` parameter to a folder: ``default``/None, ``random``, ``trained`` or a path.

    A folder that does not exist is a ``ModelFolderError`` here, naming the path and the choices (the
    snapshot layout inside it is checked by the loaders, which name the missing part).
    """
    if model in (None, "", "default"):
        return default_model_dir()
    if model == "random":
        return random_checkpoint()
    if model == "trained":
        return check_model_dir(TRAINED_DIR, layout=False, origin="the committed trained model; "
                               "train it with `python scripts/train_default_model.py`")
    return check_model_dir(model, layout=False)


def describe_model(model_dir: Path, model_fingerprint: str | None = None) -> str:
    """One line saying which model a number came from (pass a known fingerprint to skip re-hashing).

    Without a fingerprint the folder is checked first: a missing folder, or one without the snapshots, is a
    ``ModelFolderError`` (never a line with the fingerprint of nothing).
    """
    model_dir = Path(model_dir) if model_fingerprint else check_model_dir(model_dir)
    info = model_dir / CONFIG_FILE
    if model_dir.resolve() == TRAINED_DIR.resolve():
        kind = "trained toy try-on model (committed)"
    elif (model_dir / CARD_FILE).exists():  # assembled by the trainer elsewhere: trained, but not the committed one
        kind = "trained toy try-on model (not committed)"
    elif info.exists():
        kind = "embedded default with random weights"
    else:
        kind = "external weights"
    fp = model_fingerprint or fingerprint(model_dir)
    return f"{kind} at {model_dir} [fingerprint {fp[:16]}]"
