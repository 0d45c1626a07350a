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
