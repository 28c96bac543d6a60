"""The fakes driven by each provider's official SDK, so a fake cannot keep a protocol the real
service has left.

Every test starts a fake on loopback, points the SDK at it, makes the call our client makes, and
checks that the fake accepted it and the SDK parsed the answer. Then our client makes the same call
and the two requests, as the fake recorded them, are compared field by field: what we send must be
a consistent subset of what the SDK sends, and every field only one side sends is named in the
test with the reason.

SDKs: `openai` (REST, the same endpoint as ours), `google-genai` (REST; pinned to v1beta, the
version our client speaks, because recent SDKs default to v1) and `runware` (it speaks Runware's
task protocol over a WebSocket; our client posts the same tasks to the REST endpoint, so the fake
serves both on `/v1`).
"""

from __future__ import annotations

import base64
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from runware import IImageInference, Runware, RunwareAPIError

from shared.api.schemas import GenerateRequest, ResultEvent
from shared.providers import ProviderAuthError, ProviderUnsupportedError
from tests.fakes import FakeProvider, Fault, make_image, start_fake
from tests.fakes.clients import fake_client

pytestmark = pytest.mark.anyio
SDK_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeProvider]]:
    started = {kind: start_fake(kind) for kind in ("openai", "gemini", "runware")}
    yield started
    for fake in started.values():
        fake.stop()


@pytest.fixture
def openai_fake(fakes: dict[str, FakeProvider]) -> FakeProvider:
    fakes["openai"].reset()
    return fakes["openai"]


@pytest.fixture
def gemini_fake(fakes: dict[str, FakeProvider]) -> FakeProvider:
    fakes["gemini"].reset()
    return fakes["gemini"]


@pytest.fixture
def runware_fake(fakes: dict[str, FakeProvider]) -> FakeProvider:
    fakes["runware"].reset()
    return fakes["runware"]


def assert_consistent_subset(
    ours: dict[str, Any],
    sdk: dict[str, Any],
    *,
    sdk_only: dict[str, str] | None = None,
    varying: set[str] | None = None,
) -> None:
    """Every field we send, the SDK sends with the same value (`varying` fields, such as fresh
    ids, only need to be present); the SDK's extra fields are exactly `sdk_only` (field → why)."""
    for key, value in ours.items():
        assert key in sdk, f"we send {key!r}; the SDK does not"
        if key not in (varying or set()):
            assert sdk[key] == value, f"{key!r}: we send {value!r}, the SDK {sdk[key]!r}"
    assert set(sdk) - set(ours) == set(sdk_only or {}), "SDK-only fields must be explained"


def first_body(fake: FakeProvider, method: str = "POST") -> Any:
    calls = [call for call in fake.calls if call.method == method]
    assert calls, f"the fake saw no {method} request"
    return calls[0].body


async def our_result(fake: FakeProvider, request: GenerateRequest, **overrides: Any) -> ResultEvent:
    async with fake_client(fake, **overrides) as client:
        return await client.generate(request, "sdk-parity")


def decoded(result: ResultEvent) -> list[bytes]:
    return [base64.b64decode(image.b64) for image in result.images]


# -- OpenAI ---------------------------------------------------------------------------------------


@pytest.fixture
async def openai_sdk(openai_fake: FakeProvider) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(
        api_key=openai_fake.api_key, base_url=f"{openai_fake.url}/v1", max_retries=0
    )
    yield sdk
    await sdk.close()


OPENAI_OPTIONS = {"quality": "low", "background": "opaque", "moderation": "low", "user": "dep-1"}


async def test_openai_sdk_generation_matches_our_request(
    openai_fake: FakeProvider, openai_sdk: openai.AsyncOpenAI
) -> None:
    answer = await openai_sdk.images.generate(
        model="gpt-image-1",
        prompt="a cat",
        n=2,
        size="64x48",
        output_format="png",
        **OPENAI_OPTIONS,
    )
    assert answer.data is not None and len(answer.data) == 2
    sdk_images = [base64.b64decode(item.b64_json or "") for item in answer.data]
    assert sdk_images[0] == make_image(64, 48, "png", 1)
    assert answer.usage is not None and answer.usage.total_tokens > 0
    sdk_call = openai_fake.calls[0]
    openai_fake.reset()

    request = GenerateRequest(model="gpt-image-1", prompt="a cat", n=2, width=64, height=48)
    ours = await our_result(openai_fake, request, openai=OPENAI_OPTIONS)
    our_call = openai_fake.calls[0]
    assert (our_call.path, sdk_call.path) == ("/v1/images/generations",) * 2
    assert our_call.headers["authorization"] == sdk_call.headers["authorization"]
    assert_consistent_subset(our_call.body, sdk_call.body)
    assert decoded(ours) == sdk_images


