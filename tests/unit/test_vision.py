"""CLIP image embeddings (shared/engine/vision.py, modules.py, build.py): the vision encoder and
its image processor built from object-store weights give diffusers' `encode_image`, zero-copy;
text embeddings from the prompt encoder share the space. On the built-in tiny models."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from shared.config import ModelConfig
from shared.engine.build import build_image_encoder, build_prompt_encoder
from shared.engine.modules import build_image_processor, build_module
from shared.errors import InvalidRequestError
from shared.weights.builtin import IP_ADAPTER_IMAGE_ENCODER, resolve_builtin
from shared.weights.loader import ComponentWeights, load_suite


@pytest.fixture(scope="module")
def components() -> dict[str, ComponentWeights]:
    config = ModelConfig(id="m", source="tiny", ip_adapter={"source": "tiny-ip-adapter"})
    return load_suite(config).components


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> StableDiffusionXLPipeline:
    folder = resolve_builtin("tiny-ip-adapter") / IP_ADAPTER_IMAGE_ENCODER
    return StableDiffusionXLPipeline.from_pretrained(
        tiny_model_dir,
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(folder),
        feature_extractor=CLIPImageProcessor.from_pretrained(folder),
    )


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (48, 80), (101, 37)]  # square, wide, tall and odd: resize + crop paths
    return [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in sizes]


def test_encode_equals_diffusers_encode_image(
    components: dict[str, ComponentWeights], pipe: StableDiffusionXLPipeline
) -> None:
    encoder = build_image_encoder(components)
    assert encoder is not None and encoder.dim == 32
    images = _images()
    ours = encoder.encode(images)  # one batch
    assert ours.dtype == np.float32 and ours.shape == (len(images), 32)
    for row, image in enumerate(images):
        with torch.no_grad():
            theirs, negative = pipe.encode_image(Image.fromarray(image), "cpu", 1)
        np.testing.assert_allclose(ours[row : row + 1], theirs.numpy(), rtol=0, atol=1e-5)
        assert not negative.any()  # diffusers' negative image embedding: zeros
    assert encoder.encode([]).shape == (0, 32)


def test_vision_encoder_builds_zero_copy_like_from_pretrained(
    components: dict[str, ComponentWeights], pipe: StableDiffusionXLPipeline
) -> None:
    weights = components["image_encoder"]
    assert (weights.library, weights.class_name) == (
        "transformers",
        "CLIPVisionModelWithProjection",
    )
    module = build_module(weights)
    state = module.state_dict()
    assert all(state[k].data_ptr() == b.data.ctypes.data for k, b in weights.tensors.items())
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(module(pixels).image_embeds, pipe.image_encoder(pixels).image_embeds)


def test_processor_without_config_is_the_one_diffusers_makes(
    components: dict[str, ComponentWeights], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # h94/IP-Adapter's image_encoder folders have no preprocessor_config.json: diffusers'
    # load_ip_adapter then makes CLIPImageProcessor(size=..., crop_size=...) at the encoder's
    # own image_size; ours must do the same.
    adapter = tmp_path / "adapter"
    shutil.copytree(resolve_builtin("tiny-ip-adapter"), adapter)
    (adapter / IP_ADAPTER_IMAGE_ENCODER / "preprocessor_config.json").unlink()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    pipe.load_ip_adapter(
        str(adapter),
        "sdxl_models",
        "ip-adapter_sdxl.safetensors",
        image_encoder_folder="image_encoder",
    )
    bare = copy.copy(components["image_encoder"])
    bare.files = {}
    ours = build_image_processor(bare)
    image = Image.fromarray(_images()[2])
    theirs = pipe.feature_extractor(image, return_tensors="pt").pixel_values
    assert torch.equal(ours(image, return_tensors="pt").pixel_values, theirs)
    assert theirs.shape[-2:] == (32, 32)


def test_no_image_encoder_without_an_adapter(tiny_model_dir: Path) -> None:
    components = load_suite(ModelConfig(id="m", source="tiny")).components
    assert "image_encoder" not in components and build_image_encoder(components) is None


def test_text_embeddings_are_the_pooled_prompt_embeddings(
    components: dict[str, ComponentWeights],
) -> None:
    encoder = build_prompt_encoder(components)
    texts = ["a photo of a cat", "a red car", "a photo of a cat"]
    embedded = encoder.embed(texts)
    for text, vector in zip(texts, embedded, strict=True):
        assert isinstance(vector, np.ndarray) and vector.shape == (32,)
        (pair,) = encoder.encode([(text, None)])
        assert not isinstance(pair, InvalidRequestError)
        # Within rounding: the two calls batch different texts together.
        np.testing.assert_allclose(vector, pair.pooled_prompt_embeds[0], rtol=0, atol=1e-6)
    long_text = " ".join(["cat"] * 80)
    ok, error = encoder.embed(["a dog", long_text])
    assert isinstance(ok, np.ndarray)
    assert isinstance(error, InvalidRequestError)
    assert (error.code, error.param) == ("prompt_too_long", "input") and "77" in error.message
