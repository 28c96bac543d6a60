"""CLIP embeddings and OpenAI's image edits on the default app, through the official `openai` SDK
over real HTTP and through the handle API: the same text embeds the same twice, texts and images
share one space, edits equal our own inpainting request for the same inputs."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.serve.test_image_inputs import INIT, picture, png
from tests.serve.test_openai_api import decode

IMAGE = png(picture())


@pytest.fixture(scope="module")
def sdk(app_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key="not-checked", max_retries=0)


def test_embeddings_of_texts_and_images_share_one_space(sdk: openai.OpenAI) -> None:
    result = sdk.embeddings.create(model="tiny", input=["a red house", "a red house", IMAGE])
    vectors = [np.array(item.embedding) for item in result.data]
    assert [item.index for item in result.data] == [0, 1, 2]
    assert np.array_equal(vectors[0], vectors[1])
    assert len(vectors[0]) == len(vectors[2]) > 0
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
    assert not np.allclose(vectors[0], vectors[2])
    assert result.usage.prompt_tokens > 0 and result.model == "tiny"
    # Asked for explicitly, base64 comes back as the little-endian float32 bytes.
    packed = sdk.embeddings.create(model="tiny", input="a red house", encoding_format="base64")
    raw = base64.b64decode(str(packed.data[0].embedding))
    assert np.allclose(np.frombuffer(raw, dtype="<f4"), vectors[0], atol=1e-7)


def test_embeddings_refuse_images_for_a_model_without_a_vision_encoder(
    sdk: openai.OpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.embeddings.create(model="tiny-inpaint", input=[IMAGE])
    assert caught.value.code == "image_input_unsupported"
    text = sdk.embeddings.create(model="tiny-inpaint", input="a red house")
    assert len(text.data[0].embedding) > 0


def test_embeddings_through_the_handle_api(app_url: str, sdk: openai.OpenAI) -> None:
    from ray import serve

    from tests.serve.conftest import APP_NAME

    handle = serve.get_app_handle(APP_NAME)
    answer = handle.embeddings.remote({"model": "tiny", "input": "a red house"}).result(
        timeout_s=60
    )
    over_http = sdk.embeddings.create(model="tiny", input="a red house", encoding_format="float")
    assert np.allclose(answer.data[0].embedding, over_http.data[0].embedding)


def _rgba_with_hole() -> bytes:
    """The init picture with its right half fully transparent: OpenAI's "edit here"."""
    rgba = picture().convert("RGBA")
    alpha = np.full((64, 64), 255, dtype=np.uint8)
    alpha[:, 32:] = 0
    rgba.putalpha(Image.fromarray(alpha))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    return buffer.getvalue()


def test_edit_equals_our_inpainting_request(sdk: openai.OpenAI, client: httpx.Client) -> None:
    image = base64.b64decode(INIT.split(",", 1)[1])
    result = sdk.images.edit(
        model="tiny",
        image=("house.png", image, "image/png"),
        mask=("mask.png", _rgba_with_hole(), "image/png"),
        prompt="a red house in the forest",
        size="64x64",
        extra_body={"seed": 9, "steps": 6},
    )
    assert result.data is not None
    edited = np.asarray(decode(result.data[0].b64_json or ""))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    ours: dict[str, Any] = client.post(
        "/v1/generate",
        json={
            "model": "tiny",
            "prompt": "a red house in the forest",
            "width": 64,
            "height": 64,
            "seed": 9,
            "steps": 6,
            "init_image": INIT,
            "mask": png(Image.fromarray(mask)),
        },
    ).json()
    assert np.abs(edited.astype(int) - np.asarray(decode(ours["images"][0]["b64"]))).max() <= 1


def test_streamed_edit_sends_partial_images_then_the_result(sdk: openai.OpenAI) -> None:
    events = list(
        sdk.images.edit(
            model="tiny-inpaint",
            image=("house.png", _rgba_with_hole(), "image/png"),
            prompt="a red house",
            stream=True,
            partial_images=2,
        )
    )
    kinds = [event.type for event in events]
    assert kinds == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]


def test_edit_of_a_gif_is_refused_with_the_intake_code(sdk: openai.OpenAI) -> None:
    buffer = io.BytesIO()
    picture().save(buffer, format="GIF")
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.images.edit(model="tiny", image=("a.png", buffer.getvalue(), "image/png"), prompt="x")
    assert caught.value.status_code == 415
