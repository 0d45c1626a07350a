"""Tollway's own parameter on a Postgres URL: ``statement_cache_size``.

asyncpg sends every query parameter it does not know to the server as a
setting, and Postgres refuses an unknown one, so this one is taken off the
URL before asyncpg sees it. ``?statement_cache_size=0`` turns asyncpg's
prepared-statement cache off, which PgBouncer in transaction pooling mode
needs before 1.21 (a named statement prepared on one backend may be
executed on another); the same URL then works for every command that
connects (``serve``, ``migrate``, ``keys``, ``usage``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

PARAM = "statement_cache_size"


def split(url: str) -> tuple[str, int | None]:
    """The URL without the parameter, and its value (None when absent)."""
    parts = urlsplit(url)
    if not parts.query:
        return url, None
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    values = [v for k, v in pairs if k == PARAM]
    if not values:
        return url, None
    try:
        size = int(values[-1])
    except ValueError:
        raise ValueError(f"{PARAM} in the database URL must be a whole number") from None
    if size < 0:
        raise ValueError(f"{PARAM} in the database URL must be 0 or more")
    rest = urlencode([(k, v) for k, v in pairs if k != PARAM])
    return urlunsplit(parts._replace(query=rest)), size


def options(url: str) -> dict[str, Any]:
    """Keyword arguments for ``asyncpg.connect``/``create_pool``: the DSN,
    plus ``statement_cache_size`` when the URL sets it."""
    dsn, size = split(url)
    return {"dsn": dsn} if size is None else {"dsn": dsn, PARAM: size}
