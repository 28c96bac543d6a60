"""Runware client against the loopback fake: task mapping, outputs, seeds, safety, retries,
errors."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from shared.api.schemas import GenerateRequest
from shared.api.vocabulary import SCHEDULER_NAMES
from shared.providers import (
    ContentFilteredError,
    ProviderAuthError,
    ProviderRejectedError,
    ProviderTimeoutError,
    ProviderUnsupportedError,
)
from shared.providers.runware import RUNWARE_SCHEDULERS
from tests.fakes import FakeProvider, Fault, RunwareFake, start_fake
from tests.fakes.clients import fake_client

pytestmark = pytest.mark.anyio
MODEL = "runware:100@1"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def fake() -> Iterator[RunwareFake]:
    with start_fake("runware") as fake:
        assert isinstance(fake, RunwareFake)
        yield fake


@pytest.fixture(autouse=True)
def _fresh(fake: FakeProvider) -> None:
    fake.reset()


def request(**fields: object) -> GenerateRequest:
    base = {"model": MODEL, "prompt": "a red fox in snow", "width": 192, "height": 128}
    return GenerateRequest.model_validate(base | fields)


async def test_task_mapping_and_seeds_returned(fake: RunwareFake) -> None:
    async with fake_client(fake) as client:
        result = await client.generate(
            request(
                negative_prompt="blurry",
                steps=12,
                guidance_scale=6.5,
                scheduler="dpmpp_2m_karras",
                seed=42,
                n=2,
                output_format="webp",
            ),
            "req-1",
        )
    (call,) = fake.calls
    assert call.headers["authorization"] == f"Bearer {fake.api_key}"
    (task,) = call.body
    assert uuid.UUID(task.pop("taskUUID")).version == 4
    assert task == {
        "taskType": "imageInference",
        "model": MODEL,
        "positivePrompt": "a red fox in snow",
        "negativePrompt": "blurry",
        "width": 192,
        "height": 128,
        "steps": 12,
        "CFGScale": 6.5,
        "scheduler": "DPM++ 2M Karras",
        "seed": 42,
        "numberResults": 2,
        "outputType": "base64Data",
        "outputFormat": "WEBP",
        "safety": {"checkContent": True},
    }
    assert result.backend == "runware"
    assert [(i.seed, i.format, i.width, i.height) for i in result.images] == [
        (42, "webp", 192, 128),
        (43, "webp", 192, 128),
    ]


async def test_unset_fields_are_left_out_and_the_size_defaults(fake: RunwareFake) -> None:
    async with fake_client(fake, runware={"default_width": 256, "default_height": 128}) as client:
        result = await client.generate(request(width=None, height=None), "r")
    (task,) = fake.calls[0].body
    assert {"negativePrompt", "steps", "CFGScale", "scheduler", "seed"}.isdisjoint(task)
    assert (task["width"], task["height"]) == (256, 128)
    assert isinstance(result.images[0].seed, int), "Runware's own seed is reported"


@pytest.mark.parametrize("guidance_scale", [5.0, 7.5])
async def test_cfg_scale_is_sent_only_when_the_request_set_it(
    fake: RunwareFake, guidance_scale: float
) -> None:
    defaulted = request()
    assert defaulted.guidance_scale == 5.0, "our schema's default, which Runware must not get"
    async with fake_client(fake) as client:
        await client.generate(defaulted, "r")
        await client.generate(request(guidance_scale=guidance_scale, steps=20), "r")
    (left_to_the_model,), (asked,) = (call.body for call in fake.calls)
    assert "CFGScale" not in left_to_the_model and "steps" not in left_to_the_model
    assert (asked["CFGScale"], asked["steps"]) == (guidance_scale, 20)


async def test_content_check_is_sent_as_safety_and_can_be_turned_off(fake: RunwareFake) -> None:
    async with fake_client(fake, runware={"check_content": False}) as client:
        result = await client.generate(request(), "r")
    (task,) = fake.calls[0].body
    assert {"safety", "checkNSFW"}.isdisjoint(task)
    assert len(result.images) == 1


async def test_seed_zero_is_refused_before_any_call_and_seed_one_is_sent(
    fake: RunwareFake,
) -> None:
    async with fake_client(fake) as client:
        with pytest.raises(ProviderUnsupportedError, match="seeds from 1") as caught:
            await client.generate(request(seed=0), "r")
        result = await client.generate(request(seed=1), "r")
    assert (caught.value.status, caught.value.param) == (400, "seed")
    (call,) = fake.calls
    assert call.body[0]["seed"] == 1 and result.images[0].seed == 1
    assert client.breaker_state() == "closed"


def test_every_scheduler_of_ours_has_a_runware_name() -> None:
    assert set(RUNWARE_SCHEDULERS) == set(SCHEDULER_NAMES)


async def test_a_scheduler_without_a_runware_name_is_refused_by_name(
    fake: RunwareFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The vocabulary may grow before this table does; the gap must be a 400, not a KeyError.
    monkeypatch.delitem(RUNWARE_SCHEDULERS, "unipc")
    async with fake_client(fake) as client:
        with pytest.raises(ProviderUnsupportedError, match="'unipc'") as caught:
            await client.generate(request(scheduler="unipc"), "r")
    assert (caught.value.status, caught.value.param) == (400, "scheduler")
    assert fake.calls == []


@pytest.mark.parametrize("output_type", ["URL", "dataURI"])
async def test_url_and_data_uri_outputs(fake: RunwareFake, output_type: str) -> None:
    async with fake_client(fake, runware={"output_type": output_type}) as client:
        result = await client.generate(request(output_format="jpeg"), "r")
    assert (result.images[0].format, result.images[0].width) == ("jpeg", 192)
    if output_type == "URL":
        _, download = fake.calls
        assert download.path.startswith("/files/")
        assert "authorization" not in download.headers
    else:
        assert len(fake.calls) == 1


async def test_every_attempt_is_a_task_with_a_fresh_task_uuid(fake: RunwareFake) -> None:
    fake.inject(Fault.status_code(500), Fault.status_code(503))
    async with fake_client(fake) as client:
        result = await client.generate(request(), "r")
    uuids = [call.body[0]["taskUUID"] for call in fake.calls]
    assert len(uuids) == 3 and len(set(uuids)) == 3
    assert all(uuid.UUID(value).version == 4 for value in uuids)
    assert fake.task_uuids == uuids[-1:], "the answer is matched to the last attempt's task"
    assert len(result.images) == 1
    tasks = [{k: v for k, v in call.body[0].items() if k != "taskUUID"} for call in fake.calls]
    assert tasks[0] == tasks[1] == tasks[2], "only the taskUUID changes between attempts"


async def test_nsfw_flag_is_content_filtered_not_a_black_image(fake: RunwareFake) -> None:
    fake.inject(Fault.content_filter())
    async with fake_client(fake) as client:
        with pytest.raises(ContentFilteredError, match="NSFW") as caught:
            await client.generate(request(), "r")
    assert (caught.value.status, caught.value.code) == (422, "content_filtered")


async def test_validation_errors_name_the_parameter_and_are_not_retried(
    fake: RunwareFake,
) -> None:
    async with fake_client(fake) as client:
        with pytest.raises(ProviderRejectedError, match="invalidWidth") as caught:
            await client.generate(request(width=100), "r")
        with pytest.raises(ProviderRejectedError, match="invalidPositivePrompt"):
            await client.generate(request(prompt="ab"), "r")
    assert caught.value.param == "width" and caught.value.status == 422
    assert len(fake.calls) == 2


async def test_bad_key_is_provider_auth_after_one_call(fake: RunwareFake) -> None:
    async with fake_client(fake, api_key="wrong-runware-key-123") as client:
        with pytest.raises(ProviderAuthError, match="invalidApiKey") as caught:
            await client.generate(request(), "r")
    assert "wrong-runware-key-123" not in caught.value.message
    assert len(fake.calls) == 1


@pytest.mark.parametrize(
    ("code", "error"),
    [("timeoutProvider", ProviderTimeoutError), ("inferenceError", ProviderRejectedError)],
)
async def test_task_errors_inside_a_200_fail_the_call_once(
    fake: RunwareFake, code: str, error: type[Exception]
) -> None:
    fake.inject(Fault.special("task_error", text=code))
    async with fake_client(fake) as client:
        with pytest.raises(error, match=code):
            await client.generate(request(), "r")
    assert len(fake.calls) == 1, "a task Runware ran and failed is not silently re-run"


async def test_probe_pings_and_leaves_models_unknown(fake: RunwareFake) -> None:
    async with fake_client(fake) as client:
        report = await client.probe()
    assert report["status"] == "ok"
    assert set(report["models"].values()) == {"unknown"}
    assert fake.calls[0].body == [{"taskType": "ping", "ping": True}]
