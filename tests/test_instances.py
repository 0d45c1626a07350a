"""Several instances: two ``tollway serve --workers 2`` processes (four
workers) sharing one Postgres and one Redis Cluster, as two hosts behind a
load balancer would. Requests alternate between the instances and spread
over each one's workers (a fresh connection each, ``SO_REUSEPORT``).

The instances are started once for the module; each test uses its own
tenants. Their output goes to a file, not a pipe, so hundreds of access-log
lines never block a worker on a full pipe.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import yaml

from tests.billing_helpers import TEST_TIERS, billing_config, tenant_with_key, wait_for
from tests.fakes import FakeOpenAI
from tests.redis_cluster import LocalCluster
from tests.test_supervisor import _edit, _free_port
from tests.waiting import until

ROOT = Path(__file__).parents[1]
MSG = [{"role": "user", "content": "hi"}]
TIERS: dict[str, Any] = {
    **TEST_TIERS,  # tiny: 10 requests a month
    "seven": {"requests_per_hour": 7, "monthly_requests": 1000, "max_tokens": 100},
}


@dataclass
class Instance:
    proc: asyncio.subprocess.Process
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Fleet:
    instances: list[Instance]
    config: Path
    cfg: dict[str, Any]
    data_dir: Path
    admin_key: str

    async def get(self, instance: Instance, path: str) -> Any:
        headers = {"Authorization": f"Bearer {self.admin_key}", "Connection": "close"}
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as s,
            s.get(instance.url + path, headers=headers) as r,
        ):
            assert r.status == 200, await r.text()
            return orjson.loads(await r.read())

    async def versions(self, instance: Instance, n: int = 16) -> dict[int, str]:
        """Config version per worker pid, over ``n`` fresh connections."""
        seen: dict[int, str] = {}
        for _ in range(n):
            body = await self.get(instance, "/admin/config")
            seen[body["worker_pid"]] = body["version"]
        return seen


async def _start(config: Path, env: dict[str, str], log: Path) -> Instance:
    port = _free_port()
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "proxy", "serve", "--config", str(config)),
            *("--port", str(port), "--workers", "2"),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    instance = Instance(proc, f"http://127.0.0.1:{port}", log)

    def listening() -> bool:
        assert proc.returncode is None, instance.output()
        return "listening on" in instance.output()

    await until(listening, 90, interval=0.1, what=f"tollway serve on {port} is listening")
    return instance


@pytest.fixture(scope="module")
async def fleet(
    tmp_path_factory: pytest.TempPathFactory, pg_url: str, redis_cluster: LocalCluster
) -> AsyncIterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    fake = await FakeOpenAI().start()
    # db_timeout_s 30, not 2: near its limit every request of a burst of 200
    # takes its lease from Postgres, one quota row's lock at a time; on a loaded
    # CI machine the last ones waited past 2 s and got the designed 503
    # (billing_unavailable), which is not what these tests are about.
    cfg = {
        **billing_config(fake.url, db_timeout_s=30),
        "tiers": TIERS,
        "server": {"watch_config": True},
    }
    config = root / "tollway.yaml"
    config.write_text(yaml.safe_dump(cfg))
    admin_key = f"canary-secret-{secrets.token_hex(8)}"
    env = {
        **os.environ,
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis_cluster.url,
        "TOLLWAY_DATA_DIR": str(root),  # one key secret for both, as tenant_with_key's
        "TOLLWAY_ADMIN_KEY": admin_key,
        # 1 s, not the production 50 ms (as the in-process gateways of the
        # tests): a burst of 200 on a loaded CI core stalls replies past 50 ms,
        # which would switch a worker to its per-process fallback mid-test.
        "TOLLWAY_REDIS_TIMEOUT_MS": "1000",
    }
    instances: list[Instance] = []
    try:
        for i in range(2):
            instances.append(await _start(config, env, root / f"instance{i}.log"))
        yield Fleet(instances, config, cfg, root, admin_key)
    finally:
        for instance in instances:
            if instance.proc.returncode is None:
                instance.proc.terminate()
        for instance in instances:
            try:
                await asyncio.wait_for(instance.proc.wait(), 30)
            except TimeoutError:
                instance.proc.kill()
                await instance.proc.wait()
        await fake.close()


async def _burst(fleet: Fleet, key: str, n: int, model: str = "echo") -> list[tuple[int, Any]]:
    """``n`` requests at once, alternating between the instances, each on a
    new connection (so each instance's kernel picks a worker)."""

    async def one(s: aiohttp.ClientSession, i: int) -> tuple[int, Any]:
        url = fleet.instances[i % 2].url + "/v1/chat/completions"
        headers = {"Authorization": f"Bearer {key}", "Connection": "close"}
        async with s.post(url, json={"model": model, "messages": MSG}, headers=headers) as r:
            return r.status, orjson.loads(await r.read())

    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        return await asyncio.gather(*(one(s, i) for i in range(n)))


async def _all_redis_up(fleet: Fleet) -> None:
    for instance in fleet.instances:
        for _ in range(4):
            body = await fleet.get(instance, "/readyz")
            assert body["redis"] == "up", instance.output()[-2000:]


async def test_ten_left_two_hundred_concurrent_across_instances_exactly_ten_pass(
    fleet: Fleet, pg: asyncpg.Pool
) -> None:
    tenant, key = await tenant_with_key(pg, fleet.data_dir, "tiny", set(TIERS))
    results = await _burst(fleet, key["api_key"], 200)
    statuses = [status for status, _ in results]
    assert statuses.count(200) == 10 and statuses.count(429) == 190
    codes = {body["error"]["code"] for status, body in results if status == 429}
    assert codes == {"insufficient_quota"}
    used = (
        "SELECT c.requests_used FROM quota_counters c JOIN tenants t ON t.id = c.tenant_id"
        " WHERE t.name = $1"
    )
    await wait_for(pg, used, tenant, expect=10, limit=10)
    await _all_redis_up(fleet)


async def test_the_hourly_window_holds_across_instances(fleet: Fleet, pg: asyncpg.Pool) -> None:
    """7 per rolling hour, 60 at once over four workers in two instances: 7."""
    _, key = await tenant_with_key(pg, fleet.data_dir, "seven", set(TIERS))
    results = await _burst(fleet, key["api_key"], 60)
    statuses = [status for status, _ in results]
    assert statuses.count(200) == 7 and statuses.count(429) == 53
    refused = {body["error"]["type"] for status, body in results if status == 429}
    assert refused == {"requests"}  # the hourly window, not the monthly quota
    again = await _burst(fleet, key["api_key"], 4)  # still full, whichever worker
    assert [status for status, _ in again] == [429] * 4
    await _all_redis_up(fleet)


async def test_hot_reload_converges_on_both_instances(fleet: Fleet, pg: asyncpg.Pool) -> None:
    """The YAML both instances read is edited; every worker of both serves the
    new config within the bound (the watcher polls every 250 ms)."""
    _, key = await tenant_with_key(pg, fleet.data_dir, "pro", set(TIERS))
    name = f"reloaded-{secrets.token_hex(3)}"
    assert {s for s, _ in await _burst(fleet, key["api_key"], 2, model=name)} == {404}
    models = [*fleet.cfg["models"], {"name": name, "targets": [{"provider": "echo"}]}]
    version = _edit(fleet.config, {**fleet.cfg, "models": models})

    async def converged() -> bool:
        for instance in fleet.instances:
            seen = await fleet.versions(instance)
            if set(seen.values()) != {version}:
                return False
        return True

    took = await until(converged, 10, interval=0.1, what="both instances serve the new config")
    for instance in fleet.instances:
        assert len(await fleet.versions(instance)) == 2, "each instance's two workers answered"
    results = await _burst(fleet, key["api_key"], 8, model=name)
    assert [status for status, _ in results] == [200] * 8, f"converged in {took:.2f}s"
