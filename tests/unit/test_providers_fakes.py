"""The fakes themselves: they refuse what the real APIs refuse, in the real error shapes."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.fakes import FAKES, FakeProvider, Fault, start_fake

GENERATE = {
    "openai": ("/v1/images/generations", {"model": "gpt-image-1", "prompt": "p", "size": "32x48"}),
    "parasail": ("/v1/images/generations", {"model": "parasail-flux-schnell", "prompt": "p"}),
    "runware": (
        "/v1",
        [
            {
                "taskType": "imageInference",
                "taskUUID": "1f0e4a2c-3b5d-4e6f-8a9b-0c1d2e3f4a5b",
                "model": "runware:100@1",
                "positivePrompt": "a fox",
                "width": 128,
                "height": 192,
                "outputType": "base64Data",
            }
        ],
    ),
    "gemini": (
        "/v1beta/models/gemini-2.5-flash-image:generateContent",
        {"contents": [{"parts": [{"text": "p"}]}]},
    ),
}
AUTH = {
    "openai": lambda key: {"authorization": f"Bearer {key}"},
    "parasail": lambda key: {"authorization": f"Bearer {key}"},
    "runware": lambda key: {"authorization": f"Bearer {key}"},
    "gemini": lambda key: {"x-goog-api-key": key},
}


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeProvider]]:
    started = {kind: start_fake(kind) for kind in FAKES}
    yield started
    for fake in started.values():
        fake.stop()


@pytest.fixture(params=sorted(FAKES))
def fake(request: pytest.FixtureRequest, fakes: dict[str, FakeProvider]) -> FakeProvider:
    fake = fakes[request.param]
    fake.reset()
    return fake


def post(fake: FakeProvider, body: Any = None, key: str | None = "", **kw: Any) -> httpx.Response:
    path, default = GENERATE[fake.kind]
    headers = {} if key is None else AUTH[fake.kind](key or fake.api_key)
    return httpx.post(
        fake.url + path, json=default if body is None else body, headers=headers, **kw
    )


def first_image(kind: str, answer: Any) -> bytes:
    if kind in ("openai", "parasail"):
        encoded = answer["data"][0]["b64_json"]
    elif kind == "runware":
        encoded = answer["data"][0]["imageBase64Data"]
    else:
        encoded = answer["candidates"][0]["content"]["parts"][-1]["inlineData"]["data"]
    return base64.b64decode(encoded)


def test_valid_requests_get_real_tiny_images(fake: FakeProvider) -> None:
    response = post(fake)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(first_image(fake.kind, response.json())))
    sizes = {"openai": (32, 48), "parasail": (1024, 1024), "runware": (128, 192)}
    assert image.size == sizes.get(fake.kind, (64, 64))
    assert image.format == ("JPEG" if fake.kind == "runware" else "PNG")  # Runware's default
    assert len(fake.calls) == 1 and fake.calls[0].body == GENERATE[fake.kind][1]


def test_missing_and_wrong_keys_are_refused_in_the_providers_shapes(fake: FakeProvider) -> None:
    missing, wrong = post(fake, key=None), post(fake, key="not-the-key")
    if fake.kind == "gemini":
        assert missing.status_code == 403
        assert missing.json()["error"]["status"] == "PERMISSION_DENIED"
        assert wrong.status_code == 400
        assert wrong.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    elif fake.kind == "runware":
        assert missing.status_code == wrong.status_code == 401
        assert missing.json()["errors"][0]["code"] == "missingApiKey"
        assert wrong.json()["errors"][0]["code"] == "invalidApiKey"
    else:
        assert missing.status_code == wrong.status_code == 401
        assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert "not-the-key" not in wrong.text, "like OpenAI, the fake masks the key"
    assert len(fake.calls) == 2


def test_unknown_fields_are_refused_with_the_field_named(fake: FakeProvider) -> None:
    _, body = GENERATE[fake.kind]
    if fake.kind == "runware":
        response = post(fake, [body[0] | {"guidance": 3}])
        error = response.json()["errors"][0]
        assert (error["code"], error["parameter"]) == ("unsupportedParameter", "guidance")
        assert error["taskUUID"] == body[0]["taskUUID"]
    elif fake.kind == "gemini":
        response = post(fake, body | {"generationConfig": {"aspect_ratio": "1:1"}})
        assert 'Unknown name "aspect_ratio"' in response.json()["error"]["message"]
    else:
        response = post(fake, body | {"steps": 4})
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("unknown_parameter", "steps")
    assert response.status_code == 400


def test_faults_apply_in_order_then_always(fake: FakeProvider) -> None:
    fake.inject(Fault.status_code(503), Fault.rate_limit(retry_after="2"))
    fake.always(Fault.status_code(500))
    statuses = [post(fake) for _ in range(3)]
    assert [r.status_code for r in statuses] == [503, 429, 500]
    if fake.kind != "gemini":  # Gemini states its wait in the body (RetryInfo), not a header
        assert statuses[1].headers["retry-after"] == "2"
    fake.always(None)
    assert post(fake).status_code == 200
    with pytest.raises(ValueError, match="knows faults"):
        fake.inject(Fault.special("no_such_fault"))


def test_a_blackholed_request_never_answers_but_the_fake_recovers(fake: FakeProvider) -> None:
    fake.inject(Fault.blackhole(), Fault.malformed())
    with pytest.raises(httpx.ReadTimeout):
        post(fake, timeout=0.2)
    malformed = post(fake)
    assert malformed.status_code == 200
    with pytest.raises(ValueError):
        malformed.json()
    assert post(fake).status_code == 200


def test_a_stopped_fake_refuses_connections() -> None:
    fake = start_fake("openai")
    assert httpx.get(fake.url + "/v1/models").status_code == 401
    fake.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(fake.url + "/v1/models")


def test_config_and_env_describe_how_to_reach_the_fake(fakes: dict[str, FakeProvider]) -> None:
    fake = fakes["parasail"]
    assert fake.config() == {
        "name": "parasail",
        "kind": "parasail",
        "base_url": fake.url,
        "api_key_env": "FAKE_PARASAIL_API_KEY",
        "models": ["parasail-flux-schnell"],
        "allow_remote": False,
    }
    assert fake.env == {"FAKE_PARASAIL_API_KEY": fake.api_key}


@pytest.mark.parametrize(
    ("fields", "refused"),
    [
        ({"deliveryMethod": "sync", "safety": {"checkContent": True}, "seed": 1}, None),
        ({"checkNSFW": True}, "checkNSFW"),
        ({"seed": 0}, "seed"),
        ({"safety": {"checkNSFW": True}}, "safety"),
        ({"deliveryMethod": "async"}, "deliveryMethod"),
    ],
)
def test_the_runware_fake_speaks_the_current_task_protocol(
    fakes: dict[str, FakeProvider], fields: dict[str, Any], refused: str | None
) -> None:
    fake = fakes["runware"]
    fake.reset()
    _, body = GENERATE["runware"]
    response = post(fake, [body[0] | fields])
    if refused is None:
        assert response.status_code == 200
        assert response.json()["data"][0]["NSFWContent"] is False
    else:
        assert response.status_code == 400
        assert response.json()["errors"][0]["parameter"] == refused
