"""What the adapters of non-OpenAI wire formats share (Anthropic, Gemini).

Each such adapter says how to address a call (``url``), what to send
(``payload``), how to read the provider's error responses (``error``) and
which ``Translator`` turns its stream into OpenAI chunks; sending, reading
a JSON answer and running the stream translation are the same for all and
live here. The stream contract: provider body bytes in, whole OpenAI SSE
events out; a stream cut inside an event raises ``UpstreamStreamBroken``;
``aclose()`` closes the upstream connection, which stops the generation.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any, Protocol

import orjson

from proxy.config.model import ProviderConfig
from proxy.core.errors import (
    GatewayError,
    InvalidRequest,
    UpstreamStreamBroken,
    UpstreamUnavailable,
)
from proxy.core.sse import IncompleteEvent, iter_events
from proxy.providers import http
from proxy.providers.base import Call, Provider, UpstreamStream
from proxy.providers.h1 import Response
from proxy.providers.pool import Pool

Json = dict[str, Any]


class Translator(Protocol):
    def feed(self, event: bytes) -> list[bytes]: ...

    def end(self) -> list[bytes]: ...


class TranslatorFactory(Protocol):
    def __call__(self, *, chat_id: str, model: str, created: int, endpoint: str) -> Translator: ...


def chat_id(call: Call) -> str:
    """The response id: tied to the gateway's request id, like the echo provider's."""
    return ("chatcmpl-" if call.endpoint == "chat" else "cmpl-") + call.request_id


def positive_int(value: Any) -> int:
    """A token count from a provider's usage block; anything odd counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def prompt_text(body: Json) -> str:
    """The single prompt of a legacy completions request, or a clear 400."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequest(
            "This model's provider takes one text prompt per request; "
            "batched prompts and token arrays are not supported.",
            param="prompt",
        )
    return prompt


def function_call(call: Any, where: str) -> tuple[str, Json]:
    """An OpenAI ``tool_calls[j]`` entry's function name and parsed arguments
    (providers with native tool use want an object, not a JSON string)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest("Tool calls need a function name.", param=where)
    raw = fn.get("arguments")
    if raw is None or raw == "":
        return fn["name"], {}
    try:
        args = raw if isinstance(raw, dict) else orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        args = None
    if not isinstance(args, dict):
        raise InvalidRequest(
            "Tool call arguments must be a JSON object.", param=f"{where}.function.arguments"
        )
    return fn["name"], args


def error_object(parsed: Any) -> Json:
    """The ``error`` member of a parsed error body, or ``{}``."""
    err = parsed.get("error") if isinstance(parsed, dict) else None
    return err if isinstance(err, dict) else {}


async def translate_stream(
    chunks: AsyncIterable[bytes], translator: Translator, name: str
) -> AsyncIterator[bytes]:
    """Provider body bytes in, whole OpenAI SSE events out, one at a time."""
    try:
        async for event in iter_events(chunks):
            for out in translator.feed(event):
                yield out
    except IncompleteEvent:
        raise UpstreamStreamBroken(f"provider '{name}' ended the stream mid-event") from None
    for out in translator.end():
        yield out


class TranslatedStream(UpstreamStream):
    """An upstream response read through a stream translator."""

    def __init__(self, resp: Response, cfg: ProviderConfig, translator: Translator) -> None:
        self._resp = resp
        self._cfg = cfg
        self._translator = translator
        self.headers = {}

    async def __aiter__(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        body = http.iter_body(self._resp, self._cfg)
        async for event in translate_stream(body, self._translator, self._cfg.name):
            yield event

    async def aclose(self) -> None:
        self._resp.close()


class TranslatingProvider(Provider):
    """Sends translated calls and reads native answers; subclasses translate."""

    translator: TranslatorFactory

    def __init__(
        self,
        config: ProviderConfig,
        client: Pool,
        headers: dict[str, str],
        key_header: str,
    ) -> None:
        super().__init__(config)
        self._client = client
        # The key goes last: a configured extra header cannot replace it.
        self._headers = {"Content-Type": "application/json", **headers, **config.headers}
        if config.api_key:
            self._headers[key_header] = config.api_key

    @abstractmethod
    def url(self, call: Call) -> str: ...

    @abstractmethod
    def payload(self, call: Call) -> bytes: ...

    @abstractmethod
    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> GatewayError: ...

    async def send(self, call: Call) -> Response:
        payload = self.payload(call)
        headers = {**self._headers, "X-Request-Id": call.request_id}
        if call.trace_headers is not None:  # the attempt's traceparent
            headers.update(call.trace_headers)
        resp = await http.post(
            self._client, self.config, self.url(call), payload, headers, call.timeouts
        )
        if resp.status >= 400:
            body = await http.read_body(resp, self.config, call.timeouts)
            raise self.error(resp.status, body, resp.headers)
        return resp

    async def answer(self, call: Call) -> Json:
        """The provider's (non-stream) answer, which must be a JSON object."""
        resp = await self.send(call)
        raw = await http.read_body(resp, self.config, call.timeouts)
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise UpstreamUnavailable(
                f"provider '{self.name}' returned a response that is not a JSON object"
            )
        return obj

    async def stream(self, call: Call) -> UpstreamStream:
        resp = await self.send(call)
        translator = self.translator(
            chat_id=chat_id(call),
            model=call.model,
            created=int(time.time()),
            endpoint=call.endpoint,
        )
        return TranslatedStream(resp, self.config, translator)
