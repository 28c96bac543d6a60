"""Fake cloud image providers: loopback HTTP servers that speak each provider's real protocol.

    with start_fake("openai") as fake:          # or: fake = start_fake("runware"); fake.stop()
        fake.inject(Fault.status_code(503), times=2)
        ...point a client (or a Ray Serve app) at fake.config() / fake.url, key in fake.env...
        assert len(fake.calls_to("/v1/images/generations")) == 3

Kinds: openai, runware, gemini, parasail. Options per kind go to the fake's constructor
(`stream_interval_s` for openai/parasail, `image_models`/`images_enabled` for parasail,
`image_models` for gemini, and `api_key`, `api_key_env`, `models` for all).
"""

from __future__ import annotations

from typing import Any

from tests.fakes.gemini_fake import GeminiFake
from tests.fakes.images import make_b64, make_image
from tests.fakes.openai_fake import OpenAIFake, ParasailFake
from tests.fakes.runware_fake import RunwareFake
from tests.fakes.server import Call, FakeProvider, Fault

FAKES: dict[str, type[FakeProvider]] = {
    "openai": OpenAIFake,
    "runware": RunwareFake,
    "gemini": GeminiFake,
    "parasail": ParasailFake,
}


def start_fake(kind: str, **options: Any) -> FakeProvider:
    """A started fake of `kind`; stop it with `.stop()` or use it as a context manager."""
    return FAKES[kind](**options).start()


__all__ = [
    "FAKES",
    "Call",
    "FakeProvider",
    "Fault",
    "GeminiFake",
    "OpenAIFake",
    "ParasailFake",
    "RunwareFake",
    "make_b64",
    "make_image",
    "start_fake",
]
