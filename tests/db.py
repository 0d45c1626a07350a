"""Real Postgres for the tests: ``DATABASE_URL`` if set, else an embedded server.

The embedded server lives in a temporary directory for the whole session and
is deleted afterwards. Tests isolate themselves by creating their own
tenants (unique names), never by mocking or truncating.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from proxy.stores.embedded import EmbeddedPostgres


def start_database(root: Path) -> tuple[str, EmbeddedPostgres | None]:
    url = os.environ.get("DATABASE_URL")
    if url:
        return url, None
    server = EmbeddedPostgres(root / "pg", cleanup="delete")
    return server.start(), server


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def server_pids(pgdata: Path) -> list[int]:
    """The postmaster of the server in ``pgdata`` and all its children (backends)."""
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == postmaster:
            pids.append(int(stat.parent.name))
    return pids
