"""The tollway command: operator mistakes are one line, never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.stores import embedded as datastores

ROOT = Path(__file__).parents[1]


def _env(pg_url: str | None = None, data_dir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TOLLWAY_DATA_DIR")}
    if pg_url:
        env["DATABASE_URL"] = pg_url
    if data_dir:
        env["TOLLWAY_DATA_DIR"] = str(data_dir)
    return env


def _tollway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env or _env(),
    )


def test_missing_config_is_one_line(tmp_path: Path) -> None:
    out = _tollway("serve", "--config", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "config file not found" in out.stderr and "Traceback" not in out.stderr


def test_invalid_config_names_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "providers:\n  e: {kind: echo}\n"
        "models:\n  - name: x\n    targets: [{provider: e, weight: -1}]\n"
    )
    out = _tollway("check-config", str(bad))
    assert out.returncode == 2
    assert out.stderr.strip() == ("tollway: config error: models[0].targets[0].weight: must be > 0")


def test_check_config_ok() -> None:
    out = _tollway("check-config", "config/tollway.yaml")
    assert out.returncode == 0 and out.stdout.startswith("ok:")


def test_port_in_use_is_one_line(pg_url: str, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _tollway("serve", "--port", str(port), env=_env(pg_url, tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().endswith(f"port {port} on 127.0.0.1 is already in use")


def test_unmigrated_database_is_refused(tmp_path: Path) -> None:
    # a fresh embedded database in its own data dir: nothing migrated yet
    out = _tollway("serve", "--port", "1", env=_env(None, tmp_path))
    assert out.returncode == 2
    assert "the database is not migrated" in out.stderr
    assert "run `tollway migrate`" in out.stderr and "Traceback" not in out.stderr


def test_admin_commands(pg_url: str, tmp_path: Path) -> None:
    env = _env(pg_url, tmp_path)
    tenant = f"cli-{os.getpid()}-{tmp_path.name[-6:]}".replace("_", "-")
    assert _tollway("migrate", env=env).stdout.strip() == "database is up to date"
    made = _tollway("tenants", "create", tenant, "--tier", "pro", env=env)
    assert made.returncode == 0, made.stderr
    out = _tollway(
        "keys",
        "create",
        "--tenant",
        tenant,
        "--name",
        "ci-bot",
        "--expires-in-days",
        "365",
        "--json",
        env=env,
    )
    key = json.loads(out.stdout)
    assert key["api_key"].startswith("tw-") and key["tenant"] == tenant
    assert key["tier"] == "pro" and key["rate_limit"]["requests_per_hour"] == 1000
    assert key["expires_at"]
    listed = _tollway("keys", "list", "--tenant", tenant, env=env).stdout
    assert key["key_id"] in listed and key["api_key"] not in listed
    rotated = _tollway("keys", "rotate", key["key_id"], env=env)
    assert rotated.returncode == 0 and "api_key=tw-" in rotated.stdout
    assert _tollway("keys", "revoke", key["key_id"], env=env).returncode == 0
    assert _tollway("tenants", "set-tier", tenant, "enterprise", env=env).returncode == 0
    bad = _tollway("tenants", "set-tier", tenant, "platinum", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("tollway: unknown tier 'platinum'")


async def test_serve_runs_the_demo(tmp_path: Path) -> None:
    """What `make run` does, on an empty embedded database of its own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--migrate",
        "--demo",
        "--port",
        str(port),
        cwd=ROOT,
        env=_env(None, tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(60):
            while not lines or "listening on" not in lines[-1]:
                lines.append((await proc.stdout.readline()).decode())
                assert lines[-1], "".join(lines)
        key = next(w for line in lines for w in line.split() if w.startswith("tw-"))
        body = {"model": "echo", "messages": [{"role": "user", "content": "ping"}]}
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            ) as r,
        ):
            answer = await r.json()
        assert answer["choices"][0]["message"]["content"] == "ping"
    finally:
        proc.terminate()
        await proc.wait()


def test_an_empty_database_says_how_to_create_a_tenant(tmp_path: Path) -> None:
    env = _env(None, tmp_path)
    assert _tollway("migrate", env=env).returncode == 0
    out = _tollway("tenants", "list", env=env)
    assert out.returncode == 0
    assert out.stdout.strip() == (
        "no tenants yet; create one with: tollway tenants create NAME --tier free"
    )


def test_the_default_config_is_found_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert datastores.home() == ROOT
    assert datastores.default_config() == ROOT / "config" / "tollway.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert out.returncode == 0 and out.stdout.startswith("ok:"), out.stderr


def test_a_missing_default_config_names_the_file_and_the_way_out(tmp_path: Path) -> None:
    env = {**_env(), "TOLLWAY_CONFIG": str(tmp_path / "gone.yaml")}
    out = _tollway("tenants", "list", env=env)
    assert out.returncode == 2
    assert str(tmp_path / "gone.yaml") in out.stderr and "--config PATH" in out.stderr


def test_the_embedded_redis_has_its_own_session(tmp_path: Path) -> None:
    """A terminal's Ctrl-C goes to the foreground process group; Redis is not in it,
    so it keeps serving while Tollway drains, and Tollway stops it last."""
    redis = datastores.EmbeddedRedis(tmp_path)
    redis.start()
    try:
        assert redis.proc is not None
        assert os.getsid(redis.proc.pid) == redis.proc.pid != os.getsid(0)
    finally:
        redis.stop()
