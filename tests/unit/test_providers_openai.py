"""OpenAI Images client against the loopback fake: mapping, streaming, retries, breaker, secrets.

The fake's protocol fidelity is checked with the official `openai` SDK in `test_provider_sdks.py`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable, Iterator

import pytest

from shared.api.schemas import GenerateRequest, ResultEvent, StepEvent
from shared.providers import (
    ContentFilteredError,
    DeadlineExceededError,
    ProviderAuthError,
    ProviderBadResponseError,
    ProviderError,
    ProviderQuotaError,
    ProviderRateLimitedError,
    ProviderRejectedError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    ProviderUnsupportedError,
)
from tests.fakes import FakeProvider, Fault, start_fake
from tests.fakes.clients import fake_client

pytestmark = pytest.mark.anyio
GENERATIONS = "/v1/images/generations"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with start_fake("openai") as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh(fake: FakeProvider) -> None:
    fake.reset()


def request(model: str = "gpt-image-1", **fields: object) -> GenerateRequest:
    return GenerateRequest.model_validate(
        {"model": model, "prompt": "a lighthouse at dusk", "width": 64, "height": 48} | fields
    )


# -- mapping --------------------------------------------------------------------------------------


async def test_gpt_image_request_and_answer_mapping(fake: FakeProvider) -> None:
    options = {"quality": "low", "background": "opaque", "moderation": "low", "user": "svc-1"}
    async with fake_client(fake, openai=options) as client:
        result = await client.generate(
            request(n=2, output_format="webp", negative_prompt="fog", steps=9, seed=7), "req-1"
        )
    (call,) = fake.calls_to(GENERATIONS)
    assert call.headers["authorization"] == f"Bearer {fake.api_key}"
    assert call.body == {
        "model": "gpt-image-1",
        "prompt": "a lighthouse at dusk",
        "n": 2,
        "size": "64x48",
        "output_format": "webp",
        "quality": "low",
        "background": "opaque",
        "moderation": "low",
        "user": "svc-1",
    }
    assert isinstance(result, ResultEvent)
    assert (result.id, result.model, result.backend) == ("req-1", "gpt-image-1", "openai")
    assert [(i.format, i.width, i.height, i.seed) for i in result.images] == [
        ("webp", 64, 48, None)
    ] * 2
    assert base64.b64decode(result.images[0].b64)[:4] == b"RIFF"
    assert result.timings.total_ms > 0


async def test_dall_e_gets_response_format_and_its_urls_are_downloaded(fake: FakeProvider) -> None:
    async with fake_client(fake, openai={"response_format": "url"}) as client:
        result = await client.generate(request("dall-e-2", width=256, height=256), "req-2")
    generation, download = fake.calls
    assert generation.body == {
        "model": "dall-e-2",
        "prompt": "a lighthouse at dusk",
        "n": 1,
        "size": "256x256",
        "response_format": "url",
    }
    assert download.method == "GET" and download.path.startswith("/files/")
    assert "authorization" not in download.headers, "the key must not go to an image host"
    assert (result.images[0].width, result.images[0].format) == (256, "png")


async def test_omitted_size_lets_the_provider_choose(fake: FakeProvider) -> None:
    async with fake_client(fake) as client:
        result = await client.generate(request(width=None, height=None), "req-3")
    assert "size" not in fake.calls[0].body
    assert result.images[0].width == 1024


async def test_requests_the_client_cannot_map_fail_before_any_call(fake: FakeProvider) -> None:
    async with fake_client(fake) as client:
        with pytest.raises(ProviderUnsupportedError, match="does not serve") as caught:
            await client.generate(request("gpt-image-9"), "r")
        assert caught.value.param == "model" and caught.value.status == 400
        with pytest.raises(ProviderUnsupportedError, match="height is missing"):
            await client.generate(request(height=None), "r")
    assert fake.calls == []


async def test_provider_validation_errors_map_to_rejected_with_param(fake: FakeProvider) -> None:
    async with fake_client(fake) as client:
        with pytest.raises(ProviderRejectedError, match="size") as caught:
            await client.generate(request(width=100, height=100), "r")
    assert caught.value.param == "size" and caught.value.status == 422
    assert caught.value.code == "provider_rejected"
    assert len(fake.calls) == 1


# -- streaming ------------------------------------------------------------------------------------


async def test_streaming_relays_partial_images_as_steps_then_the_result(
    fake: FakeProvider,
) -> None:
    async with fake_client(fake, openai={"partial_images": 2}) as client:
        events = [e async for e in client.stream(request(preview="tiny", n=2), "req-s")]
    assert fake.calls[0].body["stream"] is True and fake.calls[0].body["partial_images"] == 2
    steps = [e for e in events if isinstance(e, StepEvent)]
    result = events[-1]
    assert len(steps) == len(events) - 1
    assert [(s.index, s.total) for s in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(s.previews[0].width == 64 and s.id == "req-s" for s in steps)
    assert isinstance(result, ResultEvent) and len(result.images) == 2


async def test_streaming_without_previews_asks_for_no_partials(fake: FakeProvider) -> None:
    async with fake_client(fake) as client:
        events = [e async for e in client.stream(request(), "req-s")]
    assert fake.calls[0].body["partial_images"] == 0
    assert [e.event for e in events] == ["result"]


async def test_models_without_streaming_answer_stream_with_the_result(fake: FakeProvider) -> None:
    async with fake_client(fake) as client:
        events = [
            e
            async for e in client.stream(
                request("dall-e-2", width=256, height=256, preview="tiny"), "r"
            )
        ]
    assert "stream" not in fake.calls[0].body
    assert [e.event for e in events] == ["result"]


async def test_stream_failures_before_the_first_event_are_retried(fake: FakeProvider) -> None:
    fake.inject(Fault.status_code(503))
    async with fake_client(fake, openai={"partial_images": 1}) as client:
        events = [e async for e in client.stream(request(preview="latent"), "r")]
    assert [e.event for e in events] == ["step", "result"]
    assert len(fake.calls) == 2


async def test_a_stream_that_breaks_after_200_counts_against_the_breaker(
    fake: FakeProvider,
) -> None:
    fake.inject(Fault.malformed())
    async with fake_client(fake, breaker={"failure_threshold": 1}) as client:
        with pytest.raises(ProviderBadResponseError, match="without an image"):
            [e async for e in client.stream(request(preview="tiny"), "r")]
        assert client.breaker_state() == "open"
    assert len(fake.calls) == 1, "nothing is retried once the stream was accepted"


@pytest.mark.parametrize("shape", ["stream_error", "stream_error_wrapped"])
async def test_an_error_event_mid_stream_keeps_its_code_in_either_shape(
    fake: FakeProvider, shape: str
) -> None:
    fake.inject(Fault.special(shape, text="moderation_blocked"))
    events: list[StepEvent | ResultEvent] = []
    async with fake_client(fake, openai={"partial_images": 2}) as client:
        with pytest.raises(ContentFilteredError, match="moderation_blocked") as caught:
            async for event in client.stream(request(preview="tiny"), "r"):
                events.append(event)
    assert [e.event for e in events] == ["step"], "the partial before the error was relayed"
    assert caught.value.retryable is False
    assert len(fake.calls) == 1


# -- retries --------------------------------------------------------------------------------------


async def test_429_retry_after_is_honoured(fake: FakeProvider) -> None:
    fake.inject(Fault.rate_limit(retry_after="1"))
    async with fake_client(fake) as client:
        result = await client.generate(request(), "r")
    first, second = fake.calls
    assert second.at - first.at >= 1.0
    assert len(result.images) == 1


async def test_503_503_200_succeeds_on_the_third_attempt(fake: FakeProvider) -> None:
    fake.inject(Fault.status_code(503), times=2)
    async with fake_client(fake) as client:
        result = await client.generate(request(), "r")
    assert len(fake.calls) == 3
    assert result.backend == "openai"


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault.status_code(400), ProviderRejectedError),
        (Fault.status_code(401), ProviderAuthError),
        (Fault.status_code(403), ProviderUnsupportedError),
        (Fault.special("org_unverified"), ProviderUnsupportedError),
        (Fault.status_code(404), ProviderUnsupportedError),
        (Fault.special("quota"), ProviderQuotaError),
        (Fault.content_filter(), ContentFilteredError),
    ],
)
async def test_non_retryable_answers_are_tried_exactly_once(
    fake: FakeProvider, fault: Fault, error: type[ProviderError]
) -> None:
    fake.inject(fault, times=3)
    async with fake_client(fake) as client:
        with pytest.raises(error):
            await client.generate(request(), "r")
    assert len(fake.calls) == 1


async def test_errors_carry_stable_codes_and_statuses(fake: FakeProvider) -> None:
    fake.inject(Fault.content_filter(), Fault.special("quota"))
    async with fake_client(fake) as client:
        with pytest.raises(ContentFilteredError) as filtered:
            await client.generate(request(), "r")
        with pytest.raises(ProviderQuotaError) as quota:
            await client.generate(request(), "r")
    assert (filtered.value.code, filtered.value.status) == ("content_filtered", 422)
    assert "moderation_blocked" in filtered.value.message
    assert (quota.value.code, quota.value.status) == ("provider_quota", 503)


async def test_a_403_keeps_openais_reason_and_a_401_stays_an_auth_error(
    fake: FakeProvider,
) -> None:
    fake.inject(Fault.special("org_unverified"), Fault.status_code(401))
    async with fake_client(fake) as client:
        with pytest.raises(ProviderUnsupportedError) as unverified:
            await client.generate(request(), "r")
        with pytest.raises(ProviderAuthError) as refused:
            await client.generate(request(), "r")
    assert (unverified.value.status, unverified.value.code) == (400, "provider_unsupported")
    assert "organization must be verified" in unverified.value.message
    assert "HTTP 403" in unverified.value.message and "was refused" not in unverified.value.message
    assert "was refused" in refused.value.message
    assert len(fake.calls) == 2


async def test_exhausted_retries_raise_the_last_error(fake: FakeProvider) -> None:
    fake.always(Fault.rate_limit(retry_after="0"))
    async with fake_client(fake) as client:
        with pytest.raises(ProviderRateLimitedError) as caught:
            await client.generate(request(), "r")
    assert len(fake.calls) == 3
    assert (caught.value.status, caught.value.retry_after) == (429, 0.0)


async def test_deadline_shorter_than_retry_after_fails_early_with_the_original_error(
    fake: FakeProvider,
) -> None:
    fake.inject(Fault.status_code(503, retry_after="5"))
    started = time.monotonic()
    async with fake_client(fake, retries={"max_backoff_s": 10.0}) as client:
        with pytest.raises(ProviderUnavailableError, match="HTTP 503"):
            await client.generate(request(), "r", deadline=time.time() + 1.0)
    assert time.monotonic() - started < 0.5
    assert len(fake.calls) == 1


async def test_retry_after_longer_than_max_backoff_is_not_waited_for(fake: FakeProvider) -> None:
    fake.inject(Fault.rate_limit(retry_after="30"))
    async with fake_client(fake) as client:
        with pytest.raises(ProviderRateLimitedError) as caught:
            await client.generate(request(), "r")
    assert caught.value.retry_after == 30.0
    assert len(fake.calls) == 1


async def test_blackholed_requests_time_out_per_attempt_and_are_retried(
    fake: FakeProvider,
) -> None:
    fake.always(Fault.blackhole())
    timeouts = {"read_s": 0.2}
    async with fake_client(fake, timeouts=timeouts, retries={"max_attempts": 2}) as client:
        with pytest.raises(ProviderTimeoutError, match="ReadTimeout") as caught:
            await client.generate(request(), "r")
    assert caught.value.status == 504 and caught.value.code == "provider_timeout"
    assert len(fake.calls) == 2


async def test_the_request_deadline_bounds_a_slow_answer(fake: FakeProvider) -> None:
    fake.inject(Fault.delay(2.0))
    started = time.monotonic()
    async with fake_client(fake) as client:
        with pytest.raises(DeadlineExceededError):
            await client.generate(request(), "r", deadline=time.time() + 0.3)
        assert client.breaker_state() == "closed"
    assert time.monotonic() - started < 1.0


async def test_connection_refused_is_unavailable_after_retries() -> None:
    with start_fake("openai") as gone:
        pass  # stopped: its port now refuses connections
    async with fake_client(gone) as client:
        with pytest.raises(ProviderUnavailableError, match="unreachable") as caught:
            await client.generate(request(), "r")
    assert caught.value.status == 503


async def test_malformed_answers_are_bad_responses_and_not_retried(fake: FakeProvider) -> None:
    fake.inject(Fault.malformed())
    async with fake_client(fake) as client:
        with pytest.raises(ProviderBadResponseError, match="not JSON") as caught:
            await client.generate(request(), "r")
    assert caught.value.status == 502
    assert len(fake.calls) == 1


# -- circuit breaker ------------------------------------------------------------------------------


async def test_breaker_opens_fails_fast_and_admits_one_half_open_probe(
    fake: FakeProvider,
) -> None:
    settings = {
        "retries": {"max_attempts": 1},
        "breaker": {"failure_threshold": 2, "reset_timeout_s": 0.3},
    }
    async with fake_client(fake, **settings) as client:
        fake.always(Fault.status_code(500))
        for _ in range(2):
            with pytest.raises(ProviderUnavailableError, match="HTTP 500"):
                await client.generate(request(), "r")
        assert client.breaker_state() == "open"
        with pytest.raises(ProviderUnavailableError, match="circuit is open") as fast:
            await client.generate(request(), "r")
        assert fast.value.retry_after is not None and fast.value.retry_after > 0
        assert len(fake.calls) == 2, "an open circuit sends nothing"

        await _until(lambda: client.breaker_state() == "half_open")
        fake.always(None)
        fake.inject(Fault.delay(0.2))  # keep the probe in flight while the others arrive
        outcomes = await asyncio.gather(
            *(client.generate(request(), f"r{i}") for i in range(16)), return_exceptions=True
        )
        successes = [o for o in outcomes if isinstance(o, ResultEvent)]
        rejected = [o for o in outcomes if isinstance(o, ProviderUnavailableError)]
        assert (len(successes), len(rejected)) == (1, 15)
        assert len(fake.calls) == 3, "exactly one probe reached the provider"
        assert client.breaker_state() == "closed"


async def test_a_failed_probe_reopens_the_circuit(fake: FakeProvider) -> None:
    settings = {
        "retries": {"max_attempts": 1},
        "breaker": {"failure_threshold": 1, "reset_timeout_s": 0.1},
    }
    fake.always(Fault.status_code(503))
    async with fake_client(fake, **settings) as client:
        with pytest.raises(ProviderUnavailableError):
            await client.generate(request(), "r")
        await _until(lambda: client.breaker_state() == "half_open")
        with pytest.raises(ProviderUnavailableError, match="HTTP 503"):
            await client.generate(request(), "r")
        assert client.breaker_state() == "open"
    assert len(fake.calls) == 2


async def test_client_errors_do_not_open_the_circuit(fake: FakeProvider) -> None:
    fake.always(Fault.status_code(400))
    async with fake_client(fake, breaker={"failure_threshold": 1}) as client:
        for _ in range(3):
            with pytest.raises(ProviderRejectedError):
                await client.generate(request(), "r")
        assert client.breaker_state() == "closed"


# -- keys and probes ------------------------------------------------------------------------------


async def test_a_wrong_key_is_never_echoed_nor_logged(
    fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "sk-proj-WRONGKEY0123456789"
    caplog.set_level(logging.DEBUG)
    async with fake_client(fake, api_key=wrong) as client:
        with pytest.raises(ProviderAuthError) as caught:
            await client.generate(request(), "r")
    error = caught.value
    assert (error.status, error.code) == (502, "provider_auth")
    assert fake.api_key_env in error.message
    for text in (str(error), repr(error), str(error.to_dict()), caplog.text):
        assert wrong not in text and "WRONGKEY" not in text and "0123456789" not in text
    assert fake.calls[0].headers["authorization"] == f"Bearer {wrong}"


async def test_a_missing_key_fails_before_any_call(fake: FakeProvider) -> None:
    async with fake_client(fake, api_key=None) as client:
        with pytest.raises(ProviderAuthError, match=fake.api_key_env):
            await client.generate(request(), "r")
        report = await client.probe()
    assert report["status"] == "no_api_key" and report["api_key"] == "missing"
    assert fake.calls == []


async def test_probe_reports_models_from_the_model_list(fake: FakeProvider) -> None:
    async with fake_client(fake) as client:
        report = await client.probe()
    assert report["status"] == "ok" and report["breaker"] == "closed"
    assert report["kind"] == "openai"
    assert report["models"]["gpt-image-1"] == "available"
    assert fake.calls[0].path == "/v1/models"


async def _until(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
