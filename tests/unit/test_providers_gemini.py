"""Gemini client against the loopback fake: mapping, defensive answer parsing, errors, probe."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from shared.api.schemas import GenerateRequest
from shared.providers import (
    ContentFilteredError,
    ProviderAuthError,
    ProviderBadResponseError,
    ProviderError,
    ProviderRejectedError,
    ProviderUnsupportedError,
)
from shared.providers.gemini import model_resource
from tests.fakes import FakeProvider, Fault, start_fake
from tests.fakes.clients import fake_client

pytestmark = pytest.mark.anyio
MODEL = "gemini-2.5-flash-image"
PATH = f"/v1beta/models/{MODEL}:generateContent"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with start_fake("gemini") as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh(fake: FakeProvider) -> None:
    fake.reset()


def request(**fields: object) -> GenerateRequest:
    return GenerateRequest.model_validate({"model": MODEL, "prompt": "a teapot"} | fields)


async def test_request_and_answer_mapping(fake: FakeProvider) -> None:
    async with fake_client(fake) as client:
        result = await client.generate(request(width=1344, height=768, seed=5), "req-1")
    (call,) = fake.calls
    assert call.path == PATH
    assert call.headers["x-goog-api-key"] == fake.api_key
    assert "authorization" not in call.headers and "key=" not in call.path
    assert call.body == {
        "contents": [{"parts": [{"text": "a teapot"}]}],
        "generationConfig": {
            "responseModalities": ["IMAGE"],
            "imageConfig": {"aspectRatio": "16:9"},  # Gemini's own 16:9 size, 7:4 exactly
            "seed": 5,
        },
    }
    (image,) = result.images
    assert (image.format, image.width, image.height, image.seed) == ("png", 1024, 576, 5)
    assert (result.backend, result.id) == ("gemini", "req-1")


@pytest.mark.parametrize("configured", [MODEL, f"models/{MODEL}"])
async def test_the_model_path_is_the_same_with_or_without_the_models_prefix(
    fake: FakeProvider, configured: str
) -> None:
    async with fake_client(fake, models=[configured]) as client:
        result = await client.generate(request(model=configured), "r")
        report = await client.probe()
    generate, info = fake.calls
    assert generate.path == PATH, "models/x is sent as models/x, not models%2Fx"
    assert info.path == f"/v1beta/models/{MODEL}"
    assert len(result.images) == 1 and report["models"] == {configured: "available"}


@pytest.mark.parametrize(
    ("configured", "resource"),
    [
        ("tunedModels/my-tune", "tunedModels/my-tune"),
        ("gemini-x", "models/gemini-x"),
        ("odd/../name", "models/odd%2F..%2Fname"),
    ],
)
def test_model_resources_follow_the_sdks_rules(configured: str, resource: str) -> None:
    assert model_resource(configured) == resource


async def test_no_size_sends_no_image_config(fake: FakeProvider) -> None:
    async with fake_client(fake, gemini={"response_modalities": ["TEXT", "IMAGE"]}) as client:
        result = await client.generate(request(), "r")
    config = fake.calls[0].body["generationConfig"]
    assert config == {"responseModalities": ["TEXT", "IMAGE"]}
    assert len(result.images) == 1, "the text part next to the image is ignored"


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"width": 1000, "height": 600}, "width"), ({"n": 2}, "n"), ({"seed": 2**40}, "seed")],
)
async def test_what_gemini_cannot_do_is_refused_before_any_call(
    fake: FakeProvider, fields: dict[str, object], param: str
) -> None:
    async with fake_client(fake) as client:
        with pytest.raises(ProviderUnsupportedError) as caught:
            await client.generate(request(**fields), "r")
    assert caught.value.param == param and caught.value.status == 400
    assert fake.calls == []


@pytest.mark.parametrize("fault", ["data_uri", "snake_case"])
async def test_image_encodings_a_defensive_parser_accepts(fake: FakeProvider, fault: str) -> None:
    fake.inject(Fault.special(fault))
    async with fake_client(fake) as client:
        result = await client.generate(request(), "r")
    assert (result.images[0].format, result.images[0].width) == ("png", 64)


@pytest.mark.parametrize(
    ("fault", "error", "match"),
    [
        (Fault.special("text_only", "I cannot draw teapots."), ProviderRejectedError, "teapots"),
        (Fault.special("finish_reason", "SAFETY"), ContentFilteredError, "SAFETY"),
        (Fault.content_filter(), ContentFilteredError, "IMAGE_SAFETY"),
        (Fault.special("prompt_blocked"), ContentFilteredError, "PROHIBITED_CONTENT"),
        (Fault.special("finish_reason", "MAX_TOKENS"), ProviderBadResponseError, "MAX_TOKENS"),
    ],
)
async def test_answers_without_an_image_say_why(
    fake: FakeProvider, fault: Fault, error: type[ProviderError], match: str
) -> None:
    fake.inject(fault)
    async with fake_client(fake) as client:
        with pytest.raises(error, match=match):
            await client.generate(request(), "r")
    assert len(fake.calls) == 1


async def test_text_only_model_answers_provider_rejected(fake: FakeProvider) -> None:
    async with fake_client(fake, models=[MODEL, "gemini-2.5-flash"]) as client:
        with pytest.raises(ProviderRejectedError, match="text instead of an image") as caught:
            await client.generate(request(model="gemini-2.5-flash"), "r")
    assert caught.value.code == "provider_rejected" and caught.value.status == 422


async def test_a_wrong_key_is_auth_although_gemini_says_400(fake: FakeProvider) -> None:
    async with fake_client(fake, api_key="AIzaWRONGwrongWRONGwrong") as client:
        with pytest.raises(ProviderAuthError, match="API_KEY_INVALID") as caught:
            await client.generate(request(), "r")
    assert "AIza" not in caught.value.message
    assert len(fake.calls) == 1


async def test_unknown_fields_are_rejected_like_the_real_api(fake: FakeProvider) -> None:
    async with fake_client(fake, gemini={"aspect_ratios": ["1:1", "7:5"]}) as client:
        with pytest.raises(ProviderRejectedError, match="Unsupported aspect ratio: 7:5"):
            await client.generate(request(width=1400, height=1000), "r")


async def test_retry_delay_in_the_429_body_is_honoured(fake: FakeProvider) -> None:
    fake.inject(Fault.rate_limit(retry_after="0.3"))
    async with fake_client(fake) as client:
        await client.generate(request(), "r")
    first, second = fake.calls
    assert second.at - first.at >= 0.3


async def test_probe_reads_model_info(fake: FakeProvider) -> None:
    async with fake_client(fake, models=[MODEL, "gemini-9-ultra"]) as client:
        started = time.monotonic()
        report = await client.probe()
    assert report["models"] == {MODEL: "available", "gemini-9-ultra": "unsupported"}
    assert report["status"] == "degraded"
    assert time.monotonic() - started < 2
