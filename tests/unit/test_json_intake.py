"""JSON bodies and text under limits (shared/intake/json_body.py, text.py): every hostile body is a
4xx with a specific code in milliseconds, never a parser exception; the same limits hold for a
handle caller's dict; a structural fuzz finds nothing but 4xx or a parsed object."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.config import LimitsConfig
from shared.errors import ServeError
from shared.intake.json_body import check_tree, parse_json_object
from shared.intake.text import check_text

LIMITS = LimitsConfig()


def refusal(body: bytes, limits: LimitsConfig = LIMITS) -> tuple[int, str, str | None]:
    started = time.perf_counter()
    with pytest.raises(ServeError) as info:
        parse_json_object(body, limits)
    assert time.perf_counter() - started < 0.25, "refused in milliseconds"
    return info.value.status, info.value.code, info.value.param


HOSTILE = {
    "deep objects": (b'{"a":' * 5000 + b"1" + b"}" * 5000, (400, "json_too_deep", None)),
    "deep arrays in a field": (
        b'{"prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        (400, "json_too_deep", None),
    ),
    "just past the depth limit": (b'{"a":' * 33 + b"1" + b"}" * 33, (400, "json_too_deep", None)),
    "just past it in arrays": (
        b'{"a":' + b"[" * 32 + b"]" * 32 + b"}",
        (400, "json_too_deep", None),
    ),
    "a 5000-digit integer": (
        b'{"seed": 1' + b"0" * 5000 + b"}",
        (400, "json_number_too_long", None),
    ),
    "a 5000-digit float": (
        b'{"guidance_scale": 0.' + b"1" * 5000 + b"}",
        (400, "json_number_too_long", None),
    ),
    "an overflowing float": (b'{"strength": 1e999}', (400, "json_number_out_of_range", None)),
    "NaN": (b'{"guidance_scale": NaN}', (400, "malformed_json", None)),
    "Infinity": (b'{"guidance_scale": -Infinity}', (400, "malformed_json", None)),
    "a duplicate key": (b'{"seed": 1, "seed": 2}', (400, "json_duplicate_key", None)),
    "a lone surrogate": (b'{"prompt": "a \\ud800 b"}', (422, "invalid_value", "prompt")),
    "a lone surrogate in a list": (
        b'{"input": ["ok", "\\udfff"]}',
        (422, "invalid_value", "input.1"),
    ),
    "a lone surrogate in a key": (b'{"\\ud800": 1}', (422, "invalid_value", None)),
    "a NUL": (b'{"prompt": "a\\u0000b"}', (422, "invalid_value", "prompt")),
    "an escape character deep inside": (
        b'{"loras": [{"id": "x\\u001b[31m"}]}',
        (422, "invalid_value", "loras.0.id"),
    ),
    "a long array": (
        json.dumps({"loras": [0] * 2000}).encode(),
        (422, "too_many_items", "loras"),
    ),
    "many keys": (
        json.dumps({"metadata": {str(i): 1 for i in range(300)}}).encode(),
        (422, "too_many_keys", "metadata"),
    ),
    "a long key": (json.dumps({"k" * 300: 1}).encode(), (422, "key_too_long", None)),
    "not UTF-8": (b'{"prompt": "\xff"}', (400, "malformed_json", None)),
    "truncated": (b'{"prompt": "a', (400, "malformed_json", None)),
    "an array body": (b"[1, 2]", (400, "malformed_json", None)),
    "a string body": (b'"x"', (400, "malformed_json", None)),
    "empty": (b"", (400, "malformed_json", None)),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_bodies_get_their_4xx_fast(name: str) -> None:
    body, expected = HOSTILE[name]
    assert refusal(body) == expected


def test_what_passes() -> None:
    body = {
        "prompt": 'tabs\tnew\nlines\r\n, brackets [[{{ and quotes " and unicode: 猫 🐈',
        "seed": 2**63 - 1,
        "guidance_scale": 7.5,
        "nested": {"a": [[[1]]]},
    }
    assert parse_json_object(json.dumps(body).encode(), LIMITS) == body
    deepest = b'{"a":' * 32 + b"1" + b"}" * 32  # 32 levels of objects, the body's own first
    assert parse_json_object(deepest, LIMITS)
    # A UTF-8 byte-order mark is skipped, as JSON parsers may do (RFC 8259 8.1).
    assert parse_json_object(b'\xef\xbb\xbf{"a": 1}', LIMITS) == {"a": 1}


def test_a_large_image_string_costs_milliseconds() -> None:
    body = json.dumps({"prompt": "x", "init_image": "A" * 15_000_000}).encode()
    started = time.perf_counter()
    parse_json_object(body, LIMITS)
    assert time.perf_counter() - started < 1.0  # ~0.1 s on the 2-core CI machine


def test_limits_are_config() -> None:
    limits = LimitsConfig(max_json_depth=4, max_json_number_chars=20, max_json_array_items=16)
    assert refusal(b'{"a":{"b":{"c":{"d":{"e":1}}}}}', limits)[1] == "json_too_deep"
    assert parse_json_object(
        b'{"a":{"b":{"c":{"d":1}}}}', limits
    )  # four levels, the body's own first
    assert refusal(b'{"seed": 123456789012345678901}', limits)[1] == "json_number_too_long"
    assert refusal(json.dumps({"a": [0] * 17}).encode(), limits)[1] == "too_many_items"


def test_a_handle_callers_dict_is_held_to_the_same_limits() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(10_000):  # deeper than Python's recursion limit: the walk is iterative
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ServeError) as info:
        check_tree({"prompt": "x", "x": deep}, LIMITS)
    assert info.value.code == "json_too_deep"
    with pytest.raises(ServeError) as info:
        check_tree({"prompt": "\ud800"}, LIMITS)
    assert (info.value.status, info.value.param) == (422, "prompt")
    with pytest.raises(ServeError) as info:
        check_tree({1: "x"}, LIMITS)
    assert info.value.status == 422
    check_tree({"prompt": "fine", "loras": [{"id": "a", "scale": 1.0}]}, LIMITS)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("plain", True),
        ("tab\tLF\nCR\r", True),
        ("DEL \x7f is printable enough", True),
        ("emoji 🐈 and CJK 猫", True),
        ("NUL \x00", False),
        ("bell \x07", False),
        ("escape \x1b[0m", False),
        ("lone \ud800", False),
        ("lone low \udc00", False),
        ("A" * 100_000 + "\x00", False),  # the long-string path
        ("A" * 100_000, True),
    ],
)
def test_the_text_rule(text: str, ok: bool) -> None:
    if ok:
        check_text(text, "prompt")
    else:
        with pytest.raises(ServeError) as info:
            check_text(text, "prompt")
        assert (info.value.status, info.value.code, info.value.param) == (
            422,
            "invalid_value",
            "prompt",
        )


# ---- structural fuzz: whatever the value, a parsed object or a ServeError ----------------------

_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**80), max_value=10**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
_TREES = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=60,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_TREES, wrap=st.integers(min_value=0, max_value=60))
def test_fuzzed_structures_are_parsed_or_refused(value: Any, wrap: int) -> None:
    for _ in range(wrap):
        value = {"a": value}
    body = json.dumps({"prompt": "x", "v": value}).encode()
    try:
        parse_json_object(body, LIMITS)
    except ServeError as exc:
        assert 400 <= exc.status < 500


@settings(max_examples=400, deadline=None)
@given(raw=st.binary(max_size=300))
def test_fuzzed_bytes_are_parsed_or_refused(raw: bytes) -> None:
    for body in (raw, b'{"prompt": ' + raw + b"}", b'{"a": [' + raw):
        try:
            parse_json_object(body, LIMITS)
        except ServeError as exc:
            assert 400 <= exc.status < 500
