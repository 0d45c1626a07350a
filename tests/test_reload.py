"""Hot reload against a real gateway: file edits, symlink swaps, refusals, the admin API."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.pipeline.registry import parse_config
from tests.conftest import Gateway, StartGateway, gateway_config
from tests.fakes import FakeOpenAI
from tests.waiting import until

MSG = [{"role": "user", "content": "hello there"}]


def write_atomically(path: Path, cfg: dict[str, Any] | str) -> str:
    """An editor's save: write a temp file, rename it over the old one."""
    text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg)
    tmp = path.with_name(path.name + ".swp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text


def with_model(base: dict[str, Any], name: str, **extra: Any) -> dict[str, Any]:
    cfg = {
        **base,
        **extra,
        "models": [*base["models"], {"name": name, "targets": [{"provider": "echo"}]}],
    }
    return cfg


async def listed(gw: Gateway) -> set[str]:
    async with aiohttp.ClientSession() as s, s.get(gw.base_url + "/models") as r:
        return {m["id"] for m in (await r.json())["data"]}


async def admin(gw: Gateway, method: str, path: str, key: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, gw.url + path, headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        return r.status, await r.json()


@pytest.fixture
def admin_key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = f"canary-secret-{secrets.token_hex(8)}"
    monkeypatch.setenv("TOLLWAY_ADMIN_KEY", key)
    return key


async def test_reload_applies_within_2s_under_load_with_zero_failures(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    path = tmp_path / "tollway.yaml"
    base = gateway_config(fake_openai.url)
    gw = await start_gateway(base, config_file=path)
    statuses: list[int] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                body = {
                    "model": "fake-model" if i % 2 else "echo",
                    "messages": MSG,
                    "stream": i % 3 == 0,
                }
                async with s.post(gw.base_url + "/chat/completions", json=body) as r:
                    await r.read()
                    statuses.append(r.status)

    async with asyncio.TaskGroup() as load:
        for i in range(8):
            load.create_task(client(i))
        await until(lambda: len(statuses) >= 25)  # the load is flowing
        text = write_atomically(path, with_model(base, "new-model"))
        took = await until(lambda: _has(gw, "new-model"), 2.0)
        served = len(statuses)
        await until(lambda: len(statuses) >= served + 25)  # and flows on the new config
        stop.set()
    assert took < 2.0
    assert len(statuses) > 50 and set(statuses) == {200}, set(statuses)
    new = parse_config(text, {}).version
    versions = {r.config.version for r in gw.settler.records if r.config is not None}
    assert new in versions and len(versions) == 2  # both versions served, each request one


async def _has(gw: Gateway, model: str) -> bool:
    return model in await listed(gw)


async def test_stream_finishes_on_the_snapshot_it_started_with(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    path = tmp_path / "tollway.yaml"
    base = gateway_config(fake_openai.url)
    gw = await start_gateway(base, config_file=path)
    old_version = parse_config(path.read_text(), {}).version
    # The new config sends every fake-* model to the echo provider instead.
    moved = {
        **base,
        "models": [*base["models"][:2], {"name": "fake-*", "targets": [{"provider": "echo"}]}],
    }
    body = {"model": "fake-held", "messages": MSG, "stream": True}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json=body) as r,
    ):
        first = await r.content.readline()
        assert first.startswith(b"data: ")
        write_atomically(path, moved)
        await until(lambda: _version_changed(gw, old_version), 2.0)
        fake_openai.release.set()
        rest = await r.read()
    assert rest.rstrip().endswith(b"data: [DONE]")
    record = gw.settler.records[-1]
    assert record.provider == "fake" and record.status == 200
    assert record.config is not None and record.config.version == old_version
    # A request that starts now takes the new route.
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json={**body, "stream": False}) as r,
    ):
        assert r.status == 200 and r.headers["x-tollway-provider"] == "echo"


async def _version_changed(gw: Gateway, old: str) -> bool:
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/readyz") as r:
        return bool((await r.json())["config_version"] != old)


