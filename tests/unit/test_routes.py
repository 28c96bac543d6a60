"""The HTTP API without Ray: `build_api` around fake backends, driven through httpx's ASGI
transport. Every route, every failure: the error envelope, its status, `type` and `code`; the
stream's final `error` event; and the OpenAPI document."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from shared.api.capabilities import (
    CapabilitiesResponse,
    Estimate,
    ValidateResponse,
    build_capabilities,
    peak_memory_bytes,
    request_record,
)
from shared.api.embeddings import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    embeddings_response,
    is_image_input,
)
from shared.api.routes import build_api, noise_mask_list
from shared.api.schemas import (
    EncodedImage,
    Event,
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ResultEvent,
    ResultMetadata,
    SchedulerRecord,
    StepEvent,
    Timings,
)
from shared.api.vocabulary import SAMPLERS, SCHEDULER_NAMES
from shared.config import AppConfig, ControlNetConfig, LimitsConfig, OpenAIImagesConfig
from shared.errors import (
    BusyError,
    InvalidRequestError,
    ModelLoadError,
    NotFoundError,
    ServeError,
    UnavailableError,
)
from shared.intake.noise_masks import NOISE_MASK_NAMES
from shared.intake.request_images import decode_images

pytestmark = pytest.mark.anyio
BODY = {"model": "tiny", "prompt": "a cat"}
DIMENSION = 8
CONFIG = AppConfig.model_validate(
    {
        "models": [
            {
                "id": "tiny",
                "source": "tiny",
                "ip_adapter": {"source": "tiny-ip-adapter"},
                "loras": [{"id": "tiny-lora", "source": "tiny-lora"}],
                "controlnets": [ControlNetConfig(id="tiny-canny", source="tiny-controlnet")],
            },
            {"id": "tiny-inpaint", "source": "tiny-inpaint", "preview_decoder": None},
            {"id": "big", "source": "stabilityai/stable-diffusion-xl-base-1.0", "dtype": "float16"},
        ],
        "providers": [{"name": "cloud", "kind": "openai", "models": ["gpt-image-1"]}],
        "batching": {"max_batch_images": 6},
    }
)
RUNTIME = {"device": "cpu", "gpu_ids": [], "dtype": "float32", "vae_dtype": "float32"}
# What the fake's replicas report: tiny and tiny-inpaint built, big not yet.
RUNTIMES = {
    "tiny": {**RUNTIME, "built": True},
    "tiny-inpaint": {**RUNTIME, "built": True},
    "big": {**RUNTIME, "dtype": "float16", "built": False},
}
ENGINES = {
    "tiny": {"inpainting_unet": False, "tiny_preview": True},
    "tiny-inpaint": {"inpainting_unet": True, "tiny_preview": False},
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeBackend:
    """A backend that answers, or raises `failure` from every method (before any event, or
    after the first step when `mid_stream`). It keeps the requests it got; its step events
    carry a preview when the request asks for previews, and its embeddings are `vector(i)`."""

    def __init__(
        self,
        failure: BaseException | None = None,
        mid_stream: bool = False,
        api_keys: tuple[str, ...] = (),
    ) -> None:
        self.api_keys = api_keys
        self.output_store = None
        self.failure = failure
        self.mid_stream = mid_stream
        self.limits = LimitsConfig(max_body_bytes=4096)
        self.openai_images = OpenAIImagesConfig()
        self.seen: list[tuple[str, str]] = []  # (method, request id)
        self.requests: list[GenerateRequest] = []
        self.embedded: list[EmbeddingsRequest] = []
        self.closed_streams = 0

    def _maybe_fail(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _called(self, method: str, request_id: str) -> None:
        self.seen.append((method, request_id))
        self._maybe_fail()

    async def generate_response(
        self, request: GenerateRequest, request_id: str
    ) -> GenerateResponse:
        self.requests.append(request)
        self._called("generate", request_id)
        return _result(request_id).to_response()

    async def stream_events(
        self, request: GenerateRequest, request_id: str
    ) -> AsyncGenerator[Event, None]:
        self.seen.append(("stream", request_id))
        self.requests.append(request)
        previews = [] if request.preview == "none" else [_image()]
        try:
            if not self.mid_stream:
                self._maybe_fail()
            yield StepEvent(
                id=request_id, index=1, total=2, elapsed_ms=1.0, step_ms=1.0, previews=previews
            )
            self._maybe_fail()
            yield StepEvent(id=request_id, index=2, total=2, elapsed_ms=2.0, step_ms=1.0)
            yield _result(request_id)
        finally:
            self.closed_streams += 1

    async def validate_request(self, request: GenerateRequest, request_id: str) -> ValidateResponse:
        self.requests.append(request)
        self._called("validate", request_id)
        resolved = request.model_copy(update={"steps": request.steps or 8, "seed": 7})
        estimate = Estimate(queue_ms=0.0, run_ms=80.0, peak_memory_bytes=1000)
        return ValidateResponse(request=resolved.model_dump(mode="json"), estimate=estimate)

    async def capabilities(self) -> CapabilitiesResponse:
        self._maybe_fail()
        return build_capabilities(CONFIG, RUNTIMES, ENGINES, {"big": (1024, 1024)})

    async def create_embeddings(
        self, request: EmbeddingsRequest, request_id: str
    ) -> EmbeddingsResponse:
        self.embedded.append(request)
        self._called("embeddings", request_id)
        vectors = [vector(index) for index in range(len(request.inputs))]
        tokens = sum(1 for item in request.inputs if not is_image_input(item))
        return embeddings_response(request.model, vectors, request.encoding_format, tokens)

    async def list_models(self) -> list[ModelCard]:
        self._maybe_fail()
        return [ModelCard(id="tiny", backend="local", loaded=True)]

    async def readiness(self) -> dict[str, Any]:
        self._maybe_fail()
        return {"ready": True, "backends": {}}


def vector(index: int) -> np.ndarray:
    """The fake's embedding of input `index`: values float32 cannot hold exactly, too."""
    return (np.arange(DIMENSION, dtype=np.float32) / 3 + index).astype(np.float32)


