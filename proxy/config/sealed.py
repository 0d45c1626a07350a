"""Secrets sealed with the master key, so a YAML file can hold them.

A config value written ``enc:<token>`` is a secret (a provider key, say)
encrypted with ``TOLLWAY_MASTER_KEY`` (a Fernet key: AES-128-CBC with an
HMAC-SHA256, from ``cryptography``), opened when the config is loaded. The
file can then live in git or a ConfigMap while the one master key lives in a
Secret. ``tollway seal`` makes the tokens; ``tollway seal --new-key`` makes
a master key. A token that cannot be opened (no master key, another key, a
damaged token) refuses the whole config, naming the key path, never a value.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken

PREFIX = "enc:"
MASTER_KEY_ENV = "TOLLWAY_MASTER_KEY"


class SealError(ValueError):
    """Why a sealed value could not be opened (no secret in the message)."""


def new_key() -> str:
    return Fernet.generate_key().decode()


def _fernet(master_key: str | None) -> Fernet:
    if not master_key:
        raise SealError(f"{MASTER_KEY_ENV} is not set")
    try:
        return Fernet(master_key.encode())
    except (ValueError, TypeError):
        raise SealError(
            f"{MASTER_KEY_ENV} is not a valid key (see `tollway seal --new-key`)"
        ) from None


def seal(plain: str, master_key: str | None) -> str:
    return PREFIX + _fernet(master_key).encrypt(plain.encode()).decode()


def is_sealed(value: str) -> bool:
    return value.startswith(PREFIX)


def open_sealed(value: str, master_key: str | None) -> str:
    try:
        return _fernet(master_key).decrypt(value[len(PREFIX) :].encode()).decode()
    except InvalidToken:
        raise SealError(
            f"cannot be decrypted with {MASTER_KEY_ENV} (another key, or a damaged value)"
        ) from None
