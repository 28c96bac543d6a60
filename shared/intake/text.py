"""The one text rule every string a user sends obeys, whatever its field: prompts, negative
prompts, embeddings input, ids, form fields, query parameters.

- It is valid Unicode: a lone surrogate (`"\\ud800"` is a legal JSON escape) is refused. Python
  keeps it in a `str`, and it breaks what comes after: tokenizers raise, UTF-8 encoders raise,
  databases refuse it.
- It holds no C0 control character other than tab, line feed and carriage return: a NUL ends a
  C string and is refused by PostgreSQL's text type; the others have no meaning in a prompt and
  usually mean a client encoded the wrong thing.

Both checks run at C speed (`str.isascii`, `str.encode`, one regex search), so a 20 MB base64
string costs milliseconds.
"""

from __future__ import annotations

import re

from shared.errors import InvalidRequestError

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_CONTROL_BYTES = bytes([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20)])
# Past this length an ASCII string is checked by bytes.translate, about 5x faster than the regex
# (a base64 image is megabytes of ASCII).
_LONG = 65536


def check_text(value: str, param: str | None) -> None:
    """Refuse a string that breaks the text rule, naming `param` and the offending position."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            code_point = ord(value[exc.start])
            raise InvalidRequestError(
                f"{param or 'the body'} holds a lone surrogate (U+{code_point:04X}) at character "
                f"{exc.start}; text must be valid Unicode",
                code="invalid_value",
                param=param,
            ) from None
    if len(value) > _LONG and value.isascii():
        raw = value.encode("ascii")
        if len(raw.translate(None, _CONTROL_BYTES)) == len(raw):
            return
    match = _CONTROL.search(value)
    if match is not None:
        raise InvalidRequestError(
            f"{param or 'the body'} holds the control character U+{ord(match.group()):04X} at "
            f"character {match.start()}; only tab, line feed and carriage return are allowed",
            code="invalid_value",
            param=param,
        )


def check_length(value: str, param: str, limit: int, code: str = "prompt_too_long") -> None:
    """Refuse text longer than `limit` characters."""
    if len(value) > limit:
        raise InvalidRequestError(
            f"{param} is {len(value)} characters long; the limit is {limit}", code=code, param=param
        )
