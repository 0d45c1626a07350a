"""One text as the detectors see it: the costly looks computed once, shared.

Python's ``re`` has no fast skip for a pattern that starts with a
look-behind or ``\\b``: it tries the whole pattern at every position, which
cost the number detectors 12-17 µs per KB each. So the detectors search
only where a match can be. On ASCII text, one ``bytes.translate`` maps every
digit to ``0`` and every capital to ``A`` (the text's *shape*), and
``bytes.find`` (C speed) finds the places: runs of digits for the number
detectors, ``AA00`` for IBANs. Each detector then runs its own, unchanged
pattern on those windows only, with the look-arounds seeing the real text
around them, so it finds exactly what a scan of the whole text finds
(``tests/test_guardrails_speed.py`` checks that on random texts).
"""

from __future__ import annotations

import re
import unicodedata

Span = tuple[int, int]

# A run of digits with at most two separators between neighbours: every card,
# SSN, phone number and IPv4 address lies in one run (plus a leading + or ().
RUN = re.compile(r"\d(?:[ ()./+-]{0,2}\d)*")
LONG_RUN = re.compile(r"\d(?:[ ()./+-]{0,2}\d){3,}")
MIN_DIGITS = 4  # the fewest digits any number detector accepts (1.2.3.4)
_SHAPE = bytes.maketrans(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"0" * 10 + b"A" * 26)

Window = tuple[int, int, int]  # a run of digits: start, end, how many digits it holds
DIGIT = "0-9"  # the gate of detectors whose every match holds a digit (any digit)
RUNS = "0000"  # the gate of detectors that match only inside a run of digits (``runs``)

# Zero-width and other invisible format characters that render as nothing.
INVISIBLE = frozenset(
    "\u00ad\u034f\u061c\u115f\u1160\u180e\u200b\u200c\u200d\u200e\u200f"
    "\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064\ufeff"
)
_ASCII_RUN = re.compile(r"[\x00-\x7f]+")


def fold(text: str) -> tuple[str, list[int] | None]:
    """Blocklists' view of a text (NFKC, case folded, invisible characters
    dropped) and, per folded character, its index in ``text`` (None when
    they are the same: ASCII text folds to its lower case). Each character
    folds on its own; runs of ASCII fold in one go."""
    if text.isascii():
        return text.lower(), None
    out: list[str] = []
    where: list[int] = []
    pos = 0
    for m in _ASCII_RUN.finditer(text):
        _fold_chars(text, pos, m.start(), out, where)
        out.append(m.group().lower())
        where.extend(range(m.start(), m.end()))
        pos = m.end()
    _fold_chars(text, pos, len(text), out, where)
    return "".join(out), where


def _fold_chars(text: str, start: int, end: int, out: list[str], where: list[int]) -> None:
    for i in range(start, end):
        ch = text[i]
        if ch in INVISIBLE:
            continue
        folded = unicodedata.normalize("NFKC", ch).casefold()
        out.append(folded)
        where.extend([i] * len(folded))


class View:
    """``text`` plus what several detectors need from it, each computed once."""

    __slots__ = ("_folded", "_runs", "_shape", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._shape: bytes | None = None
        self._runs: list[Window] | None = None
        self._folded: tuple[str, list[int] | None] | None = None

    def has_digit(self) -> bool:
        shape = self.shape()
        return shape is None or b"0" in shape

    def shape(self) -> bytes | None:
        """ASCII text with digits as ``0`` and capitals as ``A`` (None: not ASCII)."""
        if self._shape is None and self.text.isascii():
            self._shape = self.text.encode("ascii").translate(_SHAPE)
        return self._shape

    def runs(self) -> list[Window]:
        """The maximal runs of digits (``RUN``) holding at least ``MIN_DIGITS``
        digits, each with its count of digits (a detector skips the runs too
        short for any match it would accept)."""
        if self._runs is None:
            self._runs = self._find_runs()
        return self._runs

    def _find_runs(self) -> list[Window]:
        text, shape = self.text, self.shape()
        if shape is None:
            return [
                (m.start(), m.end(), sum(c.isdigit() for c in m.group()))
                for m in LONG_RUN.finditer(text)
            ]
        out: list[Window] = []
        pos = 0
        while (i := shape.find(b"0", pos)) >= 0:
            m = RUN.match(text, i)
            assert m is not None  # text[i] is a digit
            pos = m.end()
            if pos - i >= MIN_DIGITS and (n := shape.count(b"0", i, pos)) >= MIN_DIGITS:
                out.append((i, pos, n))
        return out

    def folded(self) -> tuple[str, list[int] | None]:
        """``fold`` of the text, shared by every blocklist of a policy."""
        if self._folded is None:
            self._folded = fold(self.text)
        return self._folded
