"""The real ``tollway serve`` process: workers on one port, signals, draining.

These start the command as an operator would (embedded Postgres and Redis
from the session, a config file on disk) and talk to it over real sockets.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import yaml

from proxy.pipeline.registry import parse_config
from tests.billing_helpers import billing_config, tenant_with_key
from tests.conftest import gateway_config
from tests.fakes import FakeOpenAI
from tests.leaks import leaks_in
from tests.test_metrics import parse, value
from tests.waiting import until

ROOT = Path(__file__).parents[1]
MSG = [{"role": "user", "content": "hi"}]


@dataclass
class Tollway:
    proc: asyncio.subprocess.Process
    url: str
    config: Path
    admin_key: str
    output: list[str] = field(default_factory=list)

    async def get(self, path: str) -> tuple[int, Any]:
        """On a new connection each time, so SO_REUSEPORT spreads them over workers."""
        headers = {"Authorization": f"Bearer {self.admin_key}", "Connection": "close"}
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as s,
            s.get(self.url + path, headers=headers) as r,
        ):
            body = await r.read()
            return r.status, orjson.loads(
                body
            ) if r.content_type == "application/json" else body.decode()

    async def versions(self, n: int = 24) -> dict[int, str]:
        """Config version per worker pid, over ``n`` fresh connections."""
        seen: dict[int, str] = {}
        for _ in range(n):
            _, body = await self.get("/admin/config")
            seen[body["worker_pid"]] = body["version"]
        return seen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def tollway(tmp_path: Path, pg_url: str, redis_url: str) -> AsyncIterator[Any]:
    started: list[Tollway] = []

    async def start(cfg: dict[str, Any], *args: str) -> Tollway:
        path = tmp_path / "tollway.yaml"
        path.write_text(yaml.safe_dump(cfg))
        port = _free_port()
        admin_key = f"canary-secret-{secrets.token_hex(8)}"
        env = {
            **os.environ,
            "DATABASE_URL": pg_url,
            "REDIS_URL": redis_url,
            "TOLLWAY_DATA_DIR": str(tmp_path),
            "TOLLWAY_ADMIN_KEY": admin_key,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(path),
            "--port",
            str(port),
            *args,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        t = Tollway(proc, f"http://127.0.0.1:{port}", path, admin_key)
        started.append(t)
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            while not t.output or "listening on" not in t.output[-1]:
                t.output.append((await proc.stdout.readline()).decode())
                assert t.output[-1], "".join(t.output)
        return t

    yield start
    for t in started:
        if t.proc.returncode is None:
            t.proc.kill()
            await t.proc.wait()


async def _rest(t: Tollway) -> str:
    assert t.proc.stdout is not None
    t.output.append((await t.proc.stdout.read()).decode())
    return "".join(t.output)


def _edit(path: Path, cfg: dict[str, Any]) -> str:
    text = yaml.safe_dump(cfg)
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)
    return parse_config(text, {}).version


def _with_model(cfg: dict[str, Any], name: str, watch: bool) -> dict[str, Any]:
    models = [*cfg["models"], {"name": name, "targets": [{"provider": "echo"}]}]
    return {**cfg, "models": models, "server": {"watch_config": watch}}


async def test_workers_share_the_port_metrics_reload_and_restart(
    tollway: Any, fake_openai: FakeOpenAI
) -> None:
    cfg = gateway_config(fake_openai.url, server={"watch_config": False})
    t: Tollway = await tollway(cfg, "--workers", "2")
    assert "with 2 workers" in t.output[-1]
    first = await t.versions()
    assert len(first) == 2, "both workers answer on the one port"
    pids = sorted(first)

    # metrics: whichever worker a scrape reaches, it counts the whole instance
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        for _ in range(40):
            async with s.post(
                t.url + "/v1/chat/completions", json={"model": "echo", "messages": MSG}
            ) as r:
                assert r.status == 200

    async def all_counted() -> bool:
        # Every scrape shows the whole instance, counters and histograms both
        # (the other worker's series arrive with its next publish; once, in
        # CI, the histogram lagged the counter in a scrape, cause not found).
        for _ in range(8):
            _, text = await t.get("/metrics")
            got = parse(text)[1]
            if value(got, "tollway_requests_total", model="echo", status="200") != 40:
                return False
            if value(got, "tollway_request_duration_seconds_count", model="echo") != 40:
                return False
        return True

    await until(all_counted, 10.0, interval=0.05)
    _, text = await t.get("/metrics")
    types, series = parse(text)
    assert types["tollway_inflight_requests"] == "gauge"
    assert value(series, "tollway_request_duration_seconds_count", model="echo") == 40
    assert value(series, "tollway_config_version_info", version=first[pids[0]]) == 1

    # SIGHUP to the supervisor reaches every worker (the file is not watched yet)
    v2 = _edit(t.config, _with_model(cfg, "two", watch=True))
    # a window in which nothing may happen: longer than a watcher's poll and
    # settle time (0.5 s), so a worker that watched anyway would have reloaded
    await asyncio.sleep(0.8)
    assert set((await t.versions()).values()) == {first[pids[0]]}
    t.proc.send_signal(signal.SIGHUP)
    await until(lambda: _all_on(t, v2), 2.0, interval=0.05)
    # now watching: a plain edit converges on every worker within 2 s
    v3 = _edit(t.config, _with_model(cfg, "three", watch=True))
    await until(lambda: _all_on(t, v3), 2.0, interval=0.05)

    # a crashed worker is replaced; the instance's counters do not go back
    os.kill(pids[0], signal.SIGKILL)

    async def replaced() -> bool:
        now = await t.versions(12)
        return pids[0] not in now and len(now) == 2

    await until(replaced, 10.0, interval=0.05)
    _, text = await t.get("/metrics")
    assert value(parse(text)[1], "tollway_requests_total", model="echo", status="200") >= 40

    t.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(t.proc.wait(), 30) == 0
    out = await _rest(t)
    assert "exited with status -9" in out
    assert t.admin_key not in out and not leaks_in(out)


async def _refused(url: str) -> bool:
    """Whether a new connection to the instance is refused."""
    host, port = url.removeprefix("http://").split(":")
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def _all_on(t: Tollway, version: str) -> bool:
    seen = await t.versions(12)
    return len(seen) == 2 and set(seen.values()) == {version}


@pytest.fixture
async def stuck_openai() -> AsyncIterator[FakeOpenAI]:
    fake = await FakeOpenAI().start()
    yield fake
    fake.release.set()
    await fake.close()


async def test_sigterm_drains_streams_and_bills_them(
    tollway: Any,
    fake_openai: FakeOpenAI,
    stuck_openai: FakeOpenAI,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    """SIGTERM to the supervisor: every worker stops listening, a stream
    that ends meanwhile ends normally, one still open when the grace period
    ends gets the shutdown error event, and both are billed before exit.

    Nothing here depends on how fast the machine is: the grace period is
    far longer than the test (a slow run cannot cut the finishing stream),
    and its end is the second SIGTERM, which skips what is left of it, sent
    once the finishing stream has ended. The grace timer running out on its
    own is ``test_lifecycle``'s (in process)."""
    cfg = billing_config(fake_openai.url, flush_interval_ms=1000)
    cfg["server"] = {"shutdown_grace_s": 300}
    cfg["providers"]["stuck"] = {
        "kind": "openai",
        "base_url": stuck_openai.url,
        "api_key": "sk-provider-secret",
    }
    cfg["models"].append({"name": "slow", "targets": [{"provider": "stuck", "model": "held"}]})
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    t: Tollway = await tollway(cfg, "--workers", "2")
    auth = {"Authorization": f"Bearer {key['api_key']}"}
    url = t.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        done = await s.post(
            url, json={"model": "fake-held", "messages": MSG, "stream": True}, headers=auth
        )
        cut = await s.post(
            url, json={"model": "slow", "messages": MSG, "stream": True}, headers=auth
        )
        # both streams open: their first event has reached the client
        assert (await done.content.readline()).startswith(b"data: ")
        assert (await cut.content.readline()).startswith(b"data: ")
        t.proc.send_signal(signal.SIGTERM)
        # both workers draining (their listeners closed), both streams still open
        await until(lambda: _refused(t.url), 30.0, what="the workers stopped listening")
        fake_openai.release.set()
        finished = await done.read()  # within the grace period: it ends normally
        t.proc.send_signal(signal.SIGTERM)  # the grace period ends now
        aborted = await cut.read()
    assert await asyncio.wait_for(t.proc.wait(), 60) == 0
    assert finished.rstrip().endswith(b"data: [DONE]")
    assert b'"code":"server_shutting_down"' in aborted
    # the usage of both was flushed before the workers exited (no waiting here)
    rows = await pg.fetch(
        "SELECT e.status, e.completion_tokens FROM usage_events e JOIN tenants t"
        " ON t.id = e.tenant_id WHERE t.name = $1 ORDER BY e.status",
        tenant,
    )
    assert [r["status"] for r in rows] == [200, 503]
    assert all(r["completion_tokens"] > 0 for r in rows)
    out = await _rest(t)
    assert key["api_key"] not in out and not leaks_in(out)
    assert out.count('"type":"access"') == 2  # the access lines, on stdout
