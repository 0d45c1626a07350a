"""Blocklists: terms and regexes an admin names, matched on folded text.

Text is folded before matching (``view.fold``: Unicode NFKC, case folding,
and the removal of invisible characters), so full-width letters, ligatures,
odd case and zero-width joiners inside a word do not slip a term past the
list. Matches are mapped back to the original text, so redaction replaces
what was sent.

A term's pattern starts with a look-behind (whole words only), which
Python's ``re`` would try at every position; so each term is looked for
with ``str.find`` on its first word (C speed) and its pattern is run only
where that word is.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from proxy.stages.guardrails.view import Span, View, fold

Term = tuple[str, re.Pattern[str]]  # its first word (folded), its whole-word pattern
# Above this many terms, one combined pattern (one pass, ~14 µs/KB whatever
# the count) beats a ``str.find`` per term (~0.5 µs/KB each).
MANY_TERMS = 24


def fold_term(term: str) -> str:
    return fold(term)[0]


@dataclass(frozen=True, slots=True)
class Blocklist:
    """Matches any of its terms (whole words) or regexes in folded text."""

    name: str
    terms: tuple[Term, ...]
    regex: re.Pattern[str] | None
    longest: int  # characters of the longest term, for the stream hold-back
    category: str = "blocklist"
    label: str = "BLOCKED"

    def find(self, text: str, view: View | None = None) -> list[Span]:
        folded, where = (view or View(text)).folded()
        if self.regex is None:
            # Terms only (the common case): no generator unless a first word is there.
            for word, _ in self.terms:
                if word in folded:
                    break
            else:
                return []
        if where is None:
            return list(self._spans(folded))
        return [(where[start], where[end - 1] + 1) for start, end in self._spans(folded)]

    def _spans(self, folded: str) -> Iterator[Span]:
        for word, pattern in self.terms:
            pos = 0
            while (i := folded.find(word, pos)) >= 0:
                m = pattern.match(folded, i)
                if m is None:
                    pos = i + 1
                else:
                    pos = m.end()
                    yield m.span()
        if self.regex is not None:
            for m in self.regex.finditer(folded):
                if m.start() != m.end():
                    yield m.span()


def build(name: str, terms: Sequence[str], regexes: Sequence[str]) -> Blocklist:
    """``terms`` match as whole words (spaces inside a term match any run of
    whitespace); ``regexes`` are Python regexes run on the folded text."""
    compiled: list[Term] = []
    for term in terms:
        words = fold_term(term).split()
        if words:
            body = r"\s+".join(re.escape(w) for w in words)
            compiled.append((words[0], re.compile(rf"(?<!\w){body}(?!\w)")))
    parts = [f"(?:{r})" for r in regexes]
    if len(compiled) > MANY_TERMS:
        parts[:0] = [p.pattern for _, p in compiled]
        compiled = []
    regex = re.compile("|".join(parts)) if parts else None
    longest = max((len(t) for t in (*terms, *regexes)), default=0)
    return Blocklist(name, tuple(compiled), regex, longest)
