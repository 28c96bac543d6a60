"""IP-Adapter in the UNet (shared/engine/ip_adapter.py, build.py): attached from object-store
weights it equals diffusers' `load_ip_adapter`; per-row scales let one UNet call serve requests
with different image prompt scales; fusing QKV keeps the adapter. On the built-in tiny models."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from shared.config import ModelConfig
from shared.engine.build import apply_fast_paths, build_engine, build_image_encoder
from shared.engine.ip_adapter import (
    IP_PROCESSORS,
    attach_ip_adapter,
    has_ip_adapter,
    image_embeds_dim,
    image_prompt_rows,
    set_row_scales,
)
from shared.engine.modules import build_module, build_state_dict
from shared.errors import ModelLoadError
from shared.weights.builtin import resolve_builtin
from shared.weights.loader import ComponentWeights, load_suite

ROWS = 3


@pytest.fixture(scope="module")
def components() -> dict[str, ComponentWeights]:
    config = ModelConfig(id="m", source="tiny", ip_adapter={"source": "tiny-ip-adapter"})
    return load_suite(config).components


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> StableDiffusionXLPipeline:
    """diffusers' own pipeline with the adapter, loaded the documented way."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    pipe.load_ip_adapter(
        str(resolve_builtin("tiny-ip-adapter")),
        subfolder="sdxl_models",
        weight_name="ip-adapter_sdxl.safetensors",
        image_encoder_folder="image_encoder",
    )
    return pipe


def _unet(components: dict[str, ComponentWeights], adapter: bool = True) -> Any:
    unet = build_module(components["unet"])
    if adapter:
        attach_ip_adapter(unet, build_state_dict(components["ip_adapter"]))
    return unet


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return {
        "sample": noise(ROWS, 4, 16, 16),
        "timestep": torch.tensor([10.0, 500.0, 900.0]),
        "encoder_hidden_states": noise(ROWS, 8, 64),
        "text_embeds": noise(ROWS, 32),
        "time_ids": noise(ROWS, 6),
        "image_embeds": noise(ROWS, 1, 32),
    }


def _call(unet: Any, inputs: dict[str, torch.Tensor], rows: slice = slice(None)) -> torch.Tensor:
    added = {"text_embeds": inputs["text_embeds"][rows], "time_ids": inputs["time_ids"][rows]}
    if has_ip_adapter(unet):
        added["image_embeds"] = [inputs["image_embeds"][rows]]
    with torch.no_grad():
        return unet(
            inputs["sample"][rows],
            inputs["timestep"][rows],
            inputs["encoder_hidden_states"][rows],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


def test_attached_adapter_equals_diffusers_load_ip_adapter(
    components: dict[str, ComponentWeights], pipe: StableDiffusionXLPipeline, inputs: Any
) -> None:
    unet = _unet(components)
    assert has_ip_adapter(unet) and not has_ip_adapter(_unet(components, adapter=False))
    assert image_embeds_dim(unet) == 32  # text_encoder_2's projection_dim: one CLIP space
    pipe.set_ip_adapter_scale(0.7)
    set_row_scales(unet, torch.full((ROWS,), 0.7))
    assert torch.equal(_call(unet, inputs), _call(pipe.unet, inputs))
    # The adapter's tensors are the object-store arrays, like the UNet's own.
    pointers = {blob.data.ctypes.data for blob in components["ip_adapter"].tensors.values()}
    adapter_params = [p for n, p in unet.named_parameters() if "_ip." in n or "hid_proj" in n]
    assert adapter_params and all(p.data_ptr() in pointers for p in adapter_params)


def test_per_row_scales_equal_one_call_per_scale(
    components: dict[str, ComponentWeights], inputs: Any
) -> None:
    unet, plain = _unet(components), _unet(components, adapter=False)
    scales = [0.7, 0.0, 1.0]
    set_row_scales(unet, torch.tensor(scales))
    batched = _call(unet, inputs)
    for row, scale in enumerate(scales):
        set_row_scales(unet, torch.tensor([scale]))
        alone = _call(unet, inputs, slice(row, row + 1))
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=0, atol=1e-5)
    # A row at scale 0 (a request without an image prompt) is the adapter-less UNet's.
    reference = _call(plain, inputs)
    torch.testing.assert_close(batched[1], reference[1], rtol=0, atol=1e-5)
    set_row_scales(unet, torch.zeros(ROWS))
    assert torch.equal(_call(unet, inputs), reference)  # all zero: diffusers skips the adapter


