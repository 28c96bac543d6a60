"""Where a provider client may connect: the loopback guard that keeps tests off the internet.

A client refuses, at construction, a base_url whose host is not loopback (127.0.0.0/8, ::1,
localhost) when its config sets `allow_remote: false` or the environment sets
`DIFFUSION_SERVE_LOOPBACK_ONLY=1`; image URLs a provider returns get the same check before any
download. Production configs keep the default `allow_remote: true`; the test suite sets the
variable (or `allow_remote: false`) so that no test can reach a real provider. Only http(s)
URLs are ever accepted.
"""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

from shared.providers.config import ProviderConfigBase
from shared.providers.errors import ProviderConfigError

LOOPBACK_ONLY_ENV = "DIFFUSION_SERVE_LOOPBACK_ONLY"


def loopback_only_mode(config: ProviderConfigBase) -> bool:
    return not config.allow_remote or os.environ.get(LOOPBACK_ONLY_ENV) == "1"


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, loopback_only: bool, what: str) -> None:
    """Refuse non-http(s) URLs, and non-loopback hosts in loopback-only mode."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProviderConfigError(f"{what} must be an http(s) URL; got {url[:100]!r}")
    if loopback_only and not is_loopback_host(parts.hostname):
        raise ProviderConfigError(
            f"{what} host {parts.hostname!r} is not loopback and this client is loopback-only "
            f"(allow_remote is false or {LOOPBACK_ONLY_ENV}=1)"
        )
