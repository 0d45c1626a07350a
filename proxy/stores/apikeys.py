"""API key format, generation and hashing.

A key is ``tw-`` + 43 URL-safe base64 characters (256 bits from
``secrets``). It is stored only as HMAC-SHA256 under a server secret, plus a
short display prefix. ``looks_valid`` runs before any lookup, so junk, SQL
fragments, NUL bytes and 10 KB strings are refused without a query.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path

import asyncpg

from proxy.stores import pgwait

PREFIX = "tw-"
_SHAPE = re.compile(r"tw-[A-Za-z0-9_-]{43}")
DISPLAY_CHARS = 10  # "tw-" + 7 characters: enough to tell keys apart, useless to guess


def generate() -> str:
    return PREFIX + secrets.token_urlsafe(32)


KEY_LENGTH = 46  # "tw-" + 43 characters


def looks_valid(key: str) -> bool:
    return len(key) == KEY_LENGTH and _SHAPE.fullmatch(key) is not None


def display_prefix(key: str) -> str:
    return key[:DISPLAY_CHARS]


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


_BLOCK = 64  # SHA-256's block size, in bytes


class KeyHasher:
    """HMAC-SHA256 of keys under the server secret.

    Every request with a key hashes it (the key cache is keyed by the
    digest), and OpenSSL's HMAC sets up its digest afresh each time (~3x
    the hashing itself). So the two padded-key states of RFC 2104 are
    hashed once here and copied per key: the same digest as
    ``hmac.new(secret, key, sha256)``, a third of the cost."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("TOLLWAY_KEY_SECRET must be at least 16 bytes")
        self._secret = secret
        padded = (hashlib.sha256(secret).digest() if len(secret) > _BLOCK else secret).ljust(
            _BLOCK, b"\0"
        )
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def digest(self, key: str) -> bytes:
        inner = self._inner.copy()
        inner.update(key.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def load_secret(data_dir: Path) -> bytes:
    """``TOLLWAY_KEY_SECRET``, or a secret generated once and kept (mode 0600)
    under the data directory, so embedded set-ups need no configuration."""
    env = os.environ.get("TOLLWAY_KEY_SECRET")
    if env:
        return env.encode()
    path = data_dir / "key_secret"
    if not path.exists():
        _create_once(path, secrets.token_urlsafe(48))
    return path.read_text().strip().encode()


def _create_once(path: Path, content: str) -> None:
    """Write ``content`` to a file of our own, then link it into place: the
    workers of ``serve --workers N`` start together, and each must read
    either nothing yet or the whole secret the first of them made."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic; fails if another worker was first
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


_LOOKUP = """
SELECT k.id, k.prefix, k.state, k.expires_at, t.id AS tenant_id, t.name AS tenant,
       coalesce(k.tier, t.tier) AS tier, t.budgets AS tenant_budgets, k.budgets AS key_budgets
FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
WHERE k.digest = $1
"""


async def lookup(pool: asyncpg.Pool, budget: pgwait.Budget, digest: bytes) -> asyncpg.Record | None:
    """The key with this digest, its tenant and effective tier (None: unknown)."""
    return await pgwait.fetchrow(pool, budget, "key lookup", _LOOKUP, digest)
