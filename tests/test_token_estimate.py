"""The admission estimate (``tokens.estimate_prompt``) against tiktoken.

Admission reserves quota and tokens-per-minute from a size-based estimate so
that nothing proportional to the prompt runs on the event loop; the README's
overshoot bound rests on the estimate never being below tiktoken's count on
realistic text. This checks that on a corpus of every script users send
(prose, code, JSON, CJK, Hindi, Arabic, Cyrillic, emoji), alone and as chat
histories, and that the estimate stays within its documented ceiling.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.core import tokens

CORPUS = sorted((Path(__file__).parent / "data" / "token_corpus").glob("*.txt"))
MODEL = "gpt-4o-mini"
# The docstring's ceiling: at most ~2x above tiktoken on natural text, 2.3x on the bench word list.
MAX_OVER = 2.3


def _texts() -> list[tuple[str, str]]:
    out = []
    for path in CORPUS:
        text = path.read_text(encoding="utf-8")
        out.append((path.name, text))
        out += [(f"{path.name}:{i}", line) for i, line in enumerate(text.splitlines()) if line]
    return out


def test_corpus_covers_the_scripts() -> None:
    names = {p.name.split(".")[0] for p in CORPUS}
    assert {"english", "code", "json", "chinese", "hindi", "arabic", "russian"} <= names


@pytest.mark.parametrize(("name", "text"), _texts(), ids=lambda v: str(v)[:24])
def test_estimate_is_never_below_tiktoken(name: str, text: str) -> None:
    exact = tokens.count_text(text, MODEL)
    estimate = tokens.estimate_text(text)
    assert estimate >= exact, f"{name}: estimate {estimate} < tiktoken {exact}"
    if exact >= 50:  # short lines are dominated by the +1 rounding
        assert estimate <= MAX_OVER * exact, f"{name}: {estimate} vs {exact}"


def _history(texts: list[str]) -> list[dict[str, Any]]:
    roles = ("system", "user", "assistant")
    return [{"role": roles[min(i, 1 + i % 2)], "content": t} for i, t in enumerate(texts)]


def test_chat_histories_of_every_script() -> None:
    texts = [p.read_text(encoding="utf-8") for p in CORPUS]
    for start in range(len(texts)):
        messages = _history(texts[start:] + texts[:start])
        body = {"messages": messages}
        exact = tokens.count_prompt(body, "chat", MODEL)
        estimate = tokens.estimate_prompt(body, "chat")
        assert exact <= estimate <= MAX_OVER * exact


def test_bench_histories() -> None:
    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    try:
        import prompts  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    for kb in (0.5, 8, 32):
        body = {"messages": prompts.history(kb)}
        exact = tokens.count_prompt(body, "chat", MODEL)
        assert exact <= tokens.estimate_prompt(body, "chat") <= MAX_OVER * exact


def test_multipart_tools_and_names() -> None:
    body = {
        "messages": [
            {"role": "user", "name": "maria", "content": [{"type": "text", "text": "Héllo 世界"}]},
            {
                "role": "assistant",
                "tool_calls": [{"function": {"name": "lookup", "arguments": '{"id": 42}'}}],
            },
        ]
    }
    assert tokens.estimate_prompt(body, "chat") >= tokens.count_prompt(body, "chat", MODEL)


def test_other_endpoints() -> None:
    text = (CORPUS[0]).read_text(encoding="utf-8")
    for endpoint, key in (("completions", "prompt"), ("embeddings", "input")):
        for value in (text, [text, text]):
            body = {key: value}
            exact = tokens.count_prompt(body, endpoint, MODEL)
            assert exact <= tokens.estimate_prompt(body, endpoint)
        assert tokens.estimate_prompt({key: [1, 2, 3]}, endpoint) == 3  # token ids


def test_crafted_text_is_within_the_hard_bound() -> None:
    """A token is at least one byte, so even text denser than the corpus is
    never above 2.5x the estimate (an undercount of at most 1.5x it)."""
    for text in ("1234567890" * 300, "aGVsbG8gd29ybGQ=" * 200, "🎉" * 500, "x y " * 1000):
        assert tokens.count_text(text, MODEL) <= 2.5 * tokens.estimate_text(text)


def test_cost_is_per_string_for_ascii() -> None:
    """ASCII text is sized with ``len``: no pass over its bytes."""
    big = {"messages": [{"role": "user", "content": "word " * 200_000}]}  # 1 MB
    assert tokens.estimate_prompt(big, "chat") == 3 + 3 + 1 + 1 + int(1_000_000 / 2.5) + 1


def _plain_reference(messages: list[Any]) -> int | None:
    """``_plain_history``'s documented answer, spelled out field by field."""
    if not messages or not all(
        isinstance(m, dict)
        and set(m) == {"role", "content"}
        and all(isinstance(v, str) and v.isascii() for v in m.values())
        for m in messages
    ):
        return None
    roles = sum(len(m["role"]) for m in messages)
    contents = sum(len(m["content"]) for m in messages)
    return 3 + 5 * len(messages) + 2 * roles // 5 + 2 * contents // 5


def test_short_and_long_histories_take_the_same_shortcut() -> None:
    """A short history is sized in a Python loop, a long one in C-level
    passes: both answer the documented sum, and both leave every other
    shape (a name, tools, multi-part, non-ASCII, null, not a dict) to the
    field loop, wherever in the history it is."""
    plain = {"role": "user", "content": "What is the order status of 42?"}
    odd: list[Any] = [
        {"role": "user", "name": "maria", "content": "hi"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "user", "content": None},
        {"role": "user", "content": "Héllo"},
        {"role": "assistant", "tool_calls": []},
        {"content": "no role"},
        {"role": "user"},
        ["role", "content"],
        "ab",
        7,
    ]
    for size in (1, 3, tokens._SHORT_HISTORY, tokens._SHORT_HISTORY + 1, 30):
        history = [dict(plain, content=plain["content"] * (i + 1)) for i in range(size)]
        assert tokens._plain_history(history) == _plain_reference(history) is not None
        for shape in odd:
            for at in (0, size // 2, size):
                mixed = [*history[:at], shape, *history[at:]]
                assert tokens._plain_history(mixed) is None
                want = tokens.estimate_messages(mixed)  # the field loop's count
                assert tokens.estimate_prompt({"messages": mixed}, "chat") == want
    assert tokens._plain_history([]) is None
