"""The embedded key secret: made once, the same for every worker."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from proxy.stores import apikeys


def test_workers_starting_together_share_one_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve --workers N` starts N processes that each load the secret from
    the same data dir at once: none may fail, and all must get the same one."""
    monkeypatch.delenv("TOLLWAY_KEY_SECRET", raising=False)
    for round_ in range(30):
        data_dir = tmp_path / f"round-{round_}"
        data_dir.mkdir()
        start = threading.Barrier(8)

        def load(dir_: Path = data_dir, gate: threading.Barrier = start) -> bytes:
            gate.wait()
            return apikeys.load_secret(dir_)

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda _: load(), range(8)))
        assert len(set(got)) == 1 and len(got[0]) >= 48
        assert (data_dir / "key_secret").stat().st_mode & 0o777 == 0o600
        assert [p.name for p in data_dir.iterdir()] == ["key_secret"]  # no temp left over
