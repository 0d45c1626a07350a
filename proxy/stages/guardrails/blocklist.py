"""Blocklists: terms and regexes an admin names, matched on folded text.

Text is folded before matching (Unicode NFKC, case folding, and the removal
of invisible characters), so full-width letters, ligatures, odd case and
zero-width joiners inside a word do not slip a term past the list. Matches
are mapped back to the original text, so redaction replaces what was sent.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from proxy.stages.guardrails.detectors import Span

# Zero-width and other invisible format characters that render as nothing.
INVISIBLE = frozenset(
    "\u00ad\u034f\u061c\u115f\u1160\u180e\u200b\u200c\u200d\u200e\u200f"
    "\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064\ufeff"
)


def fold(text: str) -> tuple[str, list[int] | None]:
    """The folded text and, per folded character, its index in ``text``
    (None when they are the same: ASCII text folds to its lower case)."""
    if text.isascii():
        return text.lower(), None
    out: list[str] = []
    where: list[int] = []
    for i, ch in enumerate(text):
        if ch in INVISIBLE:
            continue
        folded = unicodedata.normalize("NFKC", ch).casefold() if not ch.isascii() else ch.lower()
        out.append(folded)
        where.extend([i] * len(folded))
    return "".join(out), where


def fold_term(term: str) -> str:
    return fold(term)[0]


@dataclass(frozen=True, slots=True)
class Blocklist:
    """Matches any of its terms (whole words) or regexes in folded text."""

    name: str
    pattern: re.Pattern[str]
    longest: int  # characters of the longest term, for the stream hold-back
    category: str = "blocklist"
    label: str = "BLOCKED"

    def find(self, text: str) -> Iterator[Span]:
        folded, where = fold(text)
        for m in self.pattern.finditer(folded):
            start, end = m.span()
            if start == end:
                continue
            if where is None:
                yield start, end
            else:
                yield where[start], where[end - 1] + 1


def build(name: str, terms: Sequence[str], regexes: Sequence[str]) -> Blocklist:
    """``terms`` match as whole words (spaces inside a term match any run of
    whitespace); ``regexes`` are Python regexes run on the folded text."""
    parts = [
        r"(?<!\w)" + r"\s+".join(re.escape(w) for w in fold_term(t).split()) + r"(?!\w)"
        for t in terms
        if t.strip()
    ]
    parts.extend(f"(?:{r})" for r in regexes)
    longest = max((len(t) for t in (*terms, *regexes)), default=0)
    return Blocklist(name, re.compile("|".join(parts) or r"(?!)"), longest)
