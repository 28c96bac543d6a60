"""The built-in `tiny` SDXL: a real SDXL architecture with small deterministic random weights.

It is saved once in the diffusers folder layout (model_index.json, one folder per component,
safetensors weights), so everything after `resolve_builtin` loads it with exactly the code that
loads a real checkpoint folder. Besides the pipeline components it carries `taesd/`, a tiny
AutoencoderTiny used for cheap step previews (real models name a TAESD-XL checkpoint instead).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUILTIN_PRESETS = ("tiny", "small")
FORMAT_VERSION = "1"

# SDXL base 1.0's scheduler_config.json, so the tiny model steps through the same timesteps.
SDXL_SCHEDULER_CONFIG: dict[str, object] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}

# Words that get whole-word BPE merges, so ordinary prompts tokenize to words, not characters.
_COMMON_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "in",
    "on",
    "with",
    "at",
    "by",
    "for",
    "from",
    "to",
    "photo",
    "picture",
    "image",
    "painting",
    "portrait",
    "drawing",
    "illustration",
    "render",
    "cat",
    "dog",
    "bird",
    "horse",
    "fish",
    "tree",
    "flower",
    "forest",
    "mountain",
    "river",
    "sea",
    "ocean",
    "lake",
    "sky",
    "cloud",
    "sun",
    "moon",
    "star",
    "city",
    "street",
    "house",
    "castle",
    "car",
    "boat",
    "train",
    "robot",
    "man",
    "woman",
    "person",
    "child",
    "face",
    "eyes",
    "hair",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "pink",
    "black",
    "white",
    "gray",
    "golden",
    "silver",
    "dark",
    "light",
    "bright",
    "beautiful",
    "detailed",
    "realistic",
    "cinematic",
    "lighting",
    "style",
    "art",
    "digital",
    "oil",
    "watercolor",
    "sketch",
    "high",
    "quality",
    "resolution",
    "sharp",
    "focus",
    "background",
    "night",
    "day",
    "sunset",
    "sunrise",
    "winter",
    "summer",
    "autumn",
    "spring",
    "snow",
    "rain",
    "fog",
    "astronaut",
    "space",
    "planet",
    "dragon",
    "fantasy",
    "landscape",
    "old",
    "new",
    "small",
    "big",
    "tiny",
    "large",
    "riding",
    "wearing",
    "standing",
    "sitting",
    "flying",
    "running",
    "under",
    "over",
    "near",
    "inside",
    "outside",
    "very",
    "highly",
]


@dataclass(frozen=True)
class TinyPreset:
    """Dimensions of one built-in preset; `small` is large enough for cold-start benchmarks."""

    unet_channels: tuple[int, int]
    unet_layers: int
    text_hidden: int
    text_layers: int
    vae_channels: tuple[int, int, int, int]


PRESETS = {
    "tiny": TinyPreset(
        unet_channels=(32, 64),
        unet_layers=1,
        text_hidden=32,
        text_layers=2,
        vae_channels=(8, 16, 16, 16),
    ),
    "small": TinyPreset(
        unet_channels=(320, 640),
        unet_layers=2,
        text_hidden=512,
        text_layers=6,
        vae_channels=(64, 128, 128, 128),
    ),
}


def cache_root() -> Path:
    """Where built-in models are written: $DIFFUSION_SERVE_CACHE or ~/.cache/diffusion-serve."""
    root = os.environ.get("DIFFUSION_SERVE_CACHE") or Path.home() / ".cache" / "diffusion-serve"
    return Path(root) / "models"


def resolve_builtin(name: str, root: Path | None = None) -> Path:
    """Return the folder of built-in model `name`, building it on first use (atomically)."""
    if name not in PRESETS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(PRESETS)}")
    target = (root or cache_root()) / f"{name}-v{FORMAT_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_sdxl(staging, PRESETS[name])
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE (GPT-2, CLIP) uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return list(symbols.values())


def _bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in _COMMON_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = (pieces[0], pieces[1])
            joined = pieces[0] + pieces[1]
            if merge not in merges:
                merges.append(merge)
                vocab_list.append(joined)
            pieces = [joined, *pieces[2:]]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    return vocab, merges


def _tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def _text_config(preset: TinyPreset, vocab: dict[str, int], pad_token: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=preset.text_hidden,
        intermediate_size=preset.text_hidden * 4,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=preset.text_hidden,
        hidden_act="gelu",
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab[pad_token],
    )


def build_sdxl(path: Path, preset: TinyPreset) -> None:
    """Build and save one preset under `path` (diffusers layout, safetensors, plus `taesd/`)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    vocab, merges = _bpe_vocab()
    hidden = preset.text_hidden
    time_dim = 8
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=preset.unet_channels,
        layers_per_block=preset.unet_layers,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + hidden,
        cross_attention_dim=2 * hidden,
        norm_num_groups=8,
    )
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=preset.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_config(preset, vocab, "<|endoftext|>"))
    torch.manual_seed(3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(preset, vocab, "!"))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_tokenizer(vocab, merges, "<|endoftext|>"),
        tokenizer_2=_tokenizer(vocab, merges, "!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    torch.manual_seed(4)
    taesd = AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )
    taesd.save_pretrained(path / "taesd", safe_serialization=True)
    (path / "diffusion_serve.json").write_text(
        json.dumps({"builtin": True, "version": FORMAT_VERSION})
    )