def _image() -> EncodedImage:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return EncodedImage(
        b64=base64.b64encode(buffer.getvalue()).decode(), format="png", width=8, height=8
    )


def _result(request_id: str) -> ResultEvent:
    image = GeneratedImage(**_image().model_dump(), seed=1)
    return ResultEvent(
        id=request_id, model="tiny", backend="local", images=[image], timings=Timings()
    )


async def client_for(backend: FakeBackend) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_api(lambda: backend))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.fixture
async def ok() -> AsyncIterator[tuple[FakeBackend, httpx.AsyncClient]]:
    backend = FakeBackend()
    async for client in client_for(backend):
        yield backend, client


def assert_envelope(response: httpx.Response, status: int, type_: str, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"type", "code", "message", "param"}
    assert (error["type"], error["code"]) == (type_, code), error
    assert error["message"] and "Traceback" not in error["message"]
    return error


ROUTES = {
    "generate": ("POST", "/v1/generate", BODY),
    "generate-stream": ("POST", "/v1/generate", {**BODY, "stream": True}),
    "validate": ("POST", "/v1/generate/validate", BODY),
    "capabilities": ("GET", "/v1/capabilities", None),
    "models": ("GET", "/v1/models", None),
    "readyz": ("GET", "/readyz", None),
}
FAILURES = {
    "invalid": (InvalidRequestError("steps too big", param="steps"), 422, "invalid_request_error"),
    "busy": (BusyError("every replica is busy"), 429, "rate_limit_error"),
    "unavailable": (UnavailableError("cache down"), 503, "server_error"),
    "model-load": (ModelLoadError("bad checksum", code="checksum_mismatch"), 503, "model_error"),
    "not-found": (NotFoundError("no such model", code="model_not_found"), 404, "not_found_error"),
    "unexpected": (RuntimeError("secret internal detail"), 500, "server_error"),
}


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
@pytest.mark.parametrize("failure", FAILURES.values(), ids=FAILURES.keys())
async def test_every_route_maps_every_failure_onto_the_envelope(
    route: tuple[str, str, dict | None], failure: tuple[BaseException, int, str]
) -> None:
    method, path, body = route
    exc, status, type_ = failure
    backend = FakeBackend(failure=exc)
    async for client in client_for(backend):
        response = await client.request(method, path, json=body, headers={"x-request-id": "r-42"})
    code = exc.code if isinstance(exc, ServeError) else "internal_error"
    error = assert_envelope(response, status, type_, code)
    assert response.headers["x-request-id"] == "r-42"
    if status == 500:  # no internals leak; the id lets an operator find the logged traceback
        assert error["message"] == "internal error (request id r-42)"
    if status == 429:
        assert int(response.headers["retry-after"]) >= 1
    if path.startswith("/v1/generate"):
        assert backend.seen and all(rid == "r-42" for _, rid in backend.seen)


