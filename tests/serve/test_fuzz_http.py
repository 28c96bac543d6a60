"""A structural JSON fuzz (hypothesis) through real HTTP on every POST route of the default app:
bodies built from each route's own field names with hostile values — wrong types, nesting,
huge and non-finite numbers, lone surrogates, control characters, empty and broken images — and
raw byte mutations. Never a 5xx; every 4xx carries the envelope; every stream ends with exactly
one terminal event."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.api.embeddings import EmbeddingsRequest
from shared.api.openai_images import ImagesGenerationRequest
from shared.api.schemas import GenerateRequest

SMALL = {"model": "tiny", "prompt": "a fox", "width": 64, "height": 64, "steps": 1}
_NUMBERS = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, -1, 2**63, 10**30, 1e308, 0.5])
)
_TEXT = st.text(max_size=30) | st.sampled_from(["", " ", "\ud800", "a\x00b", "\x1b[31m", "😀" * 5])
_IMAGES = st.sampled_from(["", "   ", "data:image/png;base64,", "iVBORw0KGgo=", "https://x/y.png",
                           "not base64 at all!", "data:text/plain,hello"])  # fmt: skip
_LEAF = st.none() | st.booleans() | _NUMBERS | _TEXT | _IMAGES
_VALUES = st.recursive(
    _LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)
# Raw JSON text where Python's json module itself would fail: too deep, too long, not finite.
_RAW = st.sampled_from(
    [
        "[" * 3000 + "]" * 3000,
        "1" + "0" * 5000,
        "NaN",
        "-Infinity",
        "1e999",
        '"\\ud800"',
        '{"a": 1, "a": 2}',
    ]
)


def _bodies(fields: list[str], base: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """The base request with some of the route's fields replaced by hostile values, some raw
    JSON spliced in, or the whole body mutated."""
    changes = st.dictionaries(st.sampled_from(fields), _VALUES, max_size=4)

    def encode(change: dict[str, Any], raw: tuple[str, str] | None) -> bytes:
        text = json.dumps({**base, **change})
        if raw is not None:
            name, literal = raw
            text = text[:-1] + f', "{name}": {literal}' + "}"
        return text.encode("utf-8", "surrogatepass")

    spliced = st.none() | st.tuples(st.sampled_from(fields), _RAW)
    structured = st.builds(encode, changes, spliced)
    mutated = st.builds(
        lambda body, cut, junk: body[:cut] + junk,
        structured,
        st.integers(min_value=0, max_value=60),
        st.binary(max_size=8),
    )
    return structured | mutated


def _assert_answer(response: httpx.Response, streamed: bool) -> None:
    assert response.status_code < 500, response.text[:300]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"type", "code", "message", "param"} and error["message"]
        return
    if streamed:
        lines = [line for line in response.text.splitlines() if line.strip()]
        events = [json.loads(line) for line in lines]
        kinds = [event.get("event") for event in events]
        assert kinds[0] == "queued" and kinds.count("result") + kinds.count("error") == 1
        assert kinds[-1] in ("result", "error")


ROUTES = {
    "generate": ("/v1/generate", list(GenerateRequest.model_fields), SMALL),
    "validate": ("/v1/generate/validate", list(GenerateRequest.model_fields), SMALL),
    "images": (
        "/v1/images/generations",
        list(ImagesGenerationRequest.model_fields),
        {"model": "tiny", "prompt": "a fox", "size": "64x64", "steps": 1},
    ),
    "embeddings": (
        "/v1/embeddings",
        list(EmbeddingsRequest.model_fields),
        {"model": "tiny", "input": ["a fox"]},
    ),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_fuzzed_bodies_never_get_a_5xx(client: httpx.Client, route: str) -> None:
    path, fields, base = ROUTES[route]

    @settings(
        max_examples=80,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(body=_bodies(fields, base))
    def check(body: bytes) -> None:
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        streamed = route == "generate" and response.headers.get("content-type", "").startswith(
            "application/x-ndjson"
        )
        _assert_answer(response, streamed)

    check()


def test_fuzzed_streams_end_with_one_terminal_event(client: httpx.Client) -> None:
    fields = list(GenerateRequest.model_fields)

    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(change=st.dictionaries(st.sampled_from(fields), _VALUES, max_size=3))
    def check(change: dict[str, Any]) -> None:
        body = json.dumps({**SMALL, **change, "stream": True}).encode("utf-8", "surrogatepass")
        response = client.post(
            "/v1/generate", content=body, headers={"content-type": "application/json"}
        )
        _assert_answer(response, streamed=response.status_code == 200)

    check()
