"""Standard Webhooks signing (https://www.standardwebhooks.com/).

A secret is ``whsec_`` + base64 of the key bytes. Each delivery carries
``webhook-id``, ``webhook-timestamp`` (Unix seconds) and
``webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``,
so a receiver verifies it with any Standard Webhooks library.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

PREFIX = "whsec_"


def secret_key(secret: str) -> bytes:
    """The key bytes of a ``whsec_`` secret; ValueError when it is not one."""
    if not secret.startswith(PREFIX):
        raise ValueError("a webhook secret starts with 'whsec_'")
    key = base64.b64decode(secret.removeprefix(PREFIX), validate=True)
    if len(key) < 16:
        raise ValueError("a webhook secret holds at least 16 bytes")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def headers(
    key: bytes, body: bytes, now: float | None = None, msg_id: str | None = None
) -> dict[str, str]:
    """``msg_id``: the same for every retry of one message, so a receiver
    can drop a repeat (Standard Webhooks); a fresh one when not given."""
    msg_id = msg_id or f"msg_{secrets.token_hex(12)}"
    ts = int(time.time() if now is None else now)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(key, msg_id, ts, body),
    }
