"""The built-in tiny models: real architectures with small deterministic random weights.

`tiny`, `small` and `tiny-inpaint` are SDXL pipelines saved once in the diffusers folder layout
(model_index.json, one folder per component, safetensors weights), so everything after
`resolve_builtin` loads them with exactly the code that loads a real checkpoint folder. Besides the
pipeline components they carry `taesd/`, a tiny AutoencoderTiny used for cheap step previews (real
models name a TAESD-XL checkpoint instead). `tiny-inpaint` is `tiny` with a 9-channel UNet input
(latents, mask, masked-image latents), like SDXL's inpainting checkpoint.

`tiny-ip-adapter` is an IP-Adapter for `tiny` in the h94/IP-Adapter layout: a CLIP vision encoder
under `sdxl_models/image_encoder/` and the adapter's state dict in
`sdxl_models/ip-adapter_sdxl.safetensors`, as diffusers' `load_ip_adapter` reads them.

`tiny-lora` and `tiny-lora-kohya` are LoRAs for `tiny`'s UNet, one .safetensors file each, that
visibly change its outputs: `tiny-lora` in diffusers/PEFT keys on every attention projection,
saved by diffusers' `save_lora_weights`; `tiny-lora-kohya` in kohya/A1111 keys (with `.alpha`) on
the transformers' proj_in/proj_out and feed-forward layers. Both load with
`pipe.load_lora_weights(folder, weight_name=..., adapter_name=...)`.

`tiny-controlnet` is a diffusers `ControlNetModel` folder made from `tiny`'s UNet
(`ControlNetModel.from_unet`), with its zero-initialised output convolutions given random weights
so that it visibly steers. `tiny-refiner` is an SDXL refiner for `tiny` in the layout of
stabilityai/stable-diffusion-xl-refiner-1.0: `StableDiffusionXLImg2ImgPipeline` without text
encoder 1, `requires_aesthetics_score`, empty negatives encoded rather than zeroed, `tiny`'s text
encoder 2, tokenizer 2 and VAE, and a UNet of its own conditioned on encoder 2 alone with five time
ids (the aesthetic score in place of the target size).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from diffusers import UNet2DConditionModel

# Every built-in source name: the SDXL presets, then the adapters.
BUILTIN_PRESETS = (
    "tiny",
    "small",
    "tiny-inpaint",
    "tiny-ip-adapter",
    "tiny-lora",
    "tiny-lora-kohya",
    "tiny-controlnet",
    "tiny-refiner",
)
FORMAT_VERSION = "1"
# Written last into a built folder: a folder with it is complete.
_MARKER = "diffusion_serve.json"
# The IP-Adapter layout of h94/IP-Adapter's SDXL folder (IPAdapterConfig's defaults).
IP_ADAPTER_WEIGHTS = "sdxl_models/ip-adapter_sdxl.safetensors"
IP_ADAPTER_IMAGE_ENCODER = "sdxl_models/image_encoder"
_IP_IMAGE_SIZE = 32
# to_k_ip/to_v_ip get std 0.3 (default init: ~0.07) so that image prompts visibly steer the tiny
# UNet, whose random text path would otherwise drown them out.
_IP_WEIGHT_STD = 0.3
# The LoRAs' weight files: diffusers' default name, and a kohya-style one.
TINY_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TINY_LORA_KOHYA_WEIGHTS = "tiny_lora_kohya.safetensors"
_LORA_RANK = 4
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # tiny-lora: every attention projection
_KOHYA_TARGETS = ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")  # tiny-lora-kohya
# Up-projection std: large enough that each LoRA moves the UNet's output by ~20-40%, so a test
# sees its effect in the pixels (PEFT starts lora_B at zero, a no-op).
_LORA_UP_STD = 0.3

# A fresh ControlNet is a no-op: its output convolutions start at zero. With std 0.1 on them,
# tiny-controlnet moves the UNet's output by ~65%, and two different edge maps ~40% apart.
_CONTROLNET_STD = 0.1
_CONTROLNET_OUTPUTS = (
    "controlnet_down_blocks",
    "controlnet_mid_block",
    "controlnet_cond_embedding.conv_out",
)
# The conditioning embedding's other convolutions get std gain/sqrt(fan_in): with the default
# init the control map's signal fades over its 7 convolutions, so the map itself barely mattered.
_CONTROLNET_EMBEDDING = "controlnet_cond_embedding."
_CONTROLNET_EMBEDDING_GAIN = 2.0

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
    "a", "an", "the", "of", "and", "in", "on", "with", "at", "by", "for", "from", "to", "photo",
    "picture", "image", "painting", "portrait", "drawing", "illustration", "render", "cat", "dog",
    "bird", "horse", "fish", "tree", "flower", "forest", "mountain", "river", "sea", "ocean",
    "lake", "sky", "cloud", "sun", "moon", "star", "city", "street", "house", "castle", "car",
    "boat", "train", "robot", "man", "woman", "person", "child", "face", "eyes", "hair", "red",
    "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "gray", "golden",
    "silver", "dark", "light", "bright", "beautiful", "detailed", "realistic", "cinematic",
    "lighting", "style", "art", "digital", "oil", "watercolor", "sketch", "high", "quality",
    "resolution", "sharp", "focus", "background", "night", "day", "sunset", "sunrise", "winter",
    "summer", "autumn", "spring", "snow", "rain", "fog", "astronaut", "space", "planet", "dragon",
    "fantasy", "landscape", "old", "new", "small", "big", "tiny", "large", "riding", "wearing",
    "standing", "sitting", "flying", "running", "under", "over", "near", "inside", "outside",
    "very", "highly",
]  # fmt: skip


@dataclass(frozen=True)
class TinyPreset:
    """Dimensions of one built-in preset; `small` is large enough for cold-start benchmarks."""

    unet_channels: tuple[int, int]
    unet_layers: int
    text_hidden: int
    text_layers: int
    vae_channels: tuple[int, int, int, int]
    unet_in_channels: int = 4  # 9 for inpainting: latents + mask + masked-image latents


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
PRESETS["tiny-inpaint"] = replace(PRESETS["tiny"], unet_in_channels=9)


def cache_root() -> Path:
    """Where built-in models are written: $DIFFUSION_SERVE_CACHE or ~/.cache/diffusion-serve."""
    root = os.environ.get("DIFFUSION_SERVE_CACHE") or Path.home() / ".cache" / "diffusion-serve"
    return Path(root) / "models"


def resolve_builtin(name: str, root: Path | None = None) -> Path:
    """Return the folder of built-in model `name`, building it on first use (atomically)."""
    builders: dict[str, Callable[[Path], None]] = {
        **{preset: partial(build_sdxl, preset=PRESETS[preset]) for preset in PRESETS},
        "tiny-ip-adapter": build_ip_adapter,
        "tiny-lora": build_tiny_lora,
        "tiny-lora-kohya": build_tiny_lora_kohya,
        "tiny-controlnet": build_tiny_controlnet,
        "tiny-refiner": partial(build_tiny_refiner, root=root),
    }
    if name not in builders:
        raise ValueError(
            f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_PRESETS)}"
        )
    target = (root or cache_root()) / f"{name}-v{FORMAT_VERSION}"
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        builders[name](staging)
        _write_marker(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_marker(path: Path) -> None:
    (path / _MARKER).write_text(json.dumps({"builtin": True, "version": FORMAT_VERSION}))


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
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    vocab, merges = _bpe_vocab()
    unet = _unet(preset)
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
    inpaint = preset.unet_in_channels == 9
    pipeline_class = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline
    pipe = pipeline_class(
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


def _unet(preset: TinyPreset, refiner: bool = False) -> UNet2DConditionModel:
    """The preset's UNet, seeded so the same preset always has the same weights; `refiner`:
    the refiner's, conditioned on text encoder 2 alone (its hidden size, not both encoders')
    and on 5 time ids (the aesthetic score in place of the 2 target-size ones)."""
    import torch
    from diffusers import UNet2DConditionModel

    hidden, time_dim = preset.text_hidden, 8
    time_ids, context = (5, hidden) if refiner else (6, 2 * hidden)
    torch.manual_seed(10 if refiner else 0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=preset.unet_in_channels,
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
        projection_class_embeddings_input_dim=time_ids * time_dim + hidden,
        cross_attention_dim=context,
        norm_num_groups=8,
    )
    return unet


def build_ip_adapter(path: Path) -> None:
    """Build and save `tiny-ip-adapter` under `path`: an IP-Adapter (non-plus, 4 image tokens)
    for `tiny`, whose image embeddings share text_encoder_2's projection dimension."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    tiny = PRESETS["tiny"]
    embed_dim = tiny.text_hidden  # text_encoder_2's projection_dim: one CLIP space for both
    torch.manual_seed(5)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=_IP_IMAGE_SIZE,
            patch_size=8,
            projection_dim=embed_dim,
        )
    )
    folder = path / IP_ADAPTER_IMAGE_ENCODER
    encoder.save_pretrained(folder, safe_serialization=True)
    size = _IP_IMAGE_SIZE
    CLIPImageProcessor(size=size, crop_size=size).save_pretrained(folder)
    torch.manual_seed(6)
    cross_dim, tokens = 2 * tiny.text_hidden, 4
    state = {
        "image_proj.proj.weight": torch.randn(tokens * cross_dim, embed_dim) / embed_dim**0.5,
        "image_proj.proj.bias": torch.randn(tokens * cross_dim) * 0.1,
        "image_proj.norm.weight": 1 + torch.randn(cross_dim) * 0.1,
        "image_proj.norm.bias": torch.randn(cross_dim) * 0.1,
    }
    for key_id, (inner_dim, context_dim) in _cross_attention_layers(_unet(tiny)):
        for name in ("to_k_ip", "to_v_ip"):
            weight = torch.randn(inner_dim, context_dim) * _IP_WEIGHT_STD
            state[f"ip_adapter.{key_id}.{name}.weight"] = weight
    save_file(state, path / IP_ADAPTER_WEIGHTS)


