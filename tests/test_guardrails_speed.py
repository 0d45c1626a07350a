"""The fast paths of the detectors (``view``: windows around digit runs, IBAN
starts, ``@`` and hints; blocklist terms found with ``str.find``) find exactly
what their unchanged patterns find over the whole text, on random texts
built from the characters and pieces the patterns care about."""

from __future__ import annotations

import random

import pytest

from proxy.stages.guardrails.blocklist import build
from proxy.stages.guardrails.detectors import BUILTIN, Detector
from proxy.stages.guardrails.view import fold

PIECES = [
    "4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "123-45-6789",
    "+44 20 7946 0958", "+1 (415) 555-0132", "(415) 555-0132", "415-555-0132", "415.555.0132",
    "020 7946 0958", "030/1234567", "10.0.12.7", "1.2.3.4", "GB82 WEST 1234 5698 7654 32",
    "DE89370400440532013000", "2001:db8:85a3::8a2e:370:7334", "::ffff:1.2.3.4",
    "jane.doe@example.com", "a@b.co", "x@y", "sk-ant-api03-Zx8yWv7uTs6rQp5oNm4lKj3",
    "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv", "AKIAIOSFODNN7EXAMPLE", "tw-AbCdEfGhIjKlMnOpQrStUvWx",
    "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY", "ghp_1234567890abcdefghijABCDEFGHIJ123456",
    "xoxb-123456789012-abcdefghijkl", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNry",
    "zorblax", "project falcon", "\uff5a\uff4f\uff52\u200b\uff42\uff4c\uff41\uff58",
    "PROJECT\u00a0FALCON", "é", "٣",
]  # fmt: skip
CHARS = "0123456789     ..--()/+@:_abzAZKIS#x\n\u200b"


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 12)):
        if rng.random() < 0.4:
            parts.append(rng.choice(PIECES))
        else:
            parts.append("".join(rng.choice(CHARS) for _ in range(rng.randint(0, 8))))
    return "".join(parts)


def reference(d: Detector, text: str) -> list[tuple[int, int]]:
    return [
        m.span() for m in d.pattern.finditer(text) if d.validator is None or d.validator(m.group())
    ]


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_a_detector_finds_what_its_pattern_finds_over_the_whole_text(name: str) -> None:
    d = BUILTIN[name]
    rng = random.Random(name)
    for _ in range(3000):
        text = random_text(rng)
        assert d.find(text) == reference(d, text), text


def test_a_blocklist_finds_every_whole_word_occurrence_of_its_terms() -> None:
    terms = ["zorblax", "project falcon", "falcon", "a b"]
    blocklist = build("t", terms, [])
    rng = random.Random(7)
    for _ in range(3000):
        text = random_text(rng)
        folded, where = fold(text)
        spans = sorted(blocklist.find(text))
        for term in terms:  # every occurrence the old combined pattern would see is found
            pattern = build("one", [term], []).terms[0][1]
            for m in pattern.finditer(folded):
                a, b = m.span()
                span = (a, b) if where is None else (where[a], where[b - 1] + 1)
                assert span in spans, (text, term)
