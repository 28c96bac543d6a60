"""The GPU side (skipped where CUDA is absent): object-store weights copied to the device once,
in the compute dtype, and the engine generating on CUDA from them as SDXLPipeline does."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import ModelConfig
from shared.weights.loader import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_modules_land_on_the_device_in_the_compute_dtype(tiny_model_dir: Path) -> None:
    from shared.engine.modules import build_module

    unet_weights = load_model(ModelConfig(id="t", source=str(tiny_model_dir))).components["unet"]
    on_gpu = build_module(unet_weights, device="cuda", dtype=torch.float16)
    on_cpu = build_module(unet_weights)

    tensors = [*on_gpu.parameters(), *on_gpu.buffers()]
    assert tensors and all(t.device.type == "cuda" for t in tensors)
    assert all(p.dtype == torch.float16 for p in on_gpu.parameters())
    expected = on_cpu.state_dict()
    for name, tensor in on_gpu.state_dict().items():
        assert torch.equal(tensor.cpu(), expected[name].to(tensor.dtype)), name


def test_engine_generates_on_cuda_from_object_store_components(tiny_model_dir: Path) -> None:
    from shared.api.jobs import DenoiseJob
    from shared.engine.build import build_engine, build_prompt_encoder

    components = load_model(
        ModelConfig(id="t", source=str(tiny_model_dir)), extra={"taesd": "taesd"}
    ).components
    engine = build_engine(components, "float16", "cuda")
    encoder = build_prompt_encoder(components, "float16", "cuda")
    for module in encoder.text_encoders:
        assert {(p.device.type, p.dtype) for p in module.parameters()} == {("cuda", torch.float16)}
    (embeddings,) = encoder.encode([("a photo of a cat", None)])
    (reference,) = build_prompt_encoder(components).encode([("a photo of a cat", None)])
    assert np.allclose(embeddings.prompt_embeds, reference.prompt_embeds, atol=1e-2)
    job = DenoiseJob(
        id="gpu",
        model="t",
        embeddings=embeddings,
        width=64,
        height=64,
        steps=4,
        guidance_scale=5.0,
        seeds=[1, 2],
        preview="tiny",
        created_at=time.time(),
    )
    events: list = []
    result = engine.run(job, events.append, lambda: False)

    assert len(events) == 4 and all(event.previews for event in events)
    seeds = [image.seed for image in result.images]
    encoded = [image.b64 for image in result.images]
    assert seeds == [1, 2] and encoded[0] != encoded[1]  # fp16 UNet, fp32 VAE: no NaN image
