"""``kind: openai`` — any OpenAI-compatible upstream (OpenAI, Groq, Mistral,
OpenRouter, Together, vLLM, Ollama's /v1, LM Studio); ``kind: azure`` reuses it.

Contract: the client's body goes upstream with only ``model`` rewritten (and,
for streams, ``stream_options.include_usage`` switched on so the provider
reports usage; for chat, the completion limit sent under the parameter the
target's model accepts, ``Call.token_limit``); unknown fields survive. Only
the provider's own credentials and configured headers are sent: no client
header is forwarded. Usage is what the provider reports; stream events are
forwarded as the provider's bytes, whole events at a time. ``aclose()``
closes the upstream connection, which cancels the provider's work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from proxy.config.model import ProviderConfig, Timeouts
from proxy.core import redact
from proxy.core.errors import GatewayError, UpstreamStreamBroken, UpstreamUnavailable
from proxy.core.sse import event_data, split_events
from proxy.core.usage import usage_from_openai, usage_from_responses
from proxy.providers import http, native, paths
from proxy.providers.base import BatchedStream, Call, Provider, Reply, UpstreamStream
from proxy.providers.h1 import Response
from proxy.providers.pool import Pool

_PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "moderations": "/moderations",
}
# Fields that would let a client steer the gateway itself; never forwarded.
_GATEWAY_FIELDS = ("api_base", "base_url", "api_key")


class OpenAIStream(BatchedStream):
    def __init__(self, resp: Response, cfg: ProviderConfig, timeouts: Timeouts | None) -> None:
        self._resp = resp
        self._cfg = cfg
        self.headers = {}
        self._body = http.EventBody(resp, cfg, timeouts, self._check)
        self.read = self._body.read  # type: ignore[method-assign]  # no frame of our own per read
        self.pushed = self._body.pushed

    def _check(self, events: bytes) -> bytes:
        """A provider's error event ends the stream: the events before it
        go on, the error is raised (by the next read, if any went on)."""
        if b'"error"' not in events:
            return events
        batch = split_events(events)
        at = _error_at(batch)
        if at is None:
            return events
        error = _stream_error(batch[at], self._cfg.name)
        if not at:
            self._body.close()
            raise error
        self._body.pending = error
        return b"".join(batch[:at])

    async def batches(self) -> AsyncIterator[list[bytes]]:
        while events := await self.read():
            yield split_events(events)

    async def aclose(self) -> None:
        self._body.close()
        self._resp.close()


def _error_at(batch: list[bytes]) -> int | None:
    """The index of the first provider error event (``data: {"error": ...}``)."""
    for i, event in enumerate(batch):
        # A quoted "error" key; inside a content string the quotes are escaped.
        if b'"error"' in event and _error_object(event) is not None:
            return i
    return None


def _error_object(event: bytes) -> dict[str, Any] | None:
    data = event_data(event)
    try:
        obj = orjson.loads(data) if data is not None else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("choices") or "error" not in obj:
        return None
    err = obj["error"]
    return err if isinstance(err, dict) else {"message": str(err)}


def _stream_error(event: bytes, name: str) -> UpstreamStreamBroken:
    """A provider's own error event, as the one error event the client gets
    (the relay writes it): its message may quote the request's credentials,
    so it is scrubbed here, where it enters the gateway."""
    err = _error_object(event) or {}
    message = str(err.get("message") or "no message")
    return UpstreamStreamBroken(
        redact.scrub(f"provider '{name}' reported an error mid-stream: {message}")
    )


_OTHER_LIMIT = {"max_tokens": "max_completion_tokens", "max_completion_tokens": "max_tokens"}


def _token_limit(body: dict[str, Any], param: str) -> None:
    """Send the limit as ``param`` only: o-series and GPT-5 models refuse
    ``max_tokens`` (400 ``unsupported_parameter``), older OpenAI-compatible
    servers may not know ``max_completion_tokens``. When the client sent
    both, the smaller: it asked for no more than either (admission reserved
    the larger, so the reservation still covers it)."""
    other = _OTHER_LIMIT[param]
    if other not in body:
        return
    value = body.pop(other)
    mine = body.get(param)
    if isinstance(value, int) and not (isinstance(mine, int) and mine <= value):
        body[param] = value


def _needs_edit(body: dict[str, Any], call: Call) -> bool:
    """Whether ``payload``'s edits would change ``body``: a gateway field to
    drop, another model name, the other completion-limit parameter, usage
    not asked for on a stream. (Setting what is already there keeps the
    key's place, so an unchanged body dumps to the same bytes.)"""
    if body.get("model") != call.model:
        return True
    if "api_base" in body or "base_url" in body or "api_key" in body:  # _GATEWAY_FIELDS
        return True
    if call.token_limit is not None and call.endpoint == "chat":
        if _OTHER_LIMIT[call.token_limit] in body:
            return True
    if call.stream:
        opts = body.get("stream_options")
        return not (isinstance(opts, dict) and opts.get("include_usage") is True)
    return False


class OpenAIProvider(Provider):
    def __init__(self, config: ProviderConfig, client: Pool) -> None:
        super().__init__(config)
        self._client = client
        self._headers = {"Content-Type": "application/json", **config.headers}
        if config.api_key:
            self._headers.update(self.auth_headers(config.api_key))

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"}

    def url(self, call: Call) -> str:
        return self.config.base_url + _PATHS[call.endpoint]

    def payload(self, call: Call) -> bytes:
        """The client's body with the edits above; dumped as it is (no copy)
        when none of them changes anything, the usual case."""
        body = call.body
        if _needs_edit(body, call):
            body = dict(body)  # the request's own body is read again after (settle, journal)
            for field in _GATEWAY_FIELDS:
                body.pop(field, None)
            body["model"] = call.model
            if call.token_limit is not None and call.endpoint == "chat":
                _token_limit(body, call.token_limit)
            if call.stream:
                opts = body.get("stream_options")
                body["stream_options"] = {
                    **(opts if isinstance(opts, dict) else {}),
                    "include_usage": True,
                }
        return orjson.dumps(body)

    async def _send(self, call: Call) -> Response:
        headers = {**self._headers, "X-Request-Id": call.request_id}
        if call.trace_headers is not None:  # the attempt's traceparent
            headers.update(call.trace_headers)
        resp = await http.post(
            self._client, self.config, self.url(call), self.payload(call), headers, call.timeouts
        )
        if resp.status >= 400:
            body = await http.read_body(resp, self.config, call.timeouts)
            raise http.openai_error(resp.status, body, resp.headers, self.config)
        return resp

    async def complete(self, call: Call) -> Reply:
        resp = await self._send(call)
        body = await http.read_body(resp, self.config, call.timeouts)
        usage = None
        try:
            parsed: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamUnavailable(
                f"provider '{self.config.name}' returned a response that is not JSON"
            ) from None
        if isinstance(parsed, dict):
            usage = usage_from_openai(parsed.get("usage"))
        return Reply(body=body, usage=usage, status=resp.status)

    async def stream(self, call: Call) -> UpstreamStream:
        return OpenAIStream(await self._send(call), self.config, call.timeouts)

    # The Responses front door, passed through (``proxy.providers.native``)
    # to an upstream configured as serving it (``responses``).

    def speaks(self, api: str) -> bool:
        return api == "responses" and self.config.responses

    async def _send_native(self, call: Call) -> Response:
        body = {k: v for k, v in call.body.items() if k not in _GATEWAY_FIELDS}
        call = Call(
            call.endpoint,
            body,
            call.model,
            call.stream,
            call.request_id,
            call.timeouts,
            call.token_limit,
            call.trace_headers,
            call.api,
        )
        url = self.config.base_url + "/responses"
        return await native.send(self._client, self.config, url, self._headers, call, self._error)

    def _error(self, status: int, body: bytes, headers: Any) -> GatewayError:
        return http.openai_error(status, body, headers, self.config)

    async def native_complete(self, call: Call) -> Reply:
        resp = await self._send_native(call)
        return await native.reply(resp, self.config, call, usage_from_responses)

    async def native_stream(self, call: Call) -> UpstreamStream:
        return native.NativeStream(await self._send_native(call), self.config, call.timeouts)


class AzureProvider(OpenAIProvider):
    """``kind: azure``: deployment URLs, ``api-version`` and an ``api-key``
    header; the body is OpenAI's. The target ``model`` names the deployment."""

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"api-key": api_key}

    def url(self, call: Call) -> str:
        version = self.config.api_version or "2024-10-21"
        # A glob route passes the client's model name through: it stays one
        # path segment and cannot add a query or climb the path.
        return (
            f"{self.config.base_url}/openai/deployments/{paths.segment(call.model)}"
            f"{_PATHS[call.endpoint]}?api-version={version}"
        )
