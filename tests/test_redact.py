"""The redaction layer, and a canary sweep: client keys, provider keys and the
admin key never appear in a log line, an error body, an audit row, a usage
row or a metric (the suite-wide sweep in conftest checks every log line of
every test besides)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import yaml
from aiohttp import web

from proxy.core.redact import MASK, Redactor, install
from proxy.stores import apikeys
from tests.billing_helpers import billing_config
from tests.conftest import Gateway, StartGateway, gateway_config
from tests.fakes import FakeOpenAI
from tests.leaks import leaks_in
from tests.loopback import serve_app


def test_shapes_are_scrubbed() -> None:
    r = Redactor()
    key = apikeys.generate()
    out = r.scrub(f"auth failed for {key}; header Authorization: Bearer abc.def-123")
    assert key not in out and key[:10] + MASK in out and "abc.def-123" not in out
    assert (
        r.scrub('{"authorization": "Basic dXNlcjpwYXNz"}')
        == '{"authorization": "Basic [REDACTED]"}'
    )
    assert "s3cr3t" not in r.scrub("x-api-key: s3cr3t")
    assert "AIza" not in r.scrub(
        "GET /v1beta/models?key=AIzaSyA-1234567890abcdefghijklmnopqrstu&x=1"
    )
    assert (
        r.scrub("postgresql://tollway:hunter2@db/tollway")
        == "postgresql://tollway:[REDACTED]@db/tollway"
    )
    assert "proj-abcdefghijklmnopqrstuvwx" not in r.scrub("sk-proj-abcdefghijklmnopqrstuvwx")
    assert r.scrub("model gpt-4o-mini, 42 tokens") == "model gpt-4o-mini, 42 tokens"
    assert r.scrub("prefix tw-abcdefg is fine") == "prefix tw-abcdefg is fine"


def test_known_values_are_scrubbed() -> None:
    r = Redactor()
    r.remember("an-odd-provider-token", "short")  # too short to be a secret
    assert r.scrub("sent an-odd-provider-token, short") == f"sent {MASK}, short"
    r.remember_env({"OPENAI_API_KEY": "plain-looking-value-1", "PATH": "/usr/local/bin:/bin"})
    assert r.scrub("plain-looking-value-1 /usr/local/bin") == f"{MASK} /usr/local/bin"


def test_every_log_record_is_scrubbed(caplog: pytest.LogCaptureFixture) -> None:
    install()
    key = apikeys.generate()
    log = logging.getLogger("tollway.test")
    try:
        raise RuntimeError(f"upstream said: Incorrect API key provided: {key}")
    except RuntimeError:
        log.exception("request failed with Authorization: Bearer %s", key)
    logging.getLogger("aiohttp.client").warning(
        "GET https://x/v1?key=%s", "AIzaSyD-secretsecretsecretsecretsecret"
    )
    text = caplog.text
    assert key not in text and "secretsecret" not in text
    assert text.count(MASK) >= 3


def test_the_sweep_sees_what_the_redactor_would_miss() -> None:
    raw = logging.LogRecord("x", logging.ERROR, __file__, 1, "leaked %s", ("Bearer abc",), None)
    assert leaks_in(raw.getMessage()) == ["Bearer abc"]
    assert leaks_in("canary-secret-00ff and sk-provider-secret") == [
        "sk-provider-secret",
        "canary-secret-00ff",
    ]


class LeakyProvider:
    """An OpenAI-compatible provider whose errors quote the key it was sent."""

    def __init__(self) -> None:
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> LeakyProvider:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner, url = await serve_app(app)
        self.url = url + "/v1"
        return self

    async def _chat(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        logging.getLogger("tollway.providers").warning("provider got %s", auth)
        message = f"Incorrect API key provided: {auth.removeprefix('Bearer ')} ({auth})"
        return web.json_response({"error": {"message": message, "type": "auth"}}, status=401)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def leaky() -> AsyncIterator[LeakyProvider]:
    provider = await LeakyProvider().start()
    yield provider
    await provider.close()


async def _call(
    s: aiohttp.ClientSession, method: str, url: str, key: str, body: Any = None
) -> tuple[int, str]:
    async with s.request(method, url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, await r.text()


async def test_canary_secrets_never_leave(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    leaky: LeakyProvider,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    provider_key = f"canary-secret-{secrets.token_hex(8)}"
    admin_key = f"canary-secret-{secrets.token_hex(8)}"
    bad_client_key = f"canary-secret-{secrets.token_hex(8)}"
    monkeypatch.setenv("TOLLWAY_ADMIN_KEY", admin_key)
    cfg = billing_config(fake_openai.url)
    cfg["providers"]["fake"]["api_key"] = "${CANARY_PROVIDER_KEY}"
    cfg["providers"]["leaky"] = {
        "kind": "openai",
        "base_url": leaky.url,
        "api_key": "${CANARY_PROVIDER_KEY}",
    }
    cfg["models"].append({"name": "leaky", "targets": [{"provider": "leaky"}]})
    gw: Gateway = await start_gateway(
        cfg, env={"CANARY_PROVIDER_KEY": provider_key}, database_url=pg_url, data_dir=tmp_path
    )
    tenant = f"canary-{secrets.token_hex(4)}"
    bodies: list[str] = []
    async with aiohttp.ClientSession() as s:
        status, text = await _call(
            s, "POST", gw.url + "/admin/tenants", admin_key, {"name": tenant, "tier": "pro"}
        )
        assert status == 201
        status, text = await _call(s, "POST", gw.url + "/admin/keys", admin_key, {"tenant": tenant})
        assert status == 201
        client_key = orjson.loads(text)["api_key"]
        chat = gw.base_url + "/chat/completions"
        msg = [{"role": "user", "content": "hi"}]
        for model, stream in (
            ("fake-model", False),
            ("fake-model", True),
            ("leaky", False),
            ("leaky", True),
        ):
            bodies.append(
                (
                    await _call(
                        s,
                        "POST",
                        chat,
                        client_key,
                        {"model": model, "messages": msg, "stream": stream},
                    )
                )[1]
            )
        bodies.append(
            (
                await _call(
                    s, "POST", chat, bad_client_key, {"model": "fake-model", "messages": msg}
                )
            )[1]
        )
        bodies.append((await _call(s, "GET", gw.url + "/admin/keys", admin_key))[1])
        bodies.append((await _call(s, "POST", gw.url + "/admin/reload", "wrong-" + admin_key))[1])
        bodies.append((await _call(s, "GET", gw.url + "/v1/usage", client_key))[1])
        async with s.get(gw.url + "/metrics") as r:
            metrics = await r.text()
    assert "Incorrect API key provided" in bodies[2]  # the provider's error is passed on...
    canaries = [provider_key, admin_key, bad_client_key, client_key]
    audit = await pg.fetch("SELECT row_to_json(a)::text AS t FROM audit_log a")
    usage = await pg.fetch(
        "SELECT row_to_json(e)::text AS t FROM usage_events e"
        " JOIN tenants t ON t.id = e.tenant_id WHERE t.name = $1",
        tenant,
    )
    assert len(usage) >= 4
    places = {
        "error and admin bodies": "\n".join(bodies),
        "log lines": caplog.text,
        "audit rows": "\n".join(r["t"] for r in audit),
        "usage rows": "\n".join(r["t"] for r in usage),
        "metrics": metrics,
    }
    for where, text in places.items():
        for canary in canaries:
            assert canary not in text, f"a secret reached the {where}"
        assert not leaks_in(text), f"{where}: {leaks_in(text)}"


def test_words_in_a_secrets_place_are_not_secrets() -> None:
    """Redaction scrubs values, not the gateway's own instructions."""
    r = Redactor()
    for text in (
        "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        "providers.openai.api_key: sealed value TOLLWAY_MASTER_KEY is not set",
        "providers.openai.api_key: environment variable OPENAI_API_KEY is not set",
    ):
        assert r.scrub(text) == text
    for value in ("s3cr3t-value", "Xy9kLmP2qrTz", "eyJhbGciOiJIUzI1NiJ9.e30.abc"):
        assert r.scrub(f"Authorization: Bearer {value}") == f"Authorization: Bearer {MASK}"
        assert r.scrub(f"api_key: {value}") == f"api_key: {MASK}"


