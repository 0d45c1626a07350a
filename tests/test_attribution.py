"""Attribution on the usage row: ``user``, tags, client IP, key last use (issue 13 item 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from tests.billing_helpers import billing_config, tenant_with_key, wait_for
from tests.conftest import Gateway, StartGateway
from tests.fakes import FakeOpenAI

MSG = [{"role": "user", "content": "hi"}]
ROW = "SELECT end_user, tags, client_ip FROM usage_events WHERE request_id = $1"
COUNT = "SELECT count(*) FROM usage_events WHERE request_id = $1"


async def _gateway(
    start: StartGateway, fake: FakeOpenAI, pg_url: str, tmp_path: Path, trusted: list[str]
) -> Gateway:
    cfg = billing_config(fake.url, flush_interval_ms=10)
    cfg["server"] = {"trusted_proxies": trusted}
    return await start(cfg, database_url=pg_url, data_dir=tmp_path)


async def _chat(
    gw: Gateway, key: str, headers: dict[str, str] | None = None, **extra: Any
) -> tuple[int, str, Any]:
    body = {"model": "fake-model", "messages": MSG, **extra}
    sent = {"Authorization": f"Bearer {key}", **(headers or {})}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json=body, headers=sent) as resp,
    ):
        return resp.status, resp.headers["x-request-id"], orjson.loads(await resp.read())


async def test_user_tags_and_client_ip_are_on_the_usage_row(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    gw = await _gateway(start_gateway, fake_openai, pg_url, tmp_path, ["127.0.0.1/32"])
    _, key = await tenant_with_key(pg, tmp_path, "pro")
    assert (
        await pg.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", key["key_id"]) is None
    )
    headers = {"x-tollway-tags": "exp-7, canary,exp-7", "X-Forwarded-For": "203.0.113.9"}
    status, rid, _ = await _chat(
        gw, key["api_key"], headers, user="end-user-42", metadata={"team": "search"}
    )
    assert status == 200
    await wait_for(pg, COUNT, rid, expect=1)
    row = await pg.fetchrow(ROW, rid)
    assert row is not None
    assert row["end_user"] == "end-user-42"
    assert orjson.loads(row["tags"]) == {
        "metadata": {"team": "search"},
        "tags": ["exp-7", "canary"],
    }
    assert row["client_ip"] == "203.0.113.9"  # the trusted proxy's X-Forwarded-For
    used = "SELECT last_used_at IS NOT NULL FROM api_keys WHERE id = $1"
    assert await pg.fetchval(used, key["key_id"]) is True


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    gw = await _gateway(start_gateway, fake_openai, pg_url, tmp_path, [])
    _, key = await tenant_with_key(pg, tmp_path, "pro")
    status, rid, _ = await _chat(gw, key["api_key"], {"X-Forwarded-For": "203.0.113.9"})
    assert status == 200
    await wait_for(pg, COUNT, rid, expect=1)
    row = await pg.fetchrow(ROW, rid)
    assert row is not None and row["client_ip"] == "127.0.0.1"
    assert (row["end_user"], row["tags"]) == (None, None)


@pytest.mark.parametrize(
    ("extra", "headers", "param", "code"),
    [
        ({"user": "u" * 257}, {}, "user", None),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, {}, "metadata", None),
        ({"metadata": {"k": 1}}, {}, "metadata", None),
        ({"metadata": {"k": "v" * 513}}, {}, "metadata", None),
        ({}, {"x-tollway-tags": "ok, not ok"}, None, "invalid_tags"),
        ({}, {"x-tollway-tags": ",".join(f"t{i}" for i in range(17))}, None, "invalid_tags"),
    ],
)
async def test_unbounded_attribution_is_refused(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
    extra: dict[str, Any],
    headers: dict[str, str],
    param: str | None,
    code: str | None,
) -> None:
    gw = await _gateway(start_gateway, fake_openai, pg_url, tmp_path, [])
    _, key = await tenant_with_key(pg, tmp_path, "pro")
    status, _, body = await _chat(gw, key["api_key"], headers, **extra)
    assert status == 400 and fake_openai.seen == []
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    if code is not None:
        assert err["code"] == code
