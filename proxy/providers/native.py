"""A front door's request sent to a provider that speaks the door's API.

Anthropic's Messages API to ``kind: anthropic``, OpenAI's Responses API to
``kind: openai`` with ``responses`` on: the client's body (its model
rewritten by the door) goes to the provider's own endpoint with the
provider's credentials, and the answer comes back as the provider sent it,
JSON or SSE events, so nothing the gateway cannot translate (thinking
blocks, citations, built-in tools, reasoning items) is lost on the way.

Each adapter gives its URL, headers, error mapping and usage reader; the
sending, the reading and the error events mid-stream are done here once.
Both APIs mark an error event the same way: ``"type": "error"``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson

from proxy.config.model import ProviderConfig, Timeouts
from proxy.core import redact
from proxy.core.errors import GatewayError, UpstreamStreamBroken, UpstreamUnavailable
from proxy.core.sse import IncompleteEvent, event_data, iter_event_batches
from proxy.core.usage import Usage
from proxy.providers import http
from proxy.providers.base import BatchedStream, Call, Reply
from proxy.providers.h1 import Response
from proxy.providers.pool import Pool

ErrorMap = Callable[[int, bytes, Mapping[str, str]], GatewayError]
UsageOf = Callable[[Any], Usage | None]


async def send(
    client: Pool,
    cfg: ProviderConfig,
    url: str,
    headers: Mapping[str, str],
    call: Call,
    error: ErrorMap,
) -> Response:
    """POST the call's body as it is; a non-2xx answer raises ``error``'s."""
    sent = {**headers, "X-Request-Id": call.request_id}
    if call.trace_headers is not None:
        sent.update(call.trace_headers)
    for name, value in (call.native_headers or {}).items():
        # A flag list the provider's config sets too (``headers:``) keeps both.
        have = next((k for k in sent if k.lower() == name.lower()), None)
        sent[have or name] = f"{sent[have]},{value}" if have else value
    resp = await http.post(client, cfg, url, orjson.dumps(call.body), sent, call.timeouts)
    if resp.status >= 400:
        body = await http.read_body(resp, cfg, call.timeouts)
        raise error(resp.status, body, resp.headers)
    return resp


async def reply(resp: Response, cfg: ProviderConfig, call: Call, usage_of: UsageOf) -> Reply:
    """The whole answer, its bytes untouched; usage read from its ``usage``."""
    body = await http.read_body(resp, cfg, call.timeouts)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise UpstreamUnavailable(f"provider '{cfg.name}' returned a response that is not JSON")
    return Reply(body=body, usage=usage_of(parsed.get("usage")), status=resp.status)


class NativeStream(BatchedStream):
    """The provider's SSE events, whole, one list per upstream read."""

    def __init__(self, resp: Response, cfg: ProviderConfig, timeouts: Timeouts | None) -> None:
        self._resp, self._cfg, self._timeouts = resp, cfg, timeouts
        self.headers = {}

    async def batches(self) -> AsyncIterator[list[bytes]]:
        try:
            body = http.iter_body(self._resp, self._cfg, self._timeouts)
            async for batch in iter_event_batches(body):
                at = _error_at(batch)
                if at is None:
                    yield batch
                    continue
                if at:
                    yield batch[:at]
                raise _stream_error(batch[at], self._cfg.name)
        except IncompleteEvent:
            raise UpstreamStreamBroken(
                f"provider '{self._cfg.name}' ended the stream mid-event"
            ) from None

    async def aclose(self) -> None:
        self._resp.close()


def _error_object(event: bytes) -> dict[str, Any] | None:
    data = event_data(event)
    if data is None or b'"error"' not in data:
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("type") != "error":
        return None
    err = obj.get("error")
    # Anthropic nests it ({"error": {...}}); OpenAI's Responses puts it flat.
    return err if isinstance(err, dict) else obj


def _error_at(batch: list[bytes]) -> int | None:
    for i, event in enumerate(batch):
        if _error_object(event) is not None:
            return i
    return None


def _stream_error(event: bytes, name: str) -> UpstreamStreamBroken:
    """The provider's error event as the one the door renders (scrubbed: a
    message may quote the request's credentials)."""
    err = _error_object(event) or {}
    message = str(err.get("message") or "no message")
    return UpstreamStreamBroken(
        redact.scrub(f"provider '{name}' reported an error mid-stream: {message}")
    )
