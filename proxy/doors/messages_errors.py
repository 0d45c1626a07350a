"""Anthropic's error shape and statuses, for an answer and for a stream."""

from __future__ import annotations

import orjson

from proxy.core.errors import GatewayError

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_status(status: int) -> tuple[int, str]:
    """A gateway status as Anthropic's (status, error type): 503 (a
    provider overloaded or unavailable, one busy or unconfigured in Tollway,
    a shutdown) is Anthropic's 529 ``overloaded_error``; any other 5xx but a
    504 timeout is a 500 ``api_error``; a 4xx keeps its status."""
    if status == 503:
        status = 529
    elif status >= 500 and status not in (504, 529):
        status = 500
    if status >= 500:
        return status, _ERROR_TYPES.get(status, "api_error")
    return status, _ERROR_TYPES.get(status, "invalid_request_error")


def error(exc: GatewayError) -> tuple[int, bytes]:
    """A gateway error as Anthropic's status and error body."""
    status, kind = anthropic_status(exc.http_status)
    err = {"type": kind, "message": exc.message}
    return status, orjson.dumps({"type": "error", "error": err})


def error_event(exc: GatewayError) -> bytes:
    """A gateway error as Anthropic's ``error`` event, once a stream began."""
    _, body = error(exc)
    return b"event: error\ndata: " + body + b"\n\n"
