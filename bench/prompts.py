"""Deterministic, real-looking chat histories of a given size, for request bodies.

A 50-byte prompt flatters every proxy: whatever Tollway does in proportion to
the prompt (token estimates, fingerprints, redaction, validation) only shows
with the kilobytes users send. ``history(8)`` is a system message and
alternating user/assistant turns of prose-like text (words drawn from a
fixed vocabulary with a fixed seed: varied enough that a tokenizer or a
compressor sees text, not one repeated character), ending with a user turn,
whose JSON encoding is within a few percent of 8 KB.
"""

from __future__ import annotations

import random
from typing import Any

import orjson

_WORDS = (
    "the a an of to in for on with as by at from that this which when where how why "
    "request response model token stream gateway provider latency budget quota tenant "
    "invoice billing month hour limit window cache key header error retry timeout "
    "server client worker process queue batch table index query database migration "
    "deploy release version config value default option feature test benchmark result "
    "customer support ticket order refund shipping address payment account password "
    "summary report draft email meeting schedule project deadline review change plan "
    "please could would should might will can does did is are was were be been have has "
    "explain describe compare list show write fix check update remove add keep use make "
    "quickly carefully briefly clearly exactly roughly usually often never always again "
    "because although however therefore meanwhile instead otherwise unless until while"
).split()
_SYSTEM = (
    "You are a careful assistant for an online shop's support team. Answer in plain "
    "English, cite the order number when there is one, and never invent a policy."
)


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 18))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), f"#{rng.randint(10000, 99999)}")
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice((".", ".", ".", "?", "!"))


def _turn(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        s = _sentence(rng)
        out.append(s)
        size += len(s) + 1
    return " ".join(out)


def history(kb: float, seed: int = 12) -> list[dict[str, Any]]:
    """Messages whose JSON encoding is about ``kb`` KiB (at least the system
    message and one user turn)."""
    rng = random.Random(seed)
    target = int(kb * 1024)
    messages: list[dict[str, Any]] = [{"role": "system", "content": _SYSTEM}]
    turn = max(60, min(1500, target // 8))  # several turns at every size
    role = "user"
    while len(orjson.dumps(messages)) < target - turn or len(messages) < 2:
        messages.append({"role": role, "content": _turn(rng, turn)})
        role = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": ""})
    left = target - len(orjson.dumps(messages))
    if left > 0:  # top the last user turn up to the size
        messages[-1]["content"] = (messages[-1]["content"] + " " + _turn(rng, left))[
            : len(messages[-1]["content"]) + left
        ].strip()
    return messages


if __name__ == "__main__":
    for kb in (0.5, 8, 32):
        msgs = history(kb)
        print(kb, len(orjson.dumps(msgs)), len(msgs), msgs[-1]["content"][:80])
