"""``bench/syscalls.py`` and ``bench/loopwatch.py`` run against real
gateways and report what they promise (smoke tests: the numbers are not
checked beyond what must hold for any request)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_syscalls_splits_cpu_and_counts_syscalls_per_request(tmp_path: Path) -> None:
    import syscalls

    out = tmp_path / "syscalls.json"
    argv = [sys.executable, str(ROOT / "bench" / "syscalls.py"), "--prompt-kb", "0.5"]
    # 300 requests: /proc counts CPU in 10 ms ticks, and 60 pass-through
    # requests (~150 µs each here) once read as 0 ticks in a full-suite run.
    argv += ["--concurrency", "4", "--requests", "300", "--warmup", "10", "--repeats", "1"]
    argv += ["--idle-s", "1", "--json", str(out), "--stores"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = orjson.loads(out.read_bytes())
    assert {r["target"] for r in rows} == {"tollway", "tollway_billing"}
    for row in rows:
        assert row["cpu"]["user_us"] + row["cpu"]["sys_us"] > 0
        # --stores: the datastores' CPU is read (too few ticks here to be > 0)
        assert row["cpu"]["pg_us"] >= 0 and row["cpu"]["redis_us"] >= 0
        if syscalls.perf_works():
            # Every request is read from one socket and answered on it, and
            # goes to the provider and back on another: on the loop's thread
            # (less a few at the counting window's edges: 1.94 reads a
            # request was seen over 60 requests at c=4).
            assert row["main"]["read"] >= 1.5 and row["main"]["write"] >= 1.5, row
    assert "| chat | 0.5 | 4 | tollway_billing |" in done.stdout
    assert "| Postgres / Redis µs/req |" in done.stdout


# A process that burns CPU in a child it waits for (reaped), then in a
# child that stays alive, and says so; it exits when its stdin closes.
_PARENT = r"""
import subprocess, sys
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
subprocess.run([sys.executable, "-c", BURN], check=True)
live = subprocess.Popen(
    [sys.executable, "-c", BURN + "print('burnt', flush=True)\nimport sys\nsys.stdin.read()"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
)
assert live.stdout.readline().strip() == "burnt"
print("ready", flush=True)
sys.stdin.read()
live.stdin.close()
live.wait(timeout=30)
"""


@pytest.mark.timeout(60)
def test_a_datastores_cpu_counts_its_children_alive_and_reaped() -> None:
    """``--stores`` reads a Postgres postmaster with its backends: the CPU
    of its live children and of the ones it reaped (a backend that exited)."""
    import syscalls

    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None and parent.stdin is not None
        assert parent.stdout.readline().strip() == "ready"
        # 0.6 s burnt in the two children, the parent itself next to nothing
        # (CPU is counted in 10 ms ticks: a margin for them)
        assert syscalls._tree_cpu(parent.pid) >= 0.5e6
        parent.stdin.close()
        assert parent.wait(timeout=30) == 0
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_loopwatch_reports_turns_and_callbacks(tmp_path: Path) -> None:
    out = tmp_path / "loopwatch.json"
    argv = [sys.executable, str(ROOT / "bench" / "loopwatch.py"), "--target", "tollway"]
    argv += ["--prompt-kb", "0.5", "--concurrency", "4", "--requests", "80", "--warmup", "10"]
    argv += ["--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = orjson.loads(out.read_bytes())
    # A request is several callbacks (its read, its handler's steps, the
    # provider's answer), all in the window the requests were sent in.
    assert data["callbacks"] >= 2 * 80 and data["turns"]
    assert all(cpu >= 0 and wall >= 0 for wall, cpu, _ in data["turns"])
    assert "| CPU time of the loop's thread |" in done.stdout
