"""The repository stands alone: nothing in it reads a folder beside the clone.

A fresh clone has nothing next to it, so a path that climbs out of the
checkout (to the workspace's shared folder, or to an absolute path of the
machine it was written on) works here and fails for every user. CI also
clones the repository into an empty directory and runs ``make test`` there
(``.ci/run``); this test catches the mistake in seconds.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("proxy", "tests", "bench", "sql", "config", "deploy", ".ci")
SCANNED_FILES = ("Makefile", "Dockerfile", "pyproject.toml", "README.md")
# Spelled in pieces so this file does not find itself.
FORBIDDEN = ("../" + "shared", "/work" + "/", "shared/" + "bench", "shared/" + "openai")
# validate(<expression with at most one level of parentheses>, "SchemaName")
CALL = re.compile(r'validate\((?:[^()]|\([^()]*\))*?,\s*"([A-Z]\w+)"\s*,?\s*\)')
SKIP_PARTS = {".venv", "__pycache__", "out", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


def _tracked() -> list[Path]:
    """Tracked files when this is a git checkout, else every file under the scanned paths."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", *SCANNED, *SCANNED_FILES],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        listed = []
    if listed:
        return [ROOT / name for name in listed]
    found = [ROOT / name for name in SCANNED_FILES if (ROOT / name).is_file()]
    for top in SCANNED:
        found += [
            p
            for p in (ROOT / top).rglob("*")
            if p.is_file() and not SKIP_PARTS & set(p.relative_to(ROOT).parts)
        ]
    return found


def test_no_file_reaches_outside_the_checkout() -> None:
    files = _tracked()
    assert any(p.name == "Makefile" for p in files) and len(files) > 50
    offenders = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary, or deleted in the working tree
        for needle in FORBIDDEN:
            if needle in text:
                line = text[: text.index(needle)].count("\n") + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {needle}")
    assert not offenders, "files that read outside the repository:\n" + "\n".join(offenders)


def test_the_schema_subset_is_the_one_the_tests_use() -> None:
    """tests/schema.py validates against the shipped subset; every schema a test
    names is in it (make_subset.py ROOTS), so a new one fails here, not later."""
    from tests.fixtures.openai.make_subset import ROOTS
    from tests.schema import SPEC

    assert SPEC.is_relative_to(ROOT) and SPEC.is_file()
    named: set[str] = set()
    for test in (ROOT / "tests").glob("test_*.py"):
        text = test.read_text(encoding="utf-8")
        if "\nfrom tests.schema import validate\n" in text:
            named |= set(re.findall(CALL, text))
    assert named == set(ROOTS), named ^ set(ROOTS)
