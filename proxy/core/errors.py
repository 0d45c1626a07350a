"""One error tree for everything a client can see.

The HTTP status and OpenAI error ``type``/``code`` belong to the class, so a
raise site only says *what* went wrong; ``middleware.front`` renders every
``GatewayError`` in OpenAI's shape, and ``relay`` turns one into an SSE error
event once stream headers are out.

    GatewayError
    ├── InvalidRequest (400)
    │   ├── BodyTooLarge (413)
    │   ├── RequestTimeout (408)     the client sent its headers or body too slowly
    │   ├── HeadersTooLarge (431)
    │   ├── ContentFiltered (400)     a guardrail refused the prompt or the answer
    │   ├── ConfigRefused (400)       an admin's config edit was refused
    │   └── ContextLengthExceeded (400) too long for every target's context window
    ├── InvalidApiKey (401)
    ├── ModelNotAllowed (403)
    ├── NotFound (404)
    │   └── ModelNotFound (404)
    ├── Conflict (409)
    ├── RateLimited (429)
    │   ├── TokenRateLimited (429, type tokens)
    │   ├── QuotaExceeded (429, insufficient_quota)
    │   ├── AuthThrottled (429)       too many failed keys from one address
    │   └── ProviderRateLimited (429) a provider's rpm/tpm limit in Tollway
    ├── UpstreamError (502)           provider failure, translated at the edge
    │   ├── UpstreamUnavailable (502) connect error, reset, bad gateway
    │   │   ├── UpstreamConnectError  the request never left: nothing to bill
    │   │   └── UpstreamRedirect      a 3xx, never followed (credentials stay home)
    │   ├── UpstreamTimeout (504)
    │   ├── UpstreamStreamBroken (502) cut or malformed stream after headers
    │   └── ProviderNotConfigured (503)
    ├── ServiceUnavailable (503)
    │   ├── ProviderBusy (503)        a provider's concurrency limit in Tollway
    │   ├── GuardrailUnavailable (503) a fail-closed moderation check could not answer
    │   └── ShuttingDown (503)
    └── ProviderHTTPError (status passed on from the provider: the one status
                          not fixed by the class, as it is the provider's)
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.error_code = code if code is not None else self.code
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def http_status(self) -> int:
        return self.status

    def payload(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.error_code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.payload())


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class ConfigRefused(InvalidRequest):
    code = "config_invalid"


class RequestTimeout(InvalidRequest):
    status = 408
    code = "request_timeout"


class HeadersTooLarge(InvalidRequest):
    status = 431
    code = "request_header_fields_too_large"


class InvalidApiKey(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ContextLengthExceeded(InvalidRequest):
    """Prompt estimate + completion budget over every target's context window."""

    code = "context_length_exceeded"


class ModelNotAllowed(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimited(GatewayError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"
    reason = "requests_per_hour"  # which window refused it (a metric label)


class TokenRateLimited(RateLimited):
    type = "tokens"
    reason = "tokens_per_minute"


class QuotaExceeded(RateLimited):
    type = "insufficient_quota"
    code = "insufficient_quota"
    reason = "requests"  # or "tokens": the monthly quota that ran out


class AuthThrottled(RateLimited):
    code = "auth_failures_exceeded"
    reason = "auth_failures"


class ProviderRateLimited(RateLimited):
    code = "provider_rate_limited"
    reason = "provider"  # a provider's rpm/tpm, not the key's


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class ProviderBusy(ServiceUnavailable):
    code = "provider_busy"


class ShuttingDown(ServiceUnavailable):
    code = "server_shutting_down"


class GuardrailUnavailable(ServiceUnavailable):
    """A guardrail whose policy is ``fail: closed`` could not give a verdict
    (its moderation model failed or timed out), so the request was refused
    unchecked rather than let through unchecked."""

    code = "guardrail_unavailable"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"


class UpstreamConnectError(UpstreamUnavailable):
    """No connection could be made, so the provider never saw the request."""


class UpstreamRedirect(UpstreamUnavailable):
    """The provider answered 3xx: following it would send the prompt and the
    provider's credential to a host nobody configured."""

    code = "upstream_redirect"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamStreamBroken(UpstreamError):
    code = "upstream_stream_broken"


class ProviderNotConfigured(UpstreamError):
    status = 503
    code = "provider_not_configured"


class ProviderHTTPError(GatewayError):
    """A provider's own error response, passed on with its status and body.

    The body is normalised to OpenAI's shape when the provider's is not, so a
    client always sees ``{"error": {...}}``.
    """

    type = "upstream_error"

    def __init__(
        self,
        status: int,
        error: dict[str, Any],
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(str(error.get("message") or "provider error"), headers=headers)
        self._status = status
        self._error = error

    @property
    def http_status(self) -> int:
        return self._status

    def payload(self) -> dict[str, Any]:
        err = {"message": self.message, "type": self.type, "param": None, "code": None}
        err.update({k: v for k, v in self._error.items() if k in err})
        return {"error": err}


class ContentFiltered(InvalidRequest):
    """A guardrail refused the prompt or the answer. The message names the
    guardrail and the category, never the text that matched; on a stream
    already under way, ``stream_tail`` is what the relay writes before the
    error event (the safe text held back, and a ``content_filter`` finish)."""

    code = "content_filter"

    def __init__(self, message: str, *, guardrail: str, category: str) -> None:
        super().__init__(message)
        self.guardrail = guardrail
        self.category = category
        self.stream_tail = b""
