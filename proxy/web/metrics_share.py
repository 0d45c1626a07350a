"""Several workers, one port, one answer: every worker's ``/metrics`` speaks
for the whole instance.

With ``SO_REUSEPORT`` the kernel hands each scrape to one worker, and the
metrics contract has no ``worker`` label (deploy/METRICS.md, the Grafana
dashboard). So each worker publishes its series to a file in a directory
the supervisor creates for this instance (``TOLLWAY_METRICS_DIR``), every
second and at exit, written atomically (temp file + rename). A scrape merges
its own live series with the other workers' files:

- counters and histograms add up over every file, a dead worker's included,
  so the instance's totals never go down when the supervisor replaces a
  crashed worker (its counts stay, the new worker's add to them);
- gauges count only for workers still alive (in-flight requests of a dead
  worker are not in flight), and combine by sum, or by max where a sum means
  nothing (breaker state, config version, settlement lag).

Other workers' numbers are at most one publish interval old. A new instance
(supervisor start) gets a fresh directory: a counter reset, which Prometheus
handles as for any restart.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aioprometheus import Counter, Gauge, Histogram, Registry
from aioprometheus import histogram as hist

from proxy.stages.settle.metric_families import GAUGE_MERGE
from proxy.stages.settle.metrics import Metrics

ENV = "TOLLWAY_METRICS_DIR"
PUBLISH_INTERVAL = 1.0
STALE_S = 3 * PUBLISH_INTERVAL  # a live worker silent this long: its numbers are unknown
_KEY = orjson.OPT_SORT_KEYS


def state(metrics: Metrics) -> dict[str, Any]:
    """The worker's series as JSON-able data: {name: [[labels, value], ...]}."""
    out: dict[str, Any] = {}
    for c in metrics.collectors():
        series = []
        for labels, value in c.get_all():
            if isinstance(c, Histogram):
                h = c.get_value(labels)
                assert isinstance(h, hist.Histogram)
                value = [list(h.buckets.values()), h.sum, h.observations]
            series.append([labels, value])
        out[c.name] = series
    return {"pid": os.getpid(), "at": time.time(), "metrics": out}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MetricsShare:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / f"worker-{os.getpid()}.json"

    def publish(self, metrics: Metrics) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(state(metrics)))
        os.replace(tmp, self.path)

    def _others(self) -> list[dict[str, Any]]:
        states = []
        for path in sorted(self.dir.glob("worker-*.json")):
            if path == self.path:
                continue
            with contextlib.suppress(OSError, orjson.JSONDecodeError):
                states.append(orjson.loads(path.read_bytes()))
        return states

    def traffic_elsewhere(self) -> tuple[float, float]:
        """Requests the instance's other live workers had in flight, and had
        answered in all, at their last publish: how a batch process knows
        interactive traffic is on (in flight alone misses fast requests
        that come and go between two publishes). A live worker that has not
        published for ``STALE_S`` counts as one request in flight: its
        traffic is unknown, and a batch process should not take it as none."""
        inflight = answered = 0.0
        now = time.time()
        for st in self._others():
            if alive(int(st.get("pid", 0))):
                if now - float(st.get("at", now)) > STALE_S:
                    inflight += 1
                series = st["metrics"]
                inflight += sum(float(v) for _, v in series.get("tollway_inflight_requests", ()))
                answered += sum(float(v) for _, v in series.get("tollway_requests_total", ()))
        return inflight, answered

    def merged(self, metrics: Metrics) -> Registry:
        """A registry holding the instance's series (this worker's are live)."""
        own = state(metrics)
        states = [(own, True)] + [(s, alive(int(s.get("pid", 0)))) for s in self._others()]
        registry = Registry()
        for c in metrics.collectors():
            series: dict[bytes, list[Any]] = {}
            gauge = isinstance(c, Gauge)
            combine: Callable[[Any, Any], Any] = GAUGE_MERGE.get(c.name, _add)
            for st, live in states:
                if gauge and not live:
                    continue
                for labels, value in st["metrics"].get(c.name, ()):
                    key = orjson.dumps(labels, option=_KEY)
                    if key in series:
                        series[key][1] = combine(series[key][1], value)
                    else:
                        series[key] = [labels, value]
            _fill(c, registry, series.values())
        return registry


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, list):  # a histogram: [bucket counts], sum, count
        return [[x + y for x, y in zip(a[0], b[0], strict=True)], a[1] + b[1], a[2] + b[2]]
    return a + b


def _fill(template: Counter | Gauge | Histogram, registry: Registry, series: Any) -> None:
    if isinstance(template, Histogram):
        out = Histogram(
            template.name, template.doc, registry=registry, buckets=template.upper_bounds
        )
        for labels, (counts, total, n) in series:
            h = hist.Histogram(*template.upper_bounds)
            h.buckets = dict(zip(h.buckets, counts, strict=True))
            h.sum, h.observations = total, n
            out.set_value(labels, h)
        return
    cls = Counter if isinstance(template, Counter) else Gauge
    target = cls(template.name, template.doc, registry=registry)
    for labels, value in series:
        target.set(labels, value)