def test_tiny_adapter_visibly_steers_and_none_restores_the_default(
    components: dict[str, ComponentWeights], inputs: Any
) -> None:
    unet = _unet(components)
    without = _call(_unet(components, adapter=False), inputs)
    set_row_scales(unet, torch.ones(ROWS))
    full = _call(unet, inputs)
    assert (full - without).abs().mean() > 0.1 * without.abs().mean()
    set_row_scales(unet, torch.tensor([0.2, 0.5, 0.9]))
    set_row_scales(unet, None)  # diffusers' default scale, 1.0
    assert torch.equal(_call(unet, inputs), full)
    assert all(
        p.scale == [1.0] for p in unet.attn_processors.values() if isinstance(p, IP_PROCESSORS)
    )


def test_fused_qkv_keeps_the_adapter(components: dict[str, ComponentWeights], inputs: Any) -> None:
    unet = _unet(components)
    set_row_scales(unet, torch.tensor([0.7, 0.0, 1.0]))
    reference = _call(unet, inputs)
    fused = apply_fast_paths(unet, fuse_qkv=True)
    processors = fused.attn_processors
    cross = [p for name, p in processors.items() if name.endswith("attn2.processor")]
    assert cross and all(isinstance(p, IP_PROCESSORS) for p in cross)
    assert all(
        type(p).__name__ == "FusedAttnProcessor2_0" for n, p in processors.items() if "attn1" in n
    )
    torch.testing.assert_close(_call(fused, inputs), reference, rtol=0, atol=1e-5)


def test_image_prompt_rows_follow_diffusers_layout(
    components: dict[str, ComponentWeights], pipe: StableDiffusionXLPipeline
) -> None:
    image = Image.fromarray((np.random.default_rng(1).random((48, 40, 3)) * 255).astype(np.uint8))
    encoder = build_image_encoder(components)
    assert encoder is not None
    embedding = torch.from_numpy(encoder.encode([np.asarray(image)]))
    for cfg in (True, False):
        (theirs,) = pipe.prepare_ip_adapter_image_embeds(image, None, "cpu", 2, cfg)
        embeds, scales = image_prompt_rows(embedding, 0.6, images=2, cfg=cfg, dim=32)
        torch.testing.assert_close(embeds, theirs, rtol=0, atol=1e-6)
        assert scales.tolist() == pytest.approx([0.6] * len(theirs))
    embeds, scales = image_prompt_rows(None, 0.6, images=2, cfg=True, dim=32)
    assert embeds.shape == (4, 1, 32) and not embeds.any() and not scales.any()


def test_build_engine_attaches_the_adapter(components: dict[str, ComponentWeights]) -> None:
    engine = build_engine(components, "float32", "cpu", {"fuse_qkv": True})
    assert has_ip_adapter(engine.unet)
    without = {k: v for k, v in components.items() if k != "ip_adapter"}
    assert not has_ip_adapter(build_engine(without, "float32", "cpu").unet)


def test_plus_adapters_and_mismatched_adapters_are_refused(
    components: dict[str, ComponentWeights],
) -> None:
    state = build_state_dict(components["ip_adapter"])
    plus = {k: v for k, v in state.items() if not k.startswith("image_proj.")}
    plus["image_proj.latents"] = torch.zeros(1, 16, 64)
    with pytest.raises(ModelLoadError) as info:
        attach_ip_adapter(_unet(components, adapter=False), plus)
    assert info.value.code == "unsupported_model"
    short = {k: v for k, v in state.items() if not k.startswith("ip_adapter.15.")}
    with pytest.raises(ModelLoadError) as info:
        attach_ip_adapter(_unet(components, adapter=False), short)
    assert info.value.code == "weights_mismatch"
    wrong = copy.copy(state)
    wrong["ip_adapter.1.to_k_ip.weight"] = torch.zeros(3, 3)
    with pytest.raises(ModelLoadError) as info:
        attach_ip_adapter(_unet(components, adapter=False), wrong)
    assert info.value.code == "weights_mismatch"
