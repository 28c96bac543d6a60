"""ProviderConfig validation, the kind registry, the loopback guard, and the small parsers the
clients share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import get_args

import pytest
from pydantic import TypeAdapter, ValidationError

from shared.providers import (
    CLIENTS,
    LOOPBACK_ONLY_ENV,
    ProviderBadResponseError,
    ProviderConfig,
    ProviderConfigBase,
    ProviderConfigError,
    build_client,
)
from shared.providers.images import b64_payload, describe
from shared.providers.openai_images import OpenAIOptions, OpenAIProviderConfig
from shared.providers.sse import ServerSentEvent, iter_sse
from tests.fakes import make_b64, make_image

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


PROVIDER_CONFIG: TypeAdapter[ProviderConfig] = TypeAdapter(ProviderConfig)
CONFIG_CLASSES: tuple[type[ProviderConfigBase], ...] = get_args(get_args(ProviderConfig)[0])


def kind_of(config_class: type[ProviderConfigBase]) -> str:
    (kind,) = get_args(config_class.model_fields["kind"].annotation)
    return str(kind)


KINDS = sorted(kind_of(config_class) for config_class in CONFIG_CLASSES)


def config(**fields: object) -> ProviderConfigBase:
    return PROVIDER_CONFIG.validate_python(
        {"name": "p", "kind": "openai", "models": ["m"]} | fields
    )


# -- ProviderConfig -------------------------------------------------------------------------------


def test_defaults_fill_in_the_public_endpoint_and_key_variable() -> None:
    openai = config()
    assert isinstance(openai, OpenAIProviderConfig)
    assert openai.openai == OpenAIOptions()  # the kind's block, with its defaults, when left out
    assert config().url == "https://api.openai.com"
    assert config().key_env == "OPENAI_API_KEY"
    assert config(kind="gemini").url == "https://generativelanguage.googleapis.com"
    assert config(base_url="http://127.0.0.1:9/").url == "http://127.0.0.1:9"
    assert config().allow_remote is True


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"timeout": {"read_s": 1}}, "timeout"),
        ({"retries": {"max_attempts": 0}}, "max_attempts"),
        ({"retries": {"base_backoff_s": 5, "max_backoff_s": 1}}, "exceeds max_backoff_s"),
        ({"base_url": "https://api.openai.com/v1"}, "API version"),
        ({"base_url": "ftp://host"}, r"http\(s\) URL"),
        ({"base_url": "https://user:pw@host"}, "credentials"),
        ({"kind": "dalle"}, "'kind' does not match any of the expected tags: 'openai'"),
        ({"kind": None}, "kind"),
        ({"models": []}, "models"),
        ({"name": "Bad Name"}, "name"),
        ({"kind": "gemini", "gemini": {"response_modalities": ["TEXT"]}}, "must include IMAGE"),
    ],
)
def test_mistakes_fail_with_the_field_named(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        config(**fields)


@pytest.mark.parametrize(
    ("kind", "other"), [(kind, other) for kind in KINDS for other in KINDS if other != kind]
)
def test_an_options_block_of_another_kind_is_refused_by_name(kind: str, other: str) -> None:
    assert getattr(config(kind=kind, **{kind: {}}), kind) is not None  # its own block is fine
    with pytest.raises(ValidationError, match=rf"{kind}\.{other}\n  Extra inputs") as caught:
        config(kind=kind, **{other: {}})
    (error,) = caught.value.errors()
    assert (error["loc"], error["type"]) == ((kind, other), "extra_forbidden")


def test_every_kind_in_the_union_has_a_client() -> None:
    assert set(CLIENTS) == set(CONFIG_CLASSES)
    assert len(set(KINDS)) == len(KINDS)
    for config_class, client in CLIENTS.items():
        kind = kind_of(config_class)
        assert client.config_class is config_class
        assert kind in config_class.model_fields, f"{kind} has no `{kind}:` options block"
        built = config(kind=kind)  # the class's endpoint and key variable fill in the defaults
        assert type(built) is config_class
        assert built.url.startswith("https://") and built.key_env.endswith("_API_KEY")


@pytest.mark.parametrize("config_class", CONFIG_CLASSES, ids=kind_of)
def test_every_field_has_a_description(config_class: type[ProviderConfigBase]) -> None:
    for field_name, field in config_class.model_fields.items():
        assert field.description, field_name


# -- loopback guard -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_remote_host_is_refused_in_loopback_only_mode(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LOOPBACK_ONLY_ENV, "1")
    with pytest.raises(ProviderConfigError, match="not loopback") as caught:
        build_client(config(kind=kind))  # the kind's public endpoint
    assert caught.value.code == "provider_misconfigured"
    with pytest.raises(ProviderConfigError, match="not loopback"):
        build_client(config(kind=kind, base_url="http://10.0.0.8:8080"))


def test_allow_remote_false_refuses_remote_hosts_without_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(LOOPBACK_ONLY_ENV, raising=False)
    with pytest.raises(ProviderConfigError, match=r"example\.com"):
        build_client(config(base_url="https://example.com", allow_remote=False))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "[::1]", "localhost"])
async def test_loopback_hosts_are_allowed(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOOPBACK_ONLY_ENV, "1")
    client = build_client(config(base_url=f"http://{host}:1", allow_remote=False))
    assert client.name == "p"
    await client.aclose()


async def test_production_configs_may_name_remote_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOOPBACK_ONLY_ENV, raising=False)
    client = build_client(config())  # constructing sends nothing
    assert client.breaker_state() == "closed"
    await client.aclose()


# -- shared parsers -------------------------------------------------------------------------------


async def lines(*items: str) -> AsyncIterator[str]:
    for item in items:
        yield item


async def test_sse_events_multi_line_data_comments_and_default_event() -> None:
    stream = lines(
        ": keep-alive",
        "event: image_generation.partial_image",
        'data: {"a":',
        "data: 1}",
        "",
        "data: plain",
        "",
        "event: tail",
        "data: unterminated",
    )
    events = [event async for event in iter_sse(stream)]
    assert events == [
        ServerSentEvent("image_generation.partial_image", '{"a":\n1}'),
        ServerSentEvent("message", "plain"),
        ServerSentEvent("tail", "unterminated"),
    ]


def test_image_payloads_are_checked_before_they_are_accepted() -> None:
    assert describe(make_image(48, 32, "webp")) == ("webp", 48, 32)
    data_uri = "data:image/png;base64," + make_b64(16, 16)
    assert describe(b64_payload(data_uri)) == ("png", 16, 16)
    with pytest.raises(ProviderBadResponseError, match="base64"):
        b64_payload("not base64!")
    with pytest.raises(ProviderBadResponseError, match="does not decode"):
        describe(make_image(16, 16)[:40])
    with pytest.raises(ProviderBadResponseError, match="not base64"):
        b64_payload("data:image/png,rawbytes")
