"""``bench/floor_proxy.py`` with ``TOLLWAY_LOOP_LAG_MS`` set runs the gateway's
event-loop lag probe and serves it on /metrics, read by ``bench/lag.py`` as
run.py reads Tollway's; unset, it serves no /metrics of its own. And
``bench/loadgen.py --rate``, the open-loop load the lag is also measured
under, sends at the rate asked, not as fast as the server answers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest

from tests.waiting import until_sync

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import lag  # noqa: E402

CHAT = {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(proc: subprocess.Popen[bytes], port: int) -> None:
    def listening() -> bool:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            return False
        return True

    until_sync(listening, 30, interval=0.05, what=f"something listening on {port}")


@contextmanager
def _serving(argv: list[str], port: int, env: dict[str, str]) -> Iterator[int]:
    """The process's pid, once it listens on ``port``; stopped by PID after."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(proc, port)
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def _floor(probe_ms: str | None) -> Iterator[tuple[int, int]]:
    """(floor_proxy's port, its pid) in front of the fake provider."""
    env = {k: v for k, v in os.environ.items() if k != "TOLLWAY_LOOP_LAG_MS"}
    env["PYTHONPATH"] = str(ROOT)
    provider, port = _free_port(), _free_port()
    fake = [sys.executable, str(ROOT / "bench" / "fake_provider.py"), str(provider)]
    with _serving(fake, provider, env):
        if probe_ms is not None:
            env["TOLLWAY_LOOP_LAG_MS"] = probe_ms
        argv = [sys.executable, str(ROOT / "bench" / "floor_proxy.py"), str(port)]
        argv.append(f"http://127.0.0.1:{provider}")
        with _serving(argv, port, env) as pid:
            yield port, pid


def _chat(port: int) -> dict[str, object]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=orjson.dumps(CHAT),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        answer: dict[str, object] = orjson.loads(r.read())
    return answer


def _observations(port: int) -> float:
    got = lag.scrape(port)
    return got.buckets[float("inf")] if got is not None else 0.0


@pytest.mark.timeout(60)
def test_floor_proxy_reports_its_loop_lag_and_a_stall_shows() -> None:
    with _floor("1") as (port, pid):
        assert "choices" in _chat(port)  # still a pass-through
        until_sync(lambda: _observations(port) >= 50, 20, what="50 lag observations")
        before = lag.scrape(port)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.1)  # the point: the proxy's loop held for 100 ms
        os.kill(pid, signal.SIGCONT)
        assert before is not None
        seen = before.buckets[float("inf")]
        until_sync(lambda: _observations(port) >= seen + 50, 20, what="probe after the stall")
        p99, worst = lag.window(before, lag.scrape(port))
        assert p99 is not None and worst is not None
        assert worst >= 80, f"a 100 ms stall, yet the worst lag reads {worst:.1f} ms"


@pytest.mark.timeout(60)
def test_floor_proxy_without_the_variable_has_no_probe() -> None:
    with _floor(None) as (port, _):
        assert "choices" in _chat(port)
        # /metrics is proxied to the provider like any path: no lag series.
        assert lag.scrape(port) is None


def _loadgen(port: int, *extra: str) -> dict[str, object]:
    argv = [sys.executable, str(ROOT / "bench" / "loadgen.py")]
    argv += [f"http://127.0.0.1:{port}/v1/chat/completions", orjson.dumps(CHAT).decode()]
    argv += ["--concurrency=4", "--duration=1.5", "--warmup=0.2", *extra]
    done = subprocess.run(argv, capture_output=True, check=True, timeout=60)
    result: dict[str, object] = orjson.loads(done.stdout)
    return result


@pytest.mark.timeout(120)
def test_open_loop_load_sends_at_its_rate() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    provider = _free_port()
    fake = [sys.executable, str(ROOT / "bench" / "fake_provider.py"), str(provider)]
    with _serving(fake, provider, env):
        closed = _loadgen(provider)
        paced = _loadgen(provider, "--rate=100")
    assert closed["errors"] == 0 and paced["errors"] == 0
    # 100/s for the 1.5 s window: ~150 completions (the fake provider alone
    # answers thousands a second closed loop, so the rate, not it, set this).
    assert 120 <= paced["ok"] <= 155, paced["ok"]  # type: ignore[operator]
    assert closed["ok"] > 2 * paced["ok"], (closed["ok"], paced["ok"])  # type: ignore[operator]
