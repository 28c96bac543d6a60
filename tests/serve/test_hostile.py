"""The hostile and odd image corpus (tests/hostile/corpus.py) against the default app: every case in
every image field of every route — POST /v1/generate unary and streamed, its validate twin, GET
/v1/generate, OpenAI's edits (as file parts) and /v1/embeddings (as data:image/ items) — and
through the handle API. A refused case is its 4xx with the envelope, its code and the field as
`param`, in under 250 ms; a valid odd image is a 200 that ran (or, on validate, resolved)."""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.hostile.corpus import Case, image_cases
from tests.serve.conftest import APP_NAME

BASE = {"model": "tiny", "prompt": "a red fox", "steps": 2, "width": 64, "height": 64, "seed": 3}
REFUSED_WITHIN_S = 0.25
# GET carries the image in the query string: only the cases that fit a URL.
MAX_QUERY_CHARS = 4000


@functools.cache
def _valid_64() -> str:
    """A plain 64x64 PNG, the size of BASE: a valid init image for the mask cases."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _body_for(field: str, data: str) -> dict[str, Any]:
    """A request that puts `data` in `field` and needs nothing else to be valid."""
    if field == "mask":
        return {**BASE, "init_image": _valid_64(), "mask": data}
    if field == "controlnet.0.image":
        return {**BASE, "controlnet": [{"id": "tiny-canny", "image": data}]}
    if field == "noise_mask.image":
        return {**BASE, "noise_mask": {"image": data}}
    return {**BASE, field: data}


FIELDS = ("init_image", "mask", "start_image", "image_prompt", "controlnet.0.image",
          "noise_mask.image")  # fmt: skip


def _expected(case: Case, field: str) -> tuple[int, str | None]:
    """What a JSON route answers for the case in the field."""
    if case.status == 200 and field == "mask" and case.size != (64, 64):
        return 422, "mask_size_mismatch"  # a valid mask must have the init image's size
    return case.status, case.code


def _raw(case: Case) -> bytes | None:
    """The file bytes a multipart upload carries for the case; None for text that is no file
    (a URL, broken base64, a data: URL that is not base64)."""
    text = case.data.strip()
    if "://" in text or text.startswith("//"):
        return None
    if text[:5].lower() == "data:":
        head, _, text = text.partition(",")
        if not head.lower().endswith(";base64"):
            return None
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def _post(client: httpx.Client, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    content = json.dumps(body).encode()  # encoded before the clock starts
    return client.post(path, content=content, headers={"content-type": "application/json",
                                                        **headers})  # fmt: skip


def _check(
    response: httpx.Response, status: int, code: str | None, param: str, started: float
) -> None:
    took = time.perf_counter() - started
    assert response.status_code == status, response.text[:300]
    if status == 200:
        return
    error = response.json()["error"]
    assert set(error) == {"type", "code", "message", "param"}
    assert (error["code"], error["param"]) == (code, param), error
    assert took < REFUSED_WITHIN_S, f"refused in {took * 1000:.0f} ms"


def _stream_events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines() if line]


REFUSED = [case for case in image_cases() if case.status != 200]
VALID = [case for case in image_cases() if case.status == 200]


@pytest.mark.parametrize("field", FIELDS)
def test_refused_images_in_every_generate_field_unary_streamed_and_validated(
    client: httpx.Client, field: str
) -> None:
    for case in REFUSED:
        body = _body_for(field, case.data)
        for path, extra in (
            ("/v1/generate", {}),
            ("/v1/generate", {"stream": True}),
            ("/v1/generate/validate", {}),
        ):
            started = time.perf_counter()
            response = _post(client, path, {**body, **extra})
            _check(response, case.status, case.code, field, started)


@pytest.mark.parametrize("field", ["init_image", "start_image", "image_prompt"])
def test_refused_images_as_query_parameters(client: httpx.Client, field: str) -> None:
    for case in (c for c in REFUSED if len(c.data) <= MAX_QUERY_CHARS):
        params = {**BASE, field: case.data}
        started = time.perf_counter()
        response = client.get("/v1/generate", params=params)
        _check(response, case.status, case.code, field, started)


def _openai_status(status: int) -> int:
    return 400 if status == 422 else status  # OpenAI's routes answer a broken rule with 400


@pytest.mark.parametrize("part", ["image", "mask"])
def test_refused_images_as_edit_uploads(client: httpx.Client, part: str) -> None:
    valid = base64.b64decode(_valid_64())
    checked = 0
    for case in REFUSED:
        raw = _raw(case)
        if raw is None:
            continue
        files = {"image": ("a.png", raw if part == "image" else valid, "image/png")}
        if part == "mask":
            files["mask"] = ("m.png", raw, "image/png")
        data = {"model": "tiny", "prompt": "x", "steps": "2"}
        started = time.perf_counter()
        response = client.post("/v1/images/edits", files=files, data=data)
        _check(response, _openai_status(case.status), case.code, part, started)
        checked += 1
    assert checked >= 20


def test_refused_images_as_embeddings_inputs(client: httpx.Client) -> None:
    for case in REFUSED:
        raw = _raw(case)
        if raw is None:
            continue
        item = "data:image/png;base64," + base64.b64encode(raw).decode()
        body = {"model": "tiny", "input": ["a fox", item]}
        started = time.perf_counter()
        response = _post(client, "/v1/embeddings", body)
        _check(response, _openai_status(case.status), case.code, "input.1", started)


def test_valid_odd_images_run_in_every_field(client: httpx.Client) -> None:
    """Each valid case, in each field, validated and generated (unary and streamed, a few at a
    time: the step batcher shares their UNet calls)."""

    def run(job: tuple[Case, str]) -> None:
        case, field = job
        status, code = _expected(case, field)
        body = _body_for(field, case.data)
        validated = _post(client, "/v1/generate/validate", body)
        assert validated.status_code == status, (case.name, field, validated.text[:300])
        if status != 200:
            assert validated.json()["error"]["code"] == code
            return
        unary = _post(client, "/v1/generate", body)
        assert unary.status_code == 200, (case.name, field, unary.text[:300])
        assert len(unary.json()["images"]) == 1
        streamed = _post(client, "/v1/generate", {**body, "stream": True})
        events = _stream_events(streamed)
        assert [e["event"] for e in events if e["event"] in ("result", "error")] == ["result"]

    jobs = [(case, field) for case in VALID for field in FIELDS]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(run, jobs))


def test_valid_odd_images_as_uploads_and_embeddings(client: httpx.Client) -> None:
    for case in VALID:
        raw = _raw(case)
        assert raw is not None, case.name
        item = "data:image/png;base64," + base64.b64encode(raw).decode()
        embedded = _post(client, "/v1/embeddings", {"model": "tiny", "input": [item]})
        assert embedded.status_code == 200, (case.name, embedded.text[:300])
    edited = client.post(
        "/v1/images/edits",
        files={"image": ("a.png", base64.b64decode(_valid_64()), "image/png")},
        data={"model": "tiny", "prompt": "x", "steps": "2"},
    )
    assert edited.status_code == 200, edited.text[:300]


@pytest.fixture(scope="module")
def handle_client(app_url: str) -> Any:
    from ray import serve

    from tests.serve.handle_client import HandleClient

    return serve.run(HandleClient.bind(APP_NAME), name="hostile-handle", route_prefix=None)


def test_refused_images_through_the_handle_api(handle_client: Any) -> None:
    for case in REFUSED:
        for field in ("init_image", "image_prompt", "controlnet.0.image"):
            error = handle_client.failing.remote(_body_for(field, case.data)).result(timeout_s=60)
            assert (error["status"], error["code"], error["param"]) == (
                case.status,
                case.code,
                field,
            ), case.name
        events = handle_client.streamed.remote(_body_for("mask", case.data)).result(timeout_s=60)
        assert [e["event"] for e in events] == ["error"], case.name
        assert (events[0]["error"]["code"], events[0]["error"]["param"]) == (case.code, "mask")
