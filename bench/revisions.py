"""A git revision's files on disk, and a child's instructions under callgrind:
what the in-process counters (``admission.py``, ``settle_side.py``) and the
gateway benchmarks (``run.py``, ``instructions.py``) share."""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export(rev: str, dest: Path, paths: tuple[str, ...] = ("proxy", "sql")) -> Path:
    """``paths`` as of ``rev`` (read-only git) into ``dest``, so that a run
    measures one commit even while others are editing the shared working tree."""
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, *paths], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest, filter="data")
    return dest


def instructions(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Instructions ``argv`` ran under ``valgrind --tool=callgrind`` (its
    "Collected" total; the profile itself is not kept)."""
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    assert found is not None, done.stderr[-2000:]
    return int(found.group(1))