def _cross_attention_layers(unet: torch.nn.Module) -> list[tuple[int, tuple[int, int]]]:
    """(key id, (inner dim, context dim)) of each cross-attention layer, numbered as diffusers'
    `_convert_ip_adapter_attn_to_diffusers` reads checkpoints: 1, 3, 5, ... in `attn_processors`
    order (the original IP-Adapter counted self-attention layers too, which took the even ids)."""
    layers = []
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attention = unet.get_submodule(name.removesuffix(".processor"))
            layers.append((key_id, (attention.to_k.out_features, attention.to_k.in_features)))
            key_id += 2
    return layers


def build_tiny_lora(path: Path) -> None:
    """Build `tiny-lora` under `path`: a PEFT LoRA (rank 4, alpha 4) on tiny's attention
    projections, saved exactly as diffusers' `save_lora_weights(unet_lora_layers=...)` does."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = _unet(PRESETS["tiny"])
    torch.manual_seed(7)  # lora_A's default init
    config = LoraConfig(r=_LORA_RANK, lora_alpha=_LORA_RANK, target_modules=list(_LORA_TARGETS))
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * _LORA_UP_STD)
    StableDiffusionXLPipeline.save_lora_weights(
        path, unet_lora_layers=get_peft_model_state_dict(unet), weight_name=TINY_LORA_WEIGHTS
    )


def build_tiny_lora_kohya(path: Path) -> None:
    """Build `tiny-lora-kohya` under `path`: kohya/A1111 keys
    (`lora_unet_<module path with underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`)
    on the transformers' proj_in/proj_out and feed-forward layers, rank 4 with alpha 2 (a 0.5
    scale, as kohya trains with alpha below the rank), tagged as sd-scripts tags its files."""
    import torch
    from safetensors.torch import save_file

    unet = _unet(PRESETS["tiny"])
    generator = torch.Generator().manual_seed(8)
    state: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(_KOHYA_TARGETS):
            key = "lora_unet_" + name.replace(".", "_")
            down = torch.randn(_LORA_RANK, module.in_features, generator=generator)
            state[f"{key}.lora_down.weight"] = down / module.in_features**0.5
            up = torch.randn(module.out_features, _LORA_RANK, generator=generator)
            state[f"{key}.lora_up.weight"] = up * _LORA_UP_STD
            state[f"{key}.alpha"] = torch.tensor(_LORA_RANK / 2)
    # One metadata entry: safetensors writes them in hash order, and the file's bytes (its
    # digest) must be the same on every build.
    metadata = {"ss_network_module": "networks.lora"}
    save_file(state, path / TINY_LORA_KOHYA_WEIGHTS, metadata=metadata)


def build_tiny_controlnet(path: Path) -> None:
    """Build `tiny-controlnet` under `path` (config.json + diffusion_pytorch_model.safetensors):
    `tiny`'s UNet as a ControlNet whose conditioning embedding downsamples 3 times, to the latent
    size of tiny's VAE (scale factor 8), with seeded random weights where a fresh one has zeros."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(9)
    controlnet = ControlNetModel.from_unet(
        _unet(PRESETS["tiny"]), conditioning_embedding_out_channels=(8, 8, 16, 16)
    )
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(_CONTROLNET_OUTPUTS):
                std = _CONTROLNET_STD
            elif name.startswith(_CONTROLNET_EMBEDDING) and name.endswith(".weight"):
                std = _CONTROLNET_EMBEDDING_GAIN / param[0].numel() ** 0.5
            else:
                continue
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    controlnet.save_pretrained(path, safe_serialization=True)


def build_tiny_refiner(path: Path, root: Path | None = None) -> None:
    """Build `tiny-refiner` under `path` from `tiny` (built first, under the same root)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    base = resolve_builtin("tiny", root)
    unet = _unet(PRESETS["tiny"], refiner=True)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2")
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=AutoencoderKL.from_pretrained(base / "vae"),
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=CLIPTokenizer.from_pretrained(base / "tokenizer_2"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
