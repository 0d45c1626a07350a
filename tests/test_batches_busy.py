"""How a batch process knows its HTTP workers are serving: from their
published metrics (``tollway_inflight_requests``, ``tollway_requests_total``)
in the shared metrics directory. Requests that come and go between two
publishes still count: the answered total moved."""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson
import pytest

from proxy.web import batches_setup
from proxy.web.metrics_share import STALE_S, MetricsShare


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _publish(directory: Path, inflight: float, answered: float, age_s: float = 0.0) -> None:
    """An HTTP worker's published state, ``age_s`` old (the parent process
    stands in for the worker: alive)."""
    pid = os.getppid()
    metrics = {
        "tollway_inflight_requests": [[{}, inflight]],
        "tollway_requests_total": [[{"endpoint": "chat", "status": "200"}, answered]],
    }
    (directory / f"worker-{pid}.json").write_bytes(
        orjson.dumps({"pid": pid, "at": time.time() - age_s, "metrics": metrics})
    )


def test_busy_while_requests_are_in_flight_or_were_answered_lately(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(batches_setup.time, "monotonic", clock)
    _publish(tmp_path, inflight=0, answered=100)
    busy = batches_setup._http_busy(MetricsShare(tmp_path))
    assert not busy()  # the first look only learns the total
    clock.now += batches_setup.BUSY_LOOK_S
    assert not busy()  # unchanged: idle

    _publish(tmp_path, inflight=0, answered=140)  # 40 answered between publishes
    clock.now += batches_setup.BUSY_LOOK_S
    assert busy()
    clock.now += 0.1
    _publish(tmp_path, inflight=0, answered=150)
    assert busy()  # read once per BUSY_LOOK_S: the same answer meanwhile

    # The total stops moving: still busy for BUSY_HOLD_S, then not.
    clock.now += batches_setup.BUSY_LOOK_S
    assert busy()
    clock.now += batches_setup.BUSY_HOLD_S
    assert not busy()

    _publish(tmp_path, inflight=3, answered=150)  # long requests, none answered
    clock.now += batches_setup.BUSY_LOOK_S
    assert busy()


def test_a_worker_that_stopped_publishing_counts_as_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its traffic is unknown (its publisher is stuck or failing): the lines
    yield rather than take it for an idle worker."""
    clock = Clock()
    monkeypatch.setattr(batches_setup.time, "monotonic", clock)
    _publish(tmp_path, inflight=0, answered=100)
    busy = batches_setup._http_busy(MetricsShare(tmp_path))
    assert not busy()
    _publish(tmp_path, inflight=0, answered=100, age_s=STALE_S + 1)
    clock.now += batches_setup.BUSY_LOOK_S
    assert busy()
