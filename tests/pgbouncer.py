"""A real PgBouncer (Debian's ``pgbouncer``) in transaction pooling mode in
front of the tests' Postgres, on a free loopback port, stopped by PID.

Run as root (CI), PgBouncer refuses to start unless told to switch user;
it switches to the owner of the Postgres socket directory, the one user
that may connect through it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

PASSWORD = "pgbouncer-test"  # only ever checked by this PgBouncer


def require_pgbouncer() -> str:
    """The binary; a clear failure (never a skip) when it is missing."""
    path = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
    )
    if path is None:
        raise AssertionError(
            "pgbouncer is not installed: `make test` installs it (Debian's pgbouncer package); "
            "by hand: apt-get install --no-install-recommends pgbouncer"
        )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgBouncer:
    def __init__(self, upstream_url: str, workdir: Path, pool_size: int = 2) -> None:
        self.binary = require_pgbouncer()
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        parts = urlsplit(upstream_url)
        query = parse_qs(parts.query)
        host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
        self.user = parts.username or "postgres"
        self.dbname = parts.path.lstrip("/") or "postgres"
        upstream = f"host={host} port={parts.port or 5432} dbname={self.dbname} user={self.user}"
        if parts.password:
            upstream += f" password={parts.password}"
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "userlist.txt").write_text(f'"{self.user}" "{PASSWORD}"\n')
        self.ini = workdir / "pgbouncer.ini"
        self.ini.write_text(
            "[databases]\n"
            f"{self.dbname} = {upstream}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = md5\n"
            f"auth_file = {workdir / 'userlist.txt'}\n"
            "pool_mode = transaction\n"
            # Fewer server connections than the gateway's pool: consecutive
            # transactions of one client connection meet different backends.
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 200\n"
        )
        # As root: run as the owner of the socket directory (the embedded
        # Postgres's own user). Files are read before the switch; the log is
        # its stderr, a file this process opened.
        self.run_as: str | None = None
        if os.geteuid() == 0:
            owner = os.stat(host).st_uid if host.startswith("/") else 65534
            self.run_as = pwd.getpwuid(owner).pw_name

    @property
    def url(self) -> str:
        """What the gateway is given: the PgBouncer, with asyncpg's statement
        cache off on the URL itself (``proxy.stores.pgdsn``)."""
        return (
            f"postgresql://{self.user}:{PASSWORD}@127.0.0.1:{self.port}/{self.dbname}"
            "?statement_cache_size=0"
        )

    def start(self) -> None:
        argv = [self.binary, *(["-u", self.run_as] if self.run_as else []), str(self.ini)]
        with open(self.workdir / "pgbouncer.log", "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # no event loop here: a bounded poll
            if self.proc.poll() is not None:
                raise AssertionError(f"pgbouncer exited at start: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"pgbouncer did not listen on {self.port} within 10 s: {self.log()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, 15)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
            proc.wait(5)

    def log(self) -> str:
        path = self.workdir / "pgbouncer.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""
