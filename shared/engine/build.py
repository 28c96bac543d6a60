"""Engines built from object-store components: zero-copy views on CPU, one copy on a GPU.

The deployments that own a model call these from their worker threads, so torch and diffusers
are imported only in those replicas.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

from shared.config import CONTROLNET_PREFIX, LORA_PREFIX
from shared.engine.ip_adapter import attach_ip_adapter, has_ip_adapter
from shared.engine.modules import (
    build_image_processor,
    build_module,
    build_scheduler_config,
    build_state_dict,
    build_tokenizer,
)
from shared.engine.prompts import PromptEncoder
from shared.engine.sdxl import SDXLEngine
from shared.engine.vision import ImageEncoder
from shared.weights.loader import ComponentWeights


def build_engine(
    components: dict[str, ComponentWeights],
    dtype_name: str,
    device: str,
    fast_paths: dict[str, bool] | None = None,
) -> SDXLEngine:
    """UNet in the model's dtype with its IP-Adapter (if the model has one) and the given fast
    paths, its LoRAs, ControlNets and refiner (a UNet in the same dtype); the VAE (and TAESD)
    decode in float32."""
    dtype = getattr(torch, dtype_name)
    taesd = components.get("taesd")
    unet = build_module(components["unet"], device=device, dtype=dtype)
    if "ip_adapter" in components:
        # Before the fast paths: the adapter replaces the UNet's attention processors, and
        # fusing must know which of them are the adapter's.
        attach_ip_adapter(unet, build_state_dict(components["ip_adapter"], device, dtype))
    loras: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
        name.removeprefix(LORA_PREFIX): partial(build_state_dict, weights, device, dtype)
        for name, weights in components.items()
        if name.startswith(LORA_PREFIX)
    }
    controlnets = {
        name.removeprefix(CONTROLNET_PREFIX): build_module(weights, device=device, dtype=dtype)
        for name, weights in components.items()
        if name.startswith(CONTROLNET_PREFIX)
    }
    paths = dict(fast_paths or {})
    if loras:
        # LoRAs target to_q/to_k/to_v, which fusing replaces with one projection.
        paths["fuse_qkv"] = False
    refiner = components.get("refiner_unet")
    refiner_unet = build_module(refiner, device=device, dtype=dtype) if refiner else None
    return SDXLEngine(
        unet=apply_fast_paths(unet, **paths),
        vae=build_module(components["vae"], device=device, dtype=torch.float32),
        scheduler_config=build_scheduler_config(components["scheduler"]),
        preview_decoder=build_module(taesd, device=device, dtype=torch.float32) if taesd else None,
        device=device,
        dtype=dtype,
        loras=loras,
        controlnets=controlnets,
        refiner_unet=apply_fast_paths(refiner_unet, **paths) if refiner_unet else None,
        refiner_scheduler_config=(
            build_scheduler_config(components["refiner_scheduler"]) if refiner_unet else None
        ),
    )


def apply_fast_paths(
    unet: torch.nn.Module, channels_last: bool = False, fuse_qkv: bool = False
) -> torch.nn.Module:
    """The UNet with channels-last memory format and/or fused QKV projections (see
    `shared.config.EngineConfig`); the pixels stay those of the plain module."""
    if fuse_qkv and has_ip_adapter(unet):
        _fuse_self_attention(unet)
    elif fuse_qkv:
        unet.fuse_qkv_projections()
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    return unet


def _fuse_self_attention(unet: torch.nn.Module) -> None:
    """Fuse only the self-attention projections of a UNet with an IP-Adapter.

    `fuse_qkv_projections` sets FusedAttnProcessor2_0 on every attention layer, which would
    silently drop the adapter's processors from the cross-attention layers (and with them the
    image prompt). Self-attention, where fusing pays off most (q, k and v share one input), is
    fused the same way; cross-attention keeps the adapter's processors and unfused k/v.
    """
    for module in unet.modules():
        if isinstance(module, Attention) and not module.is_cross_attention:
            module.fuse_projections(fuse=True)
            module.set_processor(FusedAttnProcessor2_0())


def build_prompt_encoder(
    components: dict[str, ComponentWeights], dtype_name: str = "float32", device: str = "cpu"
) -> PromptEncoder:
    """Both text encoders and tokenizers.

    On a GPU the encoders are copied once to the device in the model's compute dtype. On the CPU
    they compute in float32: fp32 weights stay zero-copy views, fp16/bf16 ones are upcast (a
    private copy, but half-precision matmuls on a CPU are several times slower).
    """
    dtype = torch.float32 if device == "cpu" else getattr(torch, dtype_name)
    return PromptEncoder(
        tokenizer=build_tokenizer(components["tokenizer"]),
        tokenizer_2=build_tokenizer(components["tokenizer_2"]),
        text_encoder=build_module(components["text_encoder"], device=device, dtype=dtype),
        text_encoder_2=build_module(components["text_encoder_2"], device=device, dtype=dtype),
        device=device,
    )


def build_image_encoder(
    components: dict[str, ComponentWeights], dtype_name: str = "float32", device: str = "cpu"
) -> ImageEncoder | None:
    """The model's CLIP vision encoder and image processor, or None when it has none (no
    IP-Adapter configured). Same dtype rule as `build_prompt_encoder`."""
    weights = components.get("image_encoder")
    if weights is None:
        return None
    dtype = torch.float32 if device == "cpu" else getattr(torch, dtype_name)
    return ImageEncoder(
        model=build_module(weights, device=device, dtype=dtype),
        processor=build_image_processor(weights),
        device=device,
        dtype=dtype,
    )