def _bad_edits(base: dict[str, Any]) -> dict[str, str]:
    good = yaml.safe_dump(base)
    unknown_provider = with_model(base, "x")
    unknown_provider["models"][-1]["targets"] = [{"provider": "nope"}]
    env_ref = {
        **base,
        "providers": {
            **base["providers"],
            "more": {
                "kind": "openai",
                "base_url": "http://x",
                "api_key": "${TOLLWAY_TEST_UNSET_VAR}",
            },
        },
    }
    return {
        "bad yaml": good + "models: [\n  - {name: x\n",
        "schema error": yaml.safe_dump({**base, "bogus": 1}),
        "unknown provider": yaml.safe_dump(unknown_provider),
        "env unset": yaml.safe_dump(env_ref),
        "empty file": "",
        "truncated file": good[: len(good) // 3],
    }


EXPECTED = {
    "bad yaml": "<root>: invalid YAML",
    "schema error": "bogus: unknown key",
    "unknown provider": "models[3].targets[0].provider: unknown provider 'nope'",
    "env unset": "providers.more.api_key: environment variable TOLLWAY_TEST_UNSET_VAR is not set",
    "empty file": "<root>: the file is empty",
    "truncated file": "",
}


@pytest.mark.parametrize("edit", list(EXPECTED))
async def test_invalid_edit_is_refused_and_the_old_config_keeps_serving(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
    admin_key: str,
    edit: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "tollway.yaml"
    base = gateway_config(fake_openai.url)
    gw = await start_gateway(base, config_file=path)
    before = (await admin(gw, "GET", "/admin/config", admin_key))[1]
    write_atomically(path, _bad_edits(base)[edit])

    async def refused() -> bool:
        return (await admin(gw, "GET", "/admin/config", admin_key))[1]["last_error"] is not None

    await until(refused, 2.0)
    status = (await admin(gw, "GET", "/admin/config", admin_key))[1]
    assert status["version"] == before["version"] and status["loaded_at"] == before["loaded_at"]
    message = status["last_error"]["message"]
    assert message.startswith(EXPECTED[edit]), message
    assert "sk-provider-secret" not in message
    assert any("config reload refused" in r.getMessage() for r in caplog.records)
    # still serving the old config
    async with aiohttp.ClientSession() as s:
        async with s.post(
            gw.base_url + "/chat/completions", json={"model": "fake-model", "messages": MSG}
        ) as r:
            assert r.status == 200
        async with s.get(gw.url + "/metrics") as r:
            metrics = await r.text()
    assert 'tollway_config_reload_total{result="failure"} 1' in metrics
    assert 'tollway_config_reload_total{result="success"} 0' in metrics
    assert f'tollway_config_version_info{{version="{before["version"]}"}} 1' in metrics
    # the file fixed: it applies and the error clears
    write_atomically(path, with_model(base, "fixed"))
    await until(lambda: _has(gw, "fixed"), 2.0)
    assert (await admin(gw, "GET", "/admin/config", admin_key))[1]["last_error"] is None


async def test_configmap_symlink_swap_is_picked_up(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    # kubelet's layout: tollway.yaml -> ..data/tollway.yaml, ..data -> ..<timestamp>/
    mount = tmp_path / "etc-tollway"
    (mount / "..2024_01_01").mkdir(parents=True)
    (mount / "..data").symlink_to("..2024_01_01")
    (mount / "tollway.yaml").symlink_to("..data/tollway.yaml")
    base = gateway_config(fake_openai.url)
    gw = await start_gateway(base, config_file=mount / "tollway.yaml")
    # an update: a new timestamped dir, then ..data swapped by an atomic rename
    (mount / "..2024_01_02").mkdir()
    (mount / "..2024_01_02" / "tollway.yaml").write_text(
        yaml.safe_dump(with_model(base, "from-configmap"))
    )
    (mount / "..data_tmp").symlink_to("..2024_01_02")
    os.replace(mount / "..data_tmp", mount / "..data")
    (mount / "..2024_01_01" / "tollway.yaml").unlink()
    (mount / "..2024_01_01").rmdir()
    took = await until(lambda: _has(gw, "from-configmap"), 2.0)
    assert took < 2.0


async def test_a_burst_of_writes_is_one_reload(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, tmp_path: Path, admin_key: str
) -> None:
    path = tmp_path / "tollway.yaml"
    base = gateway_config(fake_openai.url)
    gw = await start_gateway(base, config_file=path)
    final = yaml.safe_dump(with_model(base, "burst-9"))
    with open(path, "w") as fh:  # noqa: ASYNC230 - an editor writing in place, in pieces
        for i in range(10):
            fh.seek(0)
            fh.truncate()
            fh.write(final[: len(final) * (i + 1) // 10])
            fh.flush()
            await asyncio.sleep(0.03)  # the behaviour: an editor's writes, 30 ms apart
    await until(lambda: _has(gw, "burst-9"), 2.0)
    # a window in which nothing may happen: a second reload would come within
    # the watcher's poll and settle time (0.5 s)
    await asyncio.sleep(0.6)
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
        metrics = await r.text()
    assert 'tollway_config_reload_total{result="success"} 1' in metrics
    assert 'tollway_config_reload_total{result="failure"} 0' in metrics


async def test_admin_reload_and_config(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, tmp_path: Path, admin_key: str
) -> None:
    path = tmp_path / "tollway.yaml"
    base = gateway_config(fake_openai.url, server={"watch_config": False})
    gw = await start_gateway(base, config_file=path)
    status, body = await admin(gw, "GET", "/admin/config", admin_key)
    assert status == 200 and body["watching"] is False and body["last_error"] is None
    assert body["version"] == parse_config(path.read_text(), {}).version and body["loaded_at"]
    text = write_atomically(path, with_model(base, "by-admin"))
    # a window in which nothing may happen: longer than a watcher's poll and
    # settle time (0.5 s), so a watcher that ran anyway would have reloaded
    await asyncio.sleep(0.8)
    assert "by-admin" not in await listed(gw)  # not watching: only an explicit reload
    status, body = await admin(gw, "POST", "/admin/reload", "wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = await admin(gw, "POST", "/admin/reload", admin_key)
    assert status == 200 and body["result"] == "success"
    assert body["version"] == parse_config(text, {}).version
    assert "by-admin" in await listed(gw)
    status, body = await admin(gw, "POST", "/admin/reload", admin_key)
    assert status == 200 and body["result"] == "unchanged"
    write_atomically(
        path, "providers: {e: {kind: echo}}\nmodels: [{name: m, targets: [{provider: nope}]}]\n"
    )
    status, body = await admin(gw, "POST", "/admin/reload", admin_key)
    assert status == 400 and body["error"]["code"] == "config_invalid"
    assert "models[0].targets[0].provider: unknown provider 'nope'" in body["error"]["message"]
    status, body = await admin(gw, "GET", "/admin/config", admin_key)
    assert body["version"] == parse_config(text, {}).version
    assert body["last_error"]["message"].startswith("models[0].targets[0].provider")
    assert body["last_reload"]["result"] == "failure"


async def test_admin_config_is_off_without_an_admin_key(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOLLWAY_ADMIN_KEY", raising=False)
    status, body = await admin(gateway, "GET", "/admin/config", "anything")
    assert status == 404 and body["error"]["code"] == "not_found"


@pytest.mark.parametrize("watch", [True, False])
async def test_restoring_the_live_file_clears_the_last_error(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
    admin_key: str,
    watch: bool,
) -> None:
    """The live file valid again (the very text being served) is no error any more,
    whether the watcher or ``/admin/reload`` notices it."""
    path = tmp_path / "tollway.yaml"
    base = gateway_config(fake_openai.url, server={"watch_config": watch})
    gw = await start_gateway(base, config_file=path)
    good = path.read_text()
    write_atomically(path, "models: [unclosed\n")
    if not watch:
        assert (await admin(gw, "POST", "/admin/reload", admin_key))[0] == 400

    async def refused() -> bool:
        return (await admin(gw, "GET", "/admin/config", admin_key))[1]["last_error"] is not None

    await until(refused, 2.0)
    write_atomically(path, good)
    if not watch:
        status, body = await admin(gw, "POST", "/admin/reload", admin_key)
        assert status == 200 and body["result"] == "unchanged"

    async def cleared() -> bool:
        return (await admin(gw, "GET", "/admin/config", admin_key))[1]["last_error"] is None

    await until(cleared, 2.0)