async def test_openai_sdk_streaming_with_partial_images_matches_our_request(
    openai_fake: FakeProvider, openai_sdk: openai.AsyncOpenAI
) -> None:
    stream = await openai_sdk.images.generate(
        model="gpt-image-1",
        prompt="a cat",
        n=1,
        size="64x48",
        output_format="png",
        stream=True,
        partial_images=2,
    )
    kinds = [event.type async for event in stream]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    sdk_body = openai_fake.calls[0].body
    openai_fake.reset()

    request = GenerateRequest(model="gpt-image-1", prompt="a cat", width=64, height=48)
    async with fake_client(openai_fake, openai={"partial_images": 2}) as client:
        events = [
            e async for e in client.stream(request.model_copy(update={"preview": "tiny"}), "r")
        ]
    assert [e.event for e in events] == ["step", "step", "result"]
    assert_consistent_subset(openai_fake.calls[0].body, sdk_body)


async def test_openai_sdk_sees_the_fakes_errors_as_openai_reports_them(
    openai_fake: FakeProvider, openai_sdk: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.BadRequestError) as unknown:
        await openai_sdk.images.generate(model="gpt-image-1", prompt="x", extra_body={"steps": 4})
    assert unknown.value.code == "unknown_parameter" and unknown.value.param == "steps"
    with pytest.raises(openai.BadRequestError):
        await openai_sdk.images.generate(model="gpt-image-1", prompt="x", response_format="url")

    openai_fake.inject(Fault.special("org_unverified"))
    with pytest.raises(openai.PermissionDeniedError, match="organization must be verified"):
        await openai_sdk.images.generate(model="gpt-image-1", prompt="x")
    openai_fake.inject(Fault.special("org_unverified"))
    request = GenerateRequest(model="gpt-image-1", prompt="x")
    with pytest.raises(ProviderUnsupportedError, match="organization must be verified"):
        await our_result(openai_fake, request)

    bad_key = openai.AsyncOpenAI(api_key="sk-nope", base_url=f"{openai_fake.url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad_key.images.generate(model="gpt-image-1", prompt="x")
    await bad_key.close()


async def test_openai_sdk_reads_a_flat_stream_error_with_its_code(
    openai_fake: FakeProvider, openai_sdk: openai.AsyncOpenAI
) -> None:
    openai_fake.inject(Fault.special("stream_error", text="moderation_blocked"))
    stream = await openai_sdk.images.generate(
        model="gpt-image-1", prompt="x", stream=True, partial_images=1
    )
    events = [event async for event in stream]
    assert [event.type for event in events] == ["image_generation.partial_image", "error"]
    assert getattr(events[-1], "code", None) == "moderation_blocked"

    openai_fake.inject(Fault.special("stream_error_wrapped", text="moderation_blocked"))
    stream = await openai_sdk.images.generate(
        model="gpt-image-1", prompt="x", stream=True, partial_images=1
    )
    with pytest.raises(openai.APIError) as wrapped:
        [event async for event in stream]
    assert wrapped.value.code == "moderation_blocked"


# -- Gemini ---------------------------------------------------------------------------------------

GEMINI_MODEL = "gemini-2.5-flash-image"
GEMINI_PATH = f"/v1beta/models/{GEMINI_MODEL}:generateContent"


def gemini_sdk(fake: FakeProvider, api_key: str | None = None) -> genai.Client:
    options = genai_types.HttpOptions(base_url=fake.url, api_version="v1beta")
    return genai.Client(api_key=api_key or fake.api_key, http_options=options)


@pytest.mark.parametrize("model", [GEMINI_MODEL, f"models/{GEMINI_MODEL}"])
async def test_gemini_sdk_generation_matches_our_request(
    gemini_fake: FakeProvider, model: str
) -> None:
    config = genai_types.GenerateContentConfig(
        response_modalities=["IMAGE"],
        image_config=genai_types.ImageConfig(aspect_ratio="16:9"),
        seed=5,
    )
    answer = await gemini_sdk(gemini_fake).aio.models.generate_content(
        model=model, contents="a teapot", config=config
    )
    assert answer.candidates and answer.candidates[0].content
    parts = answer.candidates[0].content.parts or []
    sdk_images = [part.inline_data.data for part in parts if part.inline_data]
    assert parts[-1].inline_data and parts[-1].inline_data.mime_type == "image/png"
    sdk_call = gemini_fake.calls[0]
    gemini_fake.reset()

    request = GenerateRequest(model=model, prompt="a teapot", width=1344, height=768, seed=5)
    ours = await our_result(gemini_fake, request, models=[model])
    our_call = gemini_fake.calls[0]
    assert our_call.path == sdk_call.path == GEMINI_PATH
    assert our_call.headers["x-goog-api-key"] == sdk_call.headers["x-goog-api-key"]
    # `contents` is compared part by part below.
    assert_consistent_subset(our_call.body, sdk_call.body, varying={"contents"})
    (our_content,), (sdk_content,) = our_call.body["contents"], sdk_call.body["contents"]
    # `role` is optional for a single turn and read as the user's; the SDK always names it.
    assert_consistent_subset(our_content, sdk_content, sdk_only={"role": "optional, single turn"})
    assert sdk_content["role"] == "user"
    assert decoded(ours) == sdk_images


async def test_gemini_sdk_sees_a_wrong_key_as_gemini_reports_it(gemini_fake: FakeProvider) -> None:
    with pytest.raises(genai_errors.ClientError) as caught:
        await gemini_sdk(gemini_fake, api_key="AIza-wrong-key").aio.models.generate_content(
            model=GEMINI_MODEL, contents="a teapot"
        )
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")
    async with fake_client(gemini_fake, api_key="AIza-wrong-key") as client:
        with pytest.raises(ProviderAuthError):
            await client.generate(GenerateRequest(model=GEMINI_MODEL, prompt="a teapot"), "r")


# -- Runware --------------------------------------------------------------------------------------

RUNWARE_MODEL = "runware:100@1"


@pytest.fixture
async def runware_sdk(runware_fake: FakeProvider) -> AsyncIterator[Runware]:
    sdk = Runware(api_key=runware_fake.api_key, url=runware_fake.url.replace("http", "ws") + "/v1")
    with anyio.fail_after(SDK_TIMEOUT_S):
        await sdk.connect()
    try:
        yield sdk
    finally:
        with anyio.fail_after(SDK_TIMEOUT_S):
            await sdk.disconnect()


def sdk_tasks(fake: FakeProvider) -> list[dict[str, Any]]:
    return [
        task
        for call in fake.calls
        if call.method == "WS"
        for task in call.body
        if task.get("taskType") == "imageInference"
    ]


# The SDK names `deliveryMethod` on every task; "sync" is the API's default, which we rely on.
RUNWARE_SDK_ONLY = {"deliveryMethod": "the API's default, sync"}


@pytest.mark.parametrize(
    ("sdk_fields", "our_fields"),
    [
        pytest.param(
            {
                "negativePrompt": "blurry",
                "steps": 12,
                "CFGScale": 6.5,
                "scheduler": "DPM++ 2M Karras",
                "seed": 42,
                "numberResults": 2,
                "outputFormat": "WEBP",
            },
            {
                "negative_prompt": "blurry",
                "steps": 12,
                "guidance_scale": 6.5,
                "scheduler": "dpmpp_2m_karras",
                "seed": 42,
                "n": 2,
                "output_format": "webp",
            },
            id="everything-set",
        ),
        # Nothing asked: neither sends steps, CFGScale, scheduler or seed (model defaults apply).
        pytest.param({"outputFormat": "PNG"}, {}, id="model-defaults"),
    ],
)
async def test_runware_sdk_task_matches_our_task(
    runware_fake: FakeProvider,
    runware_sdk: Runware,
    sdk_fields: dict[str, Any],
    our_fields: dict[str, Any],
) -> None:
    common = {"model": RUNWARE_MODEL, "positivePrompt": "a red fox", "width": 192, "height": 128}
    with anyio.fail_after(SDK_TIMEOUT_S):
        images = await runware_sdk.imageInference(
            IImageInference(
                **common,
                **sdk_fields,
                outputType="base64Data",
                safety={"checkContent": True},
            )
        )
    sdk_images = [base64.b64decode(image.imageBase64Data or "") for image in images]
    assert all(image.NSFWContent is False for image in images)
    (sdk_task,) = sdk_tasks(runware_fake)
    if "seed" in sdk_fields:
        assert [image.seed for image in images] == [42, 43]

    request = GenerateRequest(
        model=RUNWARE_MODEL, prompt="a red fox", width=192, height=128, **our_fields
    )
    ours = await our_result(runware_fake, request)
    our_task = first_body(runware_fake)[0]
    assert uuid.UUID(our_task["taskUUID"]).version == 4
    assert our_task["taskUUID"] != sdk_task["taskUUID"]
    assert_consistent_subset(our_task, sdk_task, sdk_only=RUNWARE_SDK_ONLY, varying={"taskUUID"})
    if "seed" in sdk_fields:
        assert decoded(ours) == sdk_images
    else:
        assert "CFGScale" not in sdk_task and "CFGScale" not in our_task


async def test_runware_sdk_sends_safety_for_the_deprecated_flag_and_seeds_from_one(
    runware_fake: FakeProvider, runware_sdk: Runware
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        legacy = IImageInference(
            model=RUNWARE_MODEL, positivePrompt="a red fox", width=192, height=128, checkNsfw=True
        )
    with anyio.fail_after(SDK_TIMEOUT_S):
        (image,) = await runware_sdk.imageInference(legacy)
        with pytest.raises(RunwareAPIError, match="invalidSeed"):
            await runware_sdk.imageInference(
                IImageInference(
                    model=RUNWARE_MODEL, positivePrompt="a red fox", width=192, height=128, seed=0
                )
            )
    first, refused = sdk_tasks(runware_fake)
    assert first["safety"] == {"checkContent": True} and "checkNSFW" not in first
    assert image.NSFWContent is False and image.imageURL
    assert refused["seed"] == 0, "the SDK passes seed 0 through; the API refuses it"
    request = GenerateRequest(model=RUNWARE_MODEL, prompt="a red fox", seed=0)
    with pytest.raises(ProviderUnsupportedError, match="seeds from 1"):
        await our_result(runware_fake, request)
    assert [call for call in runware_fake.calls if call.method == "POST"] == []
