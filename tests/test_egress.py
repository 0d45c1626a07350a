"""What leaves the gateway towards providers, and what comes back from them:
credentials go only to configured hosts (no redirect is followed), a model
name stays one path segment, and a provider's error event inside a stream
reaches the client once, scrubbed of secrets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import StartGateway
from tests.loopback import serve_app

MSG: Any = [{"role": "user", "content": "the secret prompt"}]
Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Host:
    """A catch-all HTTP server on 127.0.0.1 that records every request."""

    behave: Behaviour
    seen: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> Host:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        self._runner, self.url = await serve_app(app)
        return self

    async def _any(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path_qs, dict(request.headers), await request.read()))
        return await self.behave(request)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def completion(model: str = "m") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


async def answer_ok(request: web.Request) -> web.StreamResponse:
    return web.json_response(completion())


@pytest.fixture
async def hosts() -> AsyncIterator[Callable[[Behaviour], Awaitable[Host]]]:
    started: list[Host] = []

    async def start(behave: Behaviour) -> Host:
        host = await Host(behave).start()
        started.append(host)
        return host

    yield start
    for host in started:
        await host.close()


PROVIDERS: dict[str, tuple[dict[str, Any], str]] = {
    # kind -> (provider config, the header that carries its credential)
    "openai": (
        {"kind": "openai", "headers": {"X-Org-Secret": "org-secret-value"}},
        "Authorization",
    ),
    "azure": ({"kind": "azure"}, "api-key"),
    "anthropic": ({"kind": "anthropic"}, "x-api-key"),
    "gemini": ({"kind": "gemini"}, "x-goog-api-key"),
}


def one_provider(kind: str, url: str) -> dict[str, Any]:
    provider, _ = PROVIDERS[kind]
    return {
        "auth": "none",
        "providers": {
            "p": {
                **provider,
                "base_url": url,
                "api_key": "provider-credential-123",
                "timeouts": {"connect": 2, "first_byte": 5, "idle": 5, "total": 10},
            }
        },
        "models": [
            {"name": "m", "targets": [{"provider": "p", "model": "deploy-1"}]},
            {"name": "glob-*", "targets": [{"provider": "p"}]},
            {"name": "*", "targets": [{"provider": "p"}]},
        ],
    }


async def post_chat(url: str, model: str, **extra: Any) -> tuple[int, bytes]:
    body = {"model": model, "messages": MSG, **extra}
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=body) as r:
        return r.status, await r.read()


@pytest.mark.parametrize("kind", sorted(PROVIDERS))
@pytest.mark.parametrize("status", [302, 307, 308])
async def test_a_redirect_from_a_provider_is_not_followed(
    start_gateway: StartGateway,
    hosts: Callable[[Behaviour], Awaitable[Host]],
    kind: str,
    status: int,
) -> None:
    """Following a redirect would hand the prompt and the provider credential
    to whatever host the ``Location`` names: only configured hosts are ever
    contacted, and the client gets a 502 saying why."""
    thief = await hosts(answer_ok)

    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": thief.url + request.path_qs})

    provider = await hosts(redirect)
    gw = await start_gateway(one_provider(kind, provider.url))
    code, raw = await post_chat(gw.url, "m")
    assert thief.seen == []
    assert len(provider.seen) == 1
    assert code == 502
    err = orjson.loads(raw)["error"]
    assert err["code"] == "upstream_redirect"
    assert f"HTTP {status}" in err["message"] and "redirect" in err["message"]
    assert "provider-credential-123" not in raw.decode()


@pytest.mark.parametrize(
    ("kind", "name"),
    [("azure", "."), ("azure", ".."), ("gemini", "."), ("gemini", ".."), ("gemini", "models/..")],
)
async def test_a_model_name_cannot_walk_out_of_its_path_segment(
    start_gateway: StartGateway,
    hosts: Callable[[Behaviour], Awaitable[Host]],
    kind: str,
    name: str,
) -> None:
    """A glob route passes the client's model name into the URL path: "." and
    ".." are dot segments that a URL normaliser removes, so they are refused
    with a 400 before anything is sent."""
    provider = await hosts(answer_ok)
    gw = await start_gateway(one_provider(kind, provider.url))
    code, raw = await post_chat(gw.url, name)
    assert provider.seen == []
    assert code == 400, raw
    err = orjson.loads(raw)["error"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "model", None)


@pytest.mark.parametrize("kind", ["azure", "gemini"])
async def test_an_odd_model_name_is_still_one_segment(
    start_gateway: StartGateway, hosts: Callable[[Behaviour], Awaitable[Host]], kind: str
) -> None:
    provider = await hosts(answer_ok)
    gw = await start_gateway(one_provider(kind, provider.url))
    await post_chat(gw.url, "a/../b?c#d")
    assert len(provider.seen) == 1
    path = provider.seen[0][0]
    assert "/a%2F..%2Fb%3Fc%23d" in path
    assert path.startswith("/openai/deployments/" if kind == "azure" else "/v1beta/models/")


STREAM_SECRETS = (
    "sk-abcdefghijklmnopqrstuvwxyz012345",
    "AIzaSyA-1234567890abcdefghijklmnopqrstu",
    "azure-key-value-9876",
)


async def test_a_provider_error_event_mid_stream_is_scrubbed_and_sent_once(
    start_gateway: StartGateway, hosts: Callable[[Behaviour], Awaitable[Host]]
) -> None:
    """An OpenAI-compatible provider may end a stream with its own error
    event, echoing what it was sent: the client gets exactly one error event,
    with no credential in it."""
    sk, aiza, azure = STREAM_SECRETS
    message = (
        f"upstream rejected Authorization: Bearer {sk} for "
        f"https://x.example/v1?key={aiza} (api-key: {azure})"
    )

    async def error_mid_stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}],
        }
        error = {"error": {"message": message, "type": "server_error", "code": "boom"}}
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await resp.write(b"data: " + orjson.dumps(error) + b"\n\n")
        return resp

    provider = await hosts(error_mid_stream)
    gw = await start_gateway(one_provider("openai", provider.url))
    code, raw = await post_chat(gw.url, "m", stream=True)
    assert code == 200
    text = raw.decode()
    for secret in STREAM_SECRETS:
        assert secret not in text
    events = [e for e in text.split("\n\n") if e.startswith("data: {")]
    errors = [orjson.loads(e[6:])["error"] for e in events if '"error"' in e]
    assert len(errors) == 1, text
    assert "upstream rejected" in errors[0]["message"]
    assert '"Hel"' in events[0]  # what came before the error still arrived
    assert gw.settler.records[-1].status >= 500
