"""``tollway serve --workers N``: N HTTP worker processes sharing one port,
and ``batches.workers`` batch processes beside them.

The supervisor does what must happen once per instance, then starts the
workers and looks after them:

- it resolves ``DATABASE_URL``/``REDIS_URL`` (starting the embedded servers
  when they are unset) and runs ``--migrate``/``--demo`` before any worker
  exists, so the workers share nothing but Postgres and Redis;
- it reserves the port (refusing one already in use, resolving port 0) and
  each worker binds it with ``SO_REUSEPORT``, so the kernel spreads new
  connections over the workers;
- it gives the instance a fresh metrics directory (``proxy.web.metrics_share``);
- SIGTERM/SIGINT are forwarded to every worker as SIGTERM (each drains, see
  ``proxy.web.lifecycle``) and the supervisor waits for them, up to the grace
  period plus a margin; SIGHUP is forwarded (every worker reloads);
- a worker that dies is restarted, with a growing pause when it keeps
  dying; one that dies before it was ever ready ends the start-up (its own
  one-line error is already on stderr).

Batch processes run the same app (the same Postgres, Redis, config and hot
reload, their metrics merged into every worker's ``/metrics``) but listen on
no socket and run batch lines only, at OS priority ``batches.nice``; the
HTTP workers then run none (``TOLLWAY_ROLE``, ``proxy.web.batches_setup``).
Batch lines are CPU spent on work nobody is waiting for this second: in
their own niced processes the kernel's scheduler gives the HTTP workers the
CPU first, which no limit inside a shared event loop can do. With
``batches.workers: 0`` the HTTP workers run the lines themselves.

Workers run in their own process group, so a terminal's Ctrl-C reaches them
once, through the supervisor, and they stop by themselves if the supervisor
disappears (``server.serve`` watches the parent).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

from proxy.web.batches_setup import BatchRole
from proxy.web.metrics_share import ENV as METRICS_DIR_ENV
from proxy.web.reload import SUPERVISOR_ENV
from proxy.web.server import StartupError

log = logging.getLogger("tollway.supervisor")
READY_FD_ENV = "TOLLWAY_READY_FD"
ROLE_ENV = "TOLLWAY_ROLE"  # "http" or "lines" in a supervisor's worker
START_TIMEOUT = 60.0
STOP_MARGIN = 30.0  # beyond the grace period: flushing usage, closing pools
MAX_BACKOFF = 30.0


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Check the port is free and hold it (bound, not listening) for the workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"port {port} on {host} is already in use") from None
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        port = probe.getsockname()[1]
    held = socket.socket(family, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind((host, port))
    return held, port


@dataclass
class _Worker:
    index: int
    role: str  # "http": serves the port; "lines": runs batch lines, no socket
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = 0.5
    restart_at: float | None = None

    @property
    def kind(self) -> str:
        return "batch worker" if self.role == "lines" else "worker"


@dataclass
class Supervisor:
    argv: Sequence[str]  # a worker's command line
    env: Mapping[str, str]
    count: int
    grace: Callable[[], float]  # the shutdown grace, read when stopping
    batch_workers: int = 0
    workers: list[_Worker] = field(default_factory=list)
    stopping: int = 0  # stop signals received

    def run(self, ready_line: str) -> int:
        read_fd, write_fd = os.pipe()
        self._ready_fd = write_fd
        self._install_signals()
        # Without batch processes the HTTP workers run the lines (no role).
        http = "http" if self.batch_workers else ""
        self.workers = [_Worker(i, http) for i in range(self.count)]
        self.workers += [_Worker(self.count + i, "lines") for i in range(self.batch_workers)]
        for w in self.workers:
            self._spawn(w)
        try:
            if not self._wait_ready(read_fd):
                self._stop_all()
                return 2
            if ready_line:
                print(ready_line, flush=True)
            while not self.stopping:
                time.sleep(0.2)
                _drain(read_fd)
                self._look_after()
            self._stop_all()
            return 0
        finally:
            os.close(read_fd)
            os.close(write_fd)

    def _install_signals(self) -> None:
        def stop(signum: int, frame: FrameType | None) -> None:
            self.stopping += 1
            if self.stopping > 1:  # a second signal: the workers skip their grace
                self._signal_all(signal.SIGTERM)

        def hup(signum: int, frame: FrameType | None) -> None:
            self._signal_all(signal.SIGHUP)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)

    def _spawn(self, w: _Worker) -> None:
        env = {**self.env, READY_FD_ENV: str(self._ready_fd), "TOLLWAY_WORKER_INDEX": str(w.index)}
        if w.role:
            env[ROLE_ENV] = w.role
        w.proc = subprocess.Popen(
            list(self.argv), env=env, pass_fds=(self._ready_fd,), process_group=0
        )
        w.started, w.restart_at = time.monotonic(), None

    def _wait_ready(self, read_fd: int) -> bool:
        ready, deadline = 0, time.monotonic() + START_TIMEOUT
        while ready < len(self.workers):
            if self.stopping:
                return False
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None:
                    log.error(
                        "%s %d exited during start-up (status %s)",
                        w.kind,
                        w.index,
                        w.proc.returncode,
                    )
                    return False
            if time.monotonic() > deadline:
                log.error("workers did not start within %gs", START_TIMEOUT)
                return False
            ready += _drain(read_fd, wait=0.2)
        return True

    def _look_after(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.restart_at is not None:
                if now >= w.restart_at:
                    log.warning("restarting %s %d", w.kind, w.index)
                    self._spawn(w)
                continue
            if w.proc is None or w.proc.poll() is None:
                continue
            lived = now - w.started
            w.backoff = 0.5 if lived > 60 else min(MAX_BACKOFF, w.backoff * 2)
            w.restart_at = now + (0 if lived > 60 else w.backoff)
            log.error(
                "%s %d (pid %d) exited with status %s after %.0fs",
                w.kind,
                w.index,
                w.proc.pid,
                w.proc.returncode,
                lived,
            )

    def _signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    def _stop_all(self) -> None:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace() + STOP_MARGIN
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("%s %d did not stop in time; killing it", w.kind, w.index)
                w.proc.kill()
                w.proc.wait()


def _drain(fd: int, wait: float = 0.0) -> int:
    """Bytes the workers wrote to the ready pipe (one each when listening)."""
    got = 0
    while select.select([fd], [], [], wait)[0]:
        got += len(os.read(fd, 64))
        wait = 0.0
    return got


def worker_argv(config_path: str, host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        os.path.abspath(config_path),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def supervise(
    config_path: str,
    host: str,
    port: int,
    count: int,
    env: Mapping[str, str],
    grace: Callable[[], float],
    ready_line: Callable[[int], str],
    batch_workers: int = 0,
) -> int:
    held, port = reserve_port(host, port)
    metrics_dir = tempfile.mkdtemp(prefix="tollway-metrics-")
    worker_env = {
        **os.environ,
        **env,
        SUPERVISOR_ENV: str(os.getpid()),
        METRICS_DIR_ENV: metrics_dir,
    }
    try:
        argv = worker_argv(config_path, host, port)
        sup = Supervisor(argv, worker_env, count, grace, batch_workers)
        return sup.run(ready_line(port))
    finally:
        held.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def notify_ready() -> None:
    """In a worker: tell the supervisor this worker listens."""
    fd = os.environ.get(READY_FD_ENV)
    if fd and fd.isdigit():
        with contextlib.suppress(OSError):
            os.write(int(fd), b"1")
            os.close(int(fd))


def supervisor_pid() -> int | None:
    pid = os.environ.get(SUPERVISOR_ENV)
    return int(pid) if pid and pid.isdigit() else None


def role() -> BatchRole:
    """This process's part in batch work (``proxy.web.batches_setup``)."""
    given = os.environ.get(ROLE_ENV) if supervisor_pid() is not None else None
    if given == "http":
        return "http"
    if given == "lines":
        return "lines"
    return "inline"