async def test_a_failure_mid_stream_is_the_last_event() -> None:
    for exc, code in ((UnavailableError("replica died"), "unavailable"), (KeyError("x"), None)):
        backend = FakeBackend(failure=exc, mid_stream=True)
        async for client in client_for(backend):
            response = await client.post("/v1/generate", json={**BODY, "stream": True})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in response.text.splitlines()]
        assert [event["event"] for event in events] == ["step", "error"]
        assert events[-1]["error"]["code"] == (code or "internal_error")
        assert backend.closed_streams == 1


async def test_sse_is_chosen_by_the_accept_header(ok: Any) -> None:
    backend, client = ok
    response = await client.post(
        "/v1/generate", json={**BODY, "stream": True}, headers={"accept": "text/event-stream"}
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [block for block in response.text.split("\n\n") if block]
    assert [block.splitlines()[0] for block in blocks] == [
        "event: step",
        "event: step",
        "event: result",
    ]
    assert json.loads(blocks[-1].splitlines()[1].removeprefix("data: "))["event"] == "result"
    assert backend.closed_streams == 1


async def test_unknown_routes_and_methods_have_their_own_codes(ok: Any) -> None:
    _, client = ok
    assert_envelope(await client.get("/v1/nothing"), 404, "not_found_error", "not_found")
    wrong = await client.put("/v1/generate", json=BODY)
    error = assert_envelope(wrong, 405, "invalid_request_error", "method_not_allowed")
    assert "POST" in wrong.headers["allow"] and "POST" in error["message"]
    wrong_models = await client.post("/v1/models", json={})
    assert_envelope(wrong_models, 405, "invalid_request_error", "method_not_allowed")


async def test_bodies_are_refused_before_the_backend_sees_them(ok: Any) -> None:
    backend, client = ok
    big = json.dumps({**BODY, "prompt": "x" * 5000})
    declared = await client.post(
        "/v1/generate", content=big, headers={"content-type": "application/json"}
    )
    assert_envelope(declared, 413, "invalid_request_error", "body_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted as it arrives
        for _ in range(10):
            yield b" " * 1000

    streamed = await client.post(
        "/v1/generate", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_envelope(streamed, 413, "invalid_request_error", "body_too_large")
    text = await client.post("/v1/generate", content="{}", headers={"content-type": "text/plain"})
    error = assert_envelope(text, 415, "invalid_request_error", "unsupported_media_type")
    assert "application/json" in error["message"]
    malformed = await client.post(
        "/v1/generate", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert_envelope(malformed, 400, "invalid_request_error", "malformed_json")
    unknown = await client.post("/v1/generate", json={**BODY, "colour": "red"})
    assert assert_envelope(unknown, 422, "invalid_request_error", "unknown_field")["param"] == (
        "colour"
    )
    scheduler = await client.post("/v1/generate", json={**BODY, "scheduler": "warp"})
    error = assert_envelope(scheduler, 422, "invalid_request_error", "unknown_scheduler")
    assert "'euler'" in error["message"] and "'warp'" in error["message"]
    assert backend.seen == []


async def test_successful_routes(ok: Any) -> None:
    backend, client = ok
    generated = await client.post("/v1/generate", json=BODY)
    assert generated.status_code == 200 and generated.json()["backend"] == "local"
    assert generated.headers["x-request-id"].startswith("gen-")
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    backend.readiness = _not_ready  # type: ignore[method-assign]
    assert (await client.get("/readyz")).status_code == 503


async def _not_ready() -> dict[str, Any]:
    return {"ready": False, "backends": {"ModelCache": "unavailable"}}


async def test_openapi_documents_the_real_contract(ok: Any) -> None:
    _, client = ok
    document = (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    generate = document["paths"]["/v1/generate"]["post"]
    body = generate["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/GenerateRequest"}
    assert set(GenerateRequest.model_fields) <= set(schemas["GenerateRequest"]["properties"])
    assert "prompt" in schemas["GenerateRequest"]["required"]
    success = generate["responses"]["200"]["content"]
    assert set(success) == {"application/json", "application/x-ndjson", "text/event-stream"}
    for status in ("400", "413", "415", "422", "429", "500", "503"):
        error_schema = generate["responses"][status]["content"]["application/json"]["schema"]
        assert error_schema == {"$ref": "#/components/schemas/ErrorEnvelope"}
    for schema in ("StepEvent", "ResultEvent", "ErrorEvent", "ErrorEnvelope", "GenerateResponse"):
        assert schema in schemas
    embeddings = document["paths"]["/v1/embeddings"]["post"]
    assert embeddings["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EmbeddingsRequest"
    }
    embedded = embeddings["responses"]["200"]["content"]["application/json"]["schema"]
    assert embedded == {"$ref": "#/components/schemas/EmbeddingsResponse"}
    edits = document["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    form = edits["multipart/form-data"]["schema"]
    assert form["properties"]["image"]["format"] == "binary" and "strength" in form["properties"]
    assert {"image", "prompt", "model"} <= set(form["required"])
    refs = set(_refs(document))
    assert refs <= {f"#/components/schemas/{name}" for name in schemas}, refs
    assert (await client.get("/docs")).status_code == 200


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


async def test_api_keys_guard_every_v1_route_but_not_the_probes() -> None:
    backend = FakeBackend(api_keys=("key-one", "key-two"))
    async for client in client_for(backend):
        guarded = [route for route in ROUTES.values() if route[1].startswith("/v1/")]
        for method, path, body in guarded:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "key-one"}):
                refused = await client.request(method, path, json=body, headers=headers)
                assert_envelope(refused, 401, "authentication_error", "invalid_api_key")
                assert refused.headers["www-authenticate"] == "Bearer"
                assert "key-one" not in refused.text
        ok = await client.post(
            "/v1/generate", json=BODY, headers={"authorization": "Bearer key-two"}
        )
        assert ok.status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200
    assert [method for method, _ in backend.seen] == ["generate"]  # refused ones never got in
    async for client in client_for(backend):
        for method, path in (
            ("GET", "/v1/noise-masks"),
            ("POST", "/v1/embeddings"),
            ("POST", "/v1/images/edits"),
        ):
            refused = await client.request(method, path, headers={"authorization": "Bearer no"})
            assert_envelope(refused, 401, "authentication_error", "invalid_api_key")
        listed = await client.get("/v1/noise-masks", headers={"authorization": "Bearer key-one"})
        assert listed.status_code == 200
    assert [method for method, _ in backend.seen] == ["generate"]


async def test_the_openai_sdk_authenticates_with_its_api_key() -> None:
    backend = FakeBackend(api_keys=("sk-local",))
    app = build_api(lambda: backend)

    def sdk(key: str) -> openai.AsyncOpenAI:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        return openai.AsyncOpenAI(
            base_url="http://test/v1", api_key=key, http_client=http, max_retries=0
        )

    result = await sdk("sk-local").images.generate(model="tiny", prompt="a cat", size="64x64")
    assert result.data is not None and result.data[0].b64_json
    with pytest.raises(openai.AuthenticationError) as refused:
        await sdk("sk-other").images.generate(model="tiny", prompt="a cat")
    assert refused.value.code == "invalid_api_key"


def test_configured_but_empty_key_sources_fail_loudly(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.config import AuthConfig

    monkeypatch.setenv("DS_KEYS", " alpha , beta ")
    (tmp_path / "keys").write_text("# operators\ngamma\n\n")
    config = AuthConfig(api_keys_env="DS_KEYS", api_keys_file=str(tmp_path / "keys"))
    assert config.load_keys() == ("alpha", "beta", "gamma")
    assert AuthConfig().load_keys() == ()
    monkeypatch.setenv("DS_KEYS", "")
    with pytest.raises(ValueError, match="no API key"):
        AuthConfig(api_keys_env="DS_KEYS").load_keys()


# ---- noise masks and embeddings ---------------------------------------------------------------


async def test_noise_masks_list_every_pattern_with_a_png_preview(ok: Any) -> None:
    _, client = ok
    response = await client.get("/v1/noise-masks")
    assert response.status_code == 200, response.text
    listing = response.json()
    assert listing["object"] == "list"
    assert [entry["name"] for entry in listing["data"]] == list(NOISE_MASK_NAMES)
    assert len(listing["data"]) == 9
    for entry in listing["data"]:
        assert set(entry) == {"name", "description", "preview"} and entry["description"]
        preview = Image.open(io.BytesIO(base64.b64decode(entry["preview"])))
        assert preview.format == "PNG" and preview.size == (64, 64)
    assert noise_mask_list() is noise_mask_list()  # computed once
    document = (await client.get("/openapi.json")).json()
    answer = document["paths"]["/v1/noise-masks"]["get"]["responses"]["200"]
    assert answer["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/NoiseMaskList"
    }


def _image_url() -> str:
    return "data:image/png;base64," + _image().b64


async def test_embeddings_answer_floats_or_base64_of_the_same_float32s(ok: Any) -> None:
    backend, client = ok
    inputs = ["a cat", _image_url(), "a dog"]
    body = {"model": "tiny", "input": inputs}
    floats = await client.post("/v1/embeddings", json=body)
    assert floats.status_code == 200, floats.text
    answer = floats.json()
    assert answer["object"] == "list" and answer["model"] == "tiny"
    assert answer["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    assert [item["index"] for item in answer["data"]] == [0, 1, 2]
    assert {item["object"] for item in answer["data"]} == {"embedding"}
    packed = await client.post("/v1/embeddings", json={**body, "encoding_format": "base64"})
    assert packed.status_code == 200, packed.text
    for index, (as_list, as_b64) in enumerate(
        zip(answer["data"], packed.json()["data"], strict=True)
    ):
        decoded = np.frombuffer(base64.b64decode(as_b64["embedding"]), dtype="<f4")
        assert np.array_equal(decoded, vector(index))
        assert np.array_equal(np.asarray(as_list["embedding"], dtype=np.float32), vector(index))
    assert [request.inputs for request in backend.embedded] == [inputs, inputs]
    assert [is_image_input(item) for item in inputs] == [False, True, False]
    single = await client.post("/v1/embeddings", json={"model": "tiny", "input": "one"})
    assert len(single.json()["data"]) == 1
    same = await client.post("/v1/embeddings", json={**body, "dimensions": DIMENSION})
    assert same.status_code == 200


def test_the_embeddings_builder_packs_little_endian_float32() -> None:
    vectors = [np.array([1.0, -2.5, 1 / 3], dtype=np.float64)]
    packed = embeddings_response("m", vectors, "base64", prompt_tokens=3)
    assert (
        packed.data[0].embedding
        == base64.b64encode(np.array([1.0, -2.5, 1 / 3], dtype="<f4").tobytes()).decode()
    )
    floats = embeddings_response("m", vectors, "float", prompt_tokens=3)
    assert floats.data[0].embedding == [1.0, -2.5, float(np.float32(1 / 3))]
    assert floats.usage.total_tokens == 3
    with pytest.raises(ValueError, match="one vector"):
        embeddings_response("m", [np.zeros((2, 2))], "float", prompt_tokens=0)


EMBEDDING_REFUSALS = {
    "empty-list": ({"input": []}, "empty_input", "input"),
    "empty-text": ({"input": ["a", ""]}, "empty_input", "input.1"),
    "too-many": ({"input": ["x"] * 65}, "too_many_inputs", "input"),
    "too-long": ({"input": ["ok", "x" * 2001]}, "prompt_too_long", "input.1"),
    "tokens": ({"input": [1, 2, 3]}, "invalid_value", "input"),
    "format": ({"input": "a", "encoding_format": "int8"}, "invalid_value", "encoding_format"),
    "unknown": ({"input": "a", "colour": "red"}, "unknown_field", "colour"),
}


@pytest.mark.parametrize("refusal", EMBEDDING_REFUSALS.values(), ids=EMBEDDING_REFUSALS.keys())
async def test_embeddings_refuse_bad_input_before_the_backend(
    ok: Any, refusal: tuple[dict[str, Any], str, str]
) -> None:
    backend, client = ok
    backend.limits = LimitsConfig(max_body_bytes=1_000_000)
    fields, code, param = refusal
    response = await client.post("/v1/embeddings", json={"model": "tiny", **fields})
    error = assert_envelope(response, 400, "invalid_request_error", code)  # OpenAI's status
    assert error["param"] == param, error
    assert backend.seen == []


async def test_embeddings_refuse_a_dimension_other_than_the_models(ok: Any) -> None:
    _, client = ok
    body = {"model": "tiny", "input": "a cat", "dimensions": 4}
    response = await client.post("/v1/embeddings", json=body)
    error = assert_envelope(response, 400, "invalid_request_error", "unsupported_dimensions")
    assert error["param"] == "dimensions" and str(DIMENSION) in error["message"]


async def test_the_openai_sdk_creates_embeddings() -> None:
    backend = FakeBackend(api_keys=("sk-local",))
    http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=build_api(lambda: backend)), base_url="http://test"
    )
    sdk = openai.AsyncOpenAI(
        base_url="http://test/v1", api_key="sk-local", http_client=http, max_retries=0
    )
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    result = await sdk.embeddings.create(model="tiny", input=["a cat", _image_url()])
    assert backend.embedded[-1].encoding_format == "base64"
    assert [item.index for item in result.data] == [0, 1]
    for item in result.data:
        assert np.array_equal(np.asarray(item.embedding, dtype=np.float32), vector(item.index))
    floats = await sdk.embeddings.create(model="tiny", input="a cat", encoding_format="float")
    assert np.array_equal(np.asarray(floats.data[0].embedding, dtype=np.float32), vector(0))
    assert floats.usage.prompt_tokens == 1
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.embeddings.create(model="tiny", input="a cat", dimensions=3)
    assert refused.value.code == "unsupported_dimensions"


# ---- capabilities, schedulers, validation and result metadata ----------------------------------


async def test_capabilities_list_what_each_model_takes(ok: Any) -> None:
    _, client = ok
    response = await client.get("/v1/capabilities")
    assert response.status_code == 200, response.text
    answer = response.json()
    models = {model["id"]: model for model in answer["models"]}
    assert list(models) == ["tiny", "tiny-inpaint", "big"]
    tiny, inpaint, big = models["tiny"], models["tiny-inpaint"], models["big"]
    assert tiny["tasks"] == {
        "txt2img": True,
        "img2img": True,
        "inpaint": True,
        "inpainting_unet": False,
        "start_image": True,
        "noise_mask": True,
        "image_prompt": True,
        "controlnet": True,
        "refiner": False,
    }
    assert (inpaint["tasks"]["inpainting_unet"], inpaint["tasks"]["image_prompt"]) == (True, False)
    assert inpaint["tasks"]["controlnet"] is False and inpaint["controlnets"] == []
    assert big["tasks"]["inpainting_unet"] is None  # no replica has built it yet
    assert tiny["samplers"] == list(SCHEDULER_NAMES) and tiny["default_sampler"] is None
    assert tiny["preview_kinds"] == ["none", "latent", "tiny", "full"]
    assert inpaint["preview_kinds"] == ["none", "latent", "full"]  # no preview decoder
    assert (tiny["loras"], inpaint["loras"]) == (["tiny-lora"], [])
    assert tiny["controlnets"] == [{"id": "tiny-canny", "preprocessors": ["none", "canny"]}]
    assert tiny["refiner"] is None
    assert (tiny["default_width"], tiny["default_steps"]) == (None, 30)
    assert (big["default_width"], big["default_height"]) == (1024, 1024)  # the checkpoint's
    assert tiny["runtime"] == RUNTIMES["tiny"]
    assert big["runtime"]["dtype"] == "float16" and big["runtime"]["built"] is False
    assert answer["provider_models"] == [
        {
            "id": "cloud/gpt-image-1",
            "backend": "cloud",
            "kind": "openai",
            "tasks": ["txt2img"],
            "refuses": [
                "init_image",
                "mask",
                "start_image",
                "image_prompt",
                "noise_mask",
                "controlnet",
                "loras",
                "refiner",
            ],
        }
    ]
    assert answer["limits"] == CONFIG.limits.model_dump()
    assert answer["batching"]["max_batch_images"] == 6


def test_a_configured_preview_decoder_the_engine_lacks_is_not_advertised() -> None:
    engines = {**ENGINES, "tiny": {"inpainting_unet": False, "tiny_preview": False}}
    table = build_capabilities(CONFIG, RUNTIMES, engines, {})
    assert "tiny" not in table.models[0].preview_kinds
    assert table.models[2].default_width is None  # the checkpoint's size is not known yet


async def test_schedulers_list_each_sampler_with_its_diffusers_class(ok: Any) -> None:
    _, client = ok
    listing = (await client.get("/v1/schedulers")).json()
    assert listing["object"] == "list"
    assert [entry["name"] for entry in listing["data"]] == list(SCHEDULER_NAMES)
    for entry in listing["data"]:
        assert (entry["class_name"], entry["options"]) == SAMPLERS[entry["name"]]
    karras = next(e for e in listing["data"] if e["name"] == "dpmpp_2m_karras")
    assert karras == {
        "name": "dpmpp_2m_karras",
        "class_name": "DPMSolverMultistepScheduler",
        "options": {"use_karras_sigmas": True},
    }


async def test_validate_answers_the_resolved_request_and_its_estimate(ok: Any) -> None:
    backend, client = ok
    response = await client.post("/v1/generate/validate", json={**BODY, "n": 2})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"request", "images", "estimate"}
    assert answer["request"]["steps"] == 8 and answer["request"]["n"] == 2
    assert answer["estimate"] == {"queue_ms": 0.0, "run_ms": 80.0, "peak_memory_bytes": 1000}
    assert [method for method, _ in backend.seen] == ["validate"]  # nothing generated


INTAKE_REFUSALS = {
    "unknown-field": ({**BODY, "colour": "red"}, 422, "unknown_field", "colour"),
    "scheduler": ({**BODY, "scheduler": "warp"}, 422, "unknown_scheduler", "scheduler"),
    "missing-prompt": ({"model": "tiny"}, 422, "missing_field", "prompt"),
    "conflict": ({**BODY, "mask": "x"}, 422, "invalid_value", "mask"),
    "too-large": ({**BODY, "prompt": "x" * 5000}, 413, "body_too_large", None),
}


@pytest.mark.parametrize("refusal", INTAKE_REFUSALS.values(), ids=INTAKE_REFUSALS.keys())
async def test_validate_refuses_what_generate_refuses_alike(
    ok: Any, refusal: tuple[dict[str, Any], int, str, str | None]
) -> None:
    backend, client = ok
    body, status, code, param = refusal
    answers = [
        await client.post(path, json=body) for path in ("/v1/generate", "/v1/generate/validate")
    ]
    errors = [assert_envelope(answer, status, "invalid_request_error", code) for answer in answers]
    assert errors[0] == errors[1] and errors[0]["param"] == param
    assert backend.seen == []


def test_peak_memory_grows_with_size_rows_and_weights() -> None:
    def peak(**changes: Any) -> int:
        base = {"weights_bytes": 10**9, "n": 1, "guidance_scale": 5.0, "width": 512}
        args = {**base, "height": 512, "dtype": "float16", **changes}
        return peak_memory_bytes(**args)

    sides = [peak(width=side, height=side) for side in (64, 256, 512, 1024, 2048)]
    assert sides == sorted(sides) and len(set(sides)) == len(sides)
    counts = [peak(n=n) for n in (1, 2, 3, 4)]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    activations = peak() - 10**9
    assert peak(n=2) - 10**9 == 2 * activations  # proportional to rows...
    assert peak(guidance_scale=1.0) - 10**9 == activations // 2  # ...which guidance doubles
    assert peak(width=1024, height=1024) - 10**9 == 4 * activations  # ...and to latent pixels
    assert peak(dtype="float32") - 10**9 == 2 * activations
    assert peak(weights_bytes=2 * 10**9) - peak() == 10**9
    # SDXL at 1024x1024 with guidance: the activations are a few GB, on top of the weights.
    assert 2 * 10**9 < peak(width=1024, height=1024, weights_bytes=0) < 6 * 10**9


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (16, 8)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_request_record_keeps_digests_not_image_bytes() -> None:
    init, mask = _png((10, 20, 30)), _png((255, 255, 255))
    request = GenerateRequest.model_validate(
        {
            **BODY,
            "init_image": init,
            "mask": "data:image/png;base64," + mask,
            "noise_mask": {"image": mask, "strength": 0.3},
        }
    )
    images = decode_images(request, LimitsConfig())
    record = request_record(request, images)
    fields = record.request
    assert fields["init_image"] is None and fields["mask"] is None
    assert fields["noise_mask"] == {**request.noise_mask.model_dump(), "image": None}  # type: ignore[union-attr]
    assert fields["prompt"] == "a cat" and init not in json.dumps(fields)
    assert set(record.images) == {"init_image", "mask", "noise_mask.image"}
    expected = hashlib.sha256(Image.new("RGB", (16, 8), (10, 20, 30)).tobytes()).hexdigest()
    assert record.images["init_image"].model_dump() == {
        "sha256": expected,
        "width": 16,
        "height": 8,
    }
    # The same pixels, however they were sent, have the same digest.
    assert record.images["mask"] == record.images["noise_mask.image"]
    assert (
        request_record(
            GenerateRequest(**BODY), decode_images(GenerateRequest(**BODY), LimitsConfig())
        ).images
        == {}
    )


def test_result_metadata_survives_the_response_and_is_small() -> None:
    metadata = ResultMetadata(
        request={**BODY, "seed": 3, "init_image": None},
        components={"unet": {"diffusion_pytorch_model.safetensors": "ab" * 32}},
        scheduler=SchedulerRecord(
            class_name="DPMSolverMultistepScheduler",
            config={"beta_end": 0.012, "lambda_min_clipped": float("-inf"), "x": [float("nan")]},
        ),
        versions={"torch": "2", "diffusion_serve": "0.1.0"},
    )
    result = _result("r-1")
    result.metadata = metadata
    response = result.to_response()
    assert response.metadata == metadata
    # Strict JSON (our responses' encoding) has no infinities: diffusers' -inf is spelled out.
    config = response.model_dump()["metadata"]["scheduler"]["config"]
    assert config == {"beta_end": 0.012, "lambda_min_clipped": "-Infinity", "x": ["NaN"]}
    assert float(config["lambda_min_clipped"]) == float("-inf")
    assert len(json.dumps(response.model_dump()["metadata"], allow_nan=False)) < 1000
    assert GenerateResponse.model_validate(json.loads(response.model_dump_json())) == response
    assert _result("r-2").to_response().metadata is None  # a provider's result carries none


async def test_openapi_documents_the_pre_flight_routes(ok: Any) -> None:
    _, client = ok
    document = (await client.get("/openapi.json")).json()
    paths = document["paths"]
    validate = paths["/v1/generate/validate"]["post"]
    assert validate["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/GenerateRequest"
    }
    for path, method, name in (
        ("/v1/generate/validate", "post", "ValidateResponse"),
        ("/v1/capabilities", "get", "CapabilitiesResponse"),
        ("/v1/schedulers", "get", "SchedulerList"),
    ):
        answer = paths[path][method]["responses"]["200"]["content"]["application/json"]
        assert answer["schema"] == {"$ref": f"#/components/schemas/{name}"}, path
    schemas = document["components"]["schemas"]
    assert {"Estimate", "ImageDigest", "LocalModelCapabilities", "ResultMetadata"} <= set(schemas)
    assert "metadata" in schemas["GenerateResponse"]["properties"]
    assert "peak_memory_bytes" in schemas["Estimate"]["properties"]
