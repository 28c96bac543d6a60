"""JSON bodies under limits: whatever the bytes, the answer is a parsed object or a 4xx, never a
parser exception, a stall or a deep recursion.

Python's `json` raises `RecursionError` past about 1000 levels of nesting and `ValueError` on an
integer literal over 4300 digits, and takes `NaN`, `Infinity` and duplicate keys silently. So:

- nesting deeper than `max_json_depth` is 400 `json_too_deep` (the parser's own RecursionError
  past ~1000 levels included);
- number literals are checked by length as the parser meets them (`parse_int`/`parse_float`):
  longer than `max_json_number_chars` is 400 `json_number_too_long`; one that overflows a float
  (`1e999`) is 400 `json_number_out_of_range`;
- `NaN`, `Infinity` and `-Infinity` (not JSON, though Python writes them) are 400
  `malformed_json`;
- a key given twice in one object is 400 `json_duplicate_key` (which one wins differs between
  parsers, so neither does);
- objects with more than `max_json_object_keys` keys, keys longer than `max_json_key_chars`, and
  arrays longer than `max_json_array_items` are 422 naming the path (`param`);
- every string, key or value, obeys `shared.intake.text.check_text` (422 `invalid_value`).

`check_tree` applies the same limits to a Python value that never was JSON (the handle API).
"""

from __future__ import annotations

import json
import math
from typing import Any

from shared.config import LimitsConfig
from shared.errors import InvalidRequestError, MalformedRequestError, PayloadTooLargeError
from shared.intake.text import check_text


class _Refused(Exception):
    """Carries a ServeError out of a json hook without the parser wrapping it."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def parse_json_object(body: bytes, limits: LimitsConfig) -> dict[str, Any]:
    """The body as a JSON object, every limit checked; a 4xx otherwise."""
    if len(body) > limits.max_body_bytes:
        raise PayloadTooLargeError(
            f"request body is {len(body):,} bytes; the limit is {limits.max_body_bytes:,}"
        )
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MalformedRequestError(
            f"request body is not UTF-8: invalid byte at offset {exc.start}"
        ) from None
    try:
        data = json.loads(
            text,
            parse_int=_number_parser(int, limits),
            parse_float=_number_parser(float, limits),
            parse_constant=_refuse_constant,
            object_pairs_hook=_unique_keys,
        )
    except _Refused as refused:
        raise refused.error from None
    except RecursionError:
        # Past about a thousand levels; shallower excess is measured by check_tree below.
        raise MalformedRequestError(
            f"the body nests deeper than {limits.max_json_depth} levels", code="json_too_deep"
        ) from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise MalformedRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedRequestError("request body must be a JSON object")
    check_tree(data, limits)
    return data


def check_tree(value: Any, limits: LimitsConfig) -> None:
    """Depth, array lengths, key counts and lengths, and the text rule on every string of a
    decoded body or a handle caller's dict; refuses with the path of the first offence."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, str):
            check_text(node, path or None)
            continue
        if not isinstance(node, dict | list | tuple):
            continue
        if depth >= limits.max_json_depth:
            raise MalformedRequestError(
                f"the body nests deeper than {limits.max_json_depth} levels at {path or 'its top'}",
                code="json_too_deep",
            )
        if isinstance(node, dict):
            _check_keys(list(node), path, limits)
            items = node.items()
            children = [(child, f"{path}.{key}" if path else str(key)) for key, child in items]
        else:
            if len(node) > limits.max_json_array_items:
                raise InvalidRequestError(
                    f"{path or 'the body'} has {len(node):,} items; the limit is "
                    f"{limits.max_json_array_items:,}",
                    code="too_many_items",
                    param=path or None,
                )
            children = [(child, f"{path}.{i}" if path else str(i)) for i, child in enumerate(node)]
        stack.extend((child, child_path, depth + 1) for child, child_path in reversed(children))


def _number_parser(kind: type[int] | type[float], limits: LimitsConfig) -> Any:
    def parse(literal: str) -> int | float:
        if len(literal) > limits.max_json_number_chars:
            raise _Refused(
                MalformedRequestError(
                    f"a number in the body is {len(literal):,} characters long; the limit is "
                    f"{limits.max_json_number_chars}",
                    code="json_number_too_long",
                )
            )
        value = kind(literal)
        if isinstance(value, float) and not math.isfinite(value):
            raise _Refused(
                MalformedRequestError(
                    f"the number {literal} is out of range for a 64-bit float",
                    code="json_number_out_of_range",
                )
            )
        return value

    return parse


def _refuse_constant(name: str) -> Any:
    raise _Refused(
        MalformedRequestError(f"{name} is not a JSON number; send a finite number or null")
    )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(
                    MalformedRequestError(
                        f"the key {key[:100]!r} appears twice in one object; give each field once",
                        code="json_duplicate_key",
                    )
                )
            seen.add(key)
    return data


def _check_keys(keys: list[Any], path: str, limits: LimitsConfig) -> None:
    where = path or "the body"
    if len(keys) > limits.max_json_object_keys:
        raise InvalidRequestError(
            f"{where} has {len(keys):,} keys; the limit is {limits.max_json_object_keys:,}",
            code="too_many_keys",
            param=path or None,
        )
    for key in keys:
        if not isinstance(key, str):
            raise InvalidRequestError(
                f"{where} has a key that is not a string: {type(key).__name__}",
                param=path or None,
            )
        if len(key) > limits.max_json_key_chars:
            raise InvalidRequestError(
                f"{where} has a key {len(key):,} characters long; the limit is "
                f"{limits.max_json_key_chars}",
                code="key_too_long",
                param=path or None,
            )
        check_text(key, path or None)
