"""Parasail client: capability probed from /v1/models, "unsupported" reported cleanly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared.api.schemas import GenerateRequest
from shared.providers import ProviderUnsupportedError
from tests.fakes import FakeProvider, ParasailFake, start_fake
from tests.fakes.clients import fake_client

pytestmark = pytest.mark.anyio
IMAGE_MODEL = "parasail-flux-schnell"
GENERATIONS = "/v1/images/generations"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def fake() -> Iterator[ParasailFake]:
    with start_fake("parasail") as fake:
        assert isinstance(fake, ParasailFake)
        yield fake


@pytest.fixture(autouse=True)
def _fresh(fake: ParasailFake) -> Iterator[None]:
    fake.reset()
    yield
    fake.images_enabled = True
    fake.models = list(ParasailFake.default_models)


def request(model: str = IMAGE_MODEL) -> GenerateRequest:
    return GenerateRequest(model=model, prompt="a paper crane", width=128, height=128)


async def test_supported_model_is_checked_once_then_generates(fake: ParasailFake) -> None:
    async with fake_client(fake) as client:
        first = await client.generate(request(), "r1")
        await client.generate(request(), "r2")
    assert [call.path for call in fake.calls] == ["/v1/models", GENERATIONS, GENERATIONS]
    assert fake.calls[1].headers["authorization"] == f"Bearer {fake.api_key}"
    assert "response_format" not in fake.calls[1].body
    assert (first.backend, first.images[0].width) == ("parasail", 128)


async def test_unlisted_model_is_reported_and_refused_without_an_image_call(
    fake: ParasailFake,
) -> None:
    fake.models = ["parasail-llama-33-70b-fp8"]  # this account has no image model
    async with fake_client(fake) as client:
        report = await client.probe()
        with pytest.raises(ProviderUnsupportedError, match="not in this account") as caught:
            await client.generate(request(), "r")
    assert report["status"] == "unsupported"
    assert report["models"] == {IMAGE_MODEL: "unsupported"}
    assert report["detail"] is None
    assert (caught.value.status, caught.value.code) == (400, "provider_unsupported")
    assert fake.calls_to(GENERATIONS) == []


async def test_missing_image_route_is_remembered_as_unsupported(fake: ParasailFake) -> None:
    fake.images_enabled = False
    async with fake_client(fake) as client:
        with pytest.raises(ProviderUnsupportedError, match="HTTP 404"):
            await client.generate(request(), "r1")
        with pytest.raises(ProviderUnsupportedError, match="image endpoint answered"):
            await client.generate(request(), "r2")
        report = await client.probe()
        assert client.breaker_state() == "closed"
    assert len(fake.calls_to(GENERATIONS)) == 1, "the second request failed fast and free"
    assert report["models"] == {IMAGE_MODEL: "unsupported"}


async def test_probe_of_an_unreachable_provider_reports_instead_of_raising() -> None:
    with start_fake("parasail") as gone:
        pass  # stopped: its port now refuses connections
    async with fake_client(gone) as client:
        report = await client.probe()
    assert (report["status"], report["kind"]) == ("unreachable", "parasail")
    assert report["models"] == {IMAGE_MODEL: "unknown"}
    assert "unreachable" in report["detail"]


async def test_probe_with_a_refused_key_reports_auth_failed(fake: FakeProvider) -> None:
    async with fake_client(fake, api_key="wrong-parasail-key") as client:
        report = await client.probe()
    assert report["status"] == "auth_failed"
    assert "wrong-parasail-key" not in str(report)