async def test_the_401_for_a_missing_key_reads_as_written(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, pg_url: str, tmp_path: Path
) -> None:
    gw = await start_gateway(
        billing_config(fake_openai.url), database_url=pg_url, data_dir=tmp_path
    )
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=body) as r:
            missing = (r.status, (await r.json())["error"]["message"])
        wrong = {"Authorization": "Bearer tw-" + "x" * 43}
        async with s.post(gw.base_url + "/chat/completions", json=body, headers=wrong) as r:
            unknown = (r.status, (await r.json())["error"]["message"])
    assert missing == (
        401,
        "You didn't provide an API key. You need to provide your API key in an "
        "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
    )
    assert unknown[0] == 401 and "dashboard" not in unknown[1]


@pytest.mark.parametrize(
    ("api_key", "message"),
    [
        ("enc:gAAAAABnot-a-real-token", "sealed value TOLLWAY_MASTER_KEY is not set"),
        ("${TOLLWAY_UNSET_FOR_TEST}", "environment variable TOLLWAY_UNSET_FOR_TEST is not set"),
    ],
)
async def test_a_refused_reload_names_the_key_path(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    api_key: str,
    message: str,
) -> None:
    """The reload error in the log and the admin API keeps its key path and reason."""
    admin_key = f"canary-secret-{secrets.token_hex(8)}"
    monkeypatch.setenv("TOLLWAY_ADMIN_KEY", admin_key)
    path = tmp_path / "tollway.yaml"
    cfg = gateway_config(fake_openai.url, server={"watch_config": False})
    gw = await start_gateway(cfg, config_file=path)
    cfg["providers"]["fake"]["api_key"] = api_key
    path.write_text(yaml.safe_dump(cfg))
    install()
    expected = f"providers.fake.api_key: {message}"
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.url + "/admin/reload", headers={"Authorization": f"Bearer {admin_key}"}) as r,
    ):
        assert r.status == 400
        assert (await r.json())["error"]["message"].endswith(expected)
    assert any(rec.getMessage().endswith(expected) for rec in caplog.records), caplog.text
