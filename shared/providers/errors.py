"""Provider failures as `ServeError`s: a stable code, an HTTP status, and two reliability facts.

`retryable` says whether another attempt may succeed (connection errors, 408, 429, 5xx);
`provider_fault` says whether the failure is evidence that the provider is unhealthy and so counts
towards its circuit breaker (a 400 or 401 proves the provider is up and answering). Both, and the
provider's `Retry-After`, survive pickling so a Ray caller can still decide to spill over.

Messages never contain an API key: provider text passes through `scrub` first.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from shared.errors import ServeError

# Provider messages sometimes quote a (partly masked) key back, e.g. "Incorrect API key provided:
# sk-ab***yz"; anything key-shaped is cut out before it can reach a log or a client.
_KEY_SHAPED = re.compile(r"\b(?:sk|rk|pk|AIza)[-_A-Za-z0-9*.]{6,}")
MAX_PROVIDER_TEXT = 500


class ProviderError(ServeError):
    """Base of every failure a cloud provider client raises."""

    status = 502
    type = "provider_error"
    default_code = "provider_error"
    retryable_by_default: ClassVar[bool] = False
    provider_fault: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message, code=code, param=param)
        self.retry_after = retry_after
        self.retryable = self.retryable_by_default if retryable is None else retryable

    def __reduce__(self) -> tuple[Any, ...]:
        args = (type(self), self.message, self.code, self.param, self.retry_after, self.retryable)
        return (_rebuild, args)


def _rebuild(
    cls: type[ProviderError],
    message: str,
    code: str,
    param: str | None,
    retry_after: float | None,
    retryable: bool,
) -> ProviderError:
    return cls(message, code=code, param=param, retry_after=retry_after, retryable=retryable)


class ProviderUnavailableError(ProviderError):
    """Connection failed, the provider answered 5xx, or its circuit is open (503)."""

    status = 503
    type = "server_error"
    default_code = "provider_unavailable"
    retryable_by_default = True
    provider_fault = True


class ProviderTimeoutError(ProviderError):
    """The provider did not answer in time: connect/read timeout, 408/504, or the deadline (504)."""

    status = 504
    type = "server_error"
    default_code = "provider_timeout"
    retryable_by_default = True
    provider_fault = True


class DeadlineExceededError(ProviderTimeoutError):
    """The caller's deadline (or the call's total budget) ran out (504).

    Not a provider fault: the caller chose the budget, so it says nothing about the provider.
    """

    retryable_by_default = False
    provider_fault = False


class ProviderBadResponseError(ProviderError):
    """The provider answered 2xx with a body we cannot use (not JSON, no image, bad image) (502)."""

    status = 502
    type = "server_error"
    default_code = "provider_bad_response"
    provider_fault = True


class ProviderRateLimitedError(ProviderError):
    """The provider answered 429 and retries did not get through (429, honour `retry_after`).

    Not a provider fault: a 429 says the provider is up and tells us when to come back.
    """

    status = 429
    type = "rate_limit_error"
    default_code = "provider_rate_limited"
    retryable_by_default = True


class ProviderQuotaError(ProviderError):
    """The provider account is out of credits or quota; retrying cannot help (503)."""

    status = 503
    type = "server_error"
    default_code = "provider_quota"


class ProviderAuthError(ProviderError):
    """Our API key is missing or refused: a deployment problem, not the client's (502)."""

    status = 502
    type = "server_error"
    default_code = "provider_auth"


class ProviderRejectedError(ProviderError):
    """The provider refused the request's parameters (422)."""

    status = 422
    type = "invalid_request_error"
    default_code = "provider_rejected"


class ContentFilteredError(ProviderError):
    """The provider's safety system blocked the prompt or the image (422)."""

    status = 422
    type = "invalid_request_error"
    default_code = "content_filtered"


class ProviderUnsupportedError(ProviderError):
    """The provider (or this account) does not offer the model or a requested feature (400)."""

    status = 400
    type = "invalid_request_error"
    default_code = "provider_unsupported"


class ProviderConfigError(ProviderError):
    """The provider configuration cannot be used, e.g. a remote host in loopback-only mode."""

    status = 500
    type = "server_error"
    default_code = "provider_misconfigured"


def scrub(text: str, secret: str | None = None) -> str:
    """Provider text made safe to show: no key (exact or key-shaped), bounded length."""
    if secret:
        text = text.replace(secret, "[redacted]")
    text = _KEY_SHAPED.sub("[redacted]", text)
    if len(text) > MAX_PROVIDER_TEXT:
        text = text[:MAX_PROVIDER_TEXT] + "…"
    return text


def error_for_status(status: int) -> type[ProviderError]:
    """The error class of an HTTP failure status, before any provider-specific refinement."""
    if status in (401, 403):
        return ProviderAuthError
    if status == 404:
        return ProviderUnsupportedError
    if status in (408, 504):
        return ProviderTimeoutError
    if status == 429:
        return ProviderRateLimitedError
    if status >= 500:
        return ProviderUnavailableError
    return ProviderRejectedError
