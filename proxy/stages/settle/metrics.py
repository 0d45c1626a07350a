"""Prometheus metrics (aioprometheus) at ``GET /metrics``: what each
request and event adds; names in deploy/METRICS.md.

Counters and histograms are fed by the settle stage (``observe``: one call
per ``UsageRecord``) and by the events below; the families themselves and
the gauges read when scraped (``collect``) are ``metric_families``'. Labels
are bounded by the config, never by what a client sends: ``model`` is a
model name or glob from the YAML (``""`` when the request named none of
them), ``provider`` a provider name, ``status`` an HTTP status,
``endpoint`` one of the routes. No key, tenant or prompt is ever a label.

Several workers (``tollway serve --workers N``) share one port, so one
scrape reaches one worker; ``proxy.web.metrics_share`` makes every worker answer
for the whole instance.
"""

from __future__ import annotations

import logging
from decimal import Decimal

from aioprometheus import Counter, Histogram
from aioprometheus import histogram as hist

from proxy.config.model import Config
from proxy.config.reader import glob_match
from proxy.core.pricing import cost_of
from proxy.core.prometheus import text as text  # the /metrics page, imported from here too
from proxy.core.record import AttemptRecord, UsageRecord
from proxy.stages.settle.metric_families import Families

ENDPOINTS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "moderations": "/v1/moderations",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
}
_STREAM_FAILURES = {"upstream_timeout": "timeout", "upstream_stream_broken": "protocol"}
_MAX_TARGETS = 1024
_MAX_WARNED = 1024  # unpriced models warned about, per process
log = logging.getLogger("tollway.prices")
Labels = tuple[tuple[str, str], ...]


class Metrics(Families):
    """One per process, as app state: the families (``Families``) and what
    requests and events add to them."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self._warned: set[tuple[str, str]] = set()
        self._models: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {}
        self.targets: dict[str, None] = {}  # target keys seen, for the breaker gauge
        # The request path only adds to these dicts (about 1 µs, against some
        # 10 µs per aioprometheus call); ``flush`` hands them over before a
        # scrape or a publish, or when many observations are waiting.
        self._counts: dict[tuple[str, Labels], float] = {}  # by collector name
        self._observed: dict[tuple[str, Labels], list[float]] = {}
        self._counters = {c.name: c for c in r.get_all() if isinstance(c, Counter)}
        self._histograms = {c.name: c for c in r.get_all() if isinstance(c, Histogram)}
        self._waiting = 0

    def budget_alert(self, scope: str, span: str, threshold: int) -> None:
        labels = (("scope", scope), ("span", span), ("threshold", str(threshold)))
        self._add(self.budget_alerts, labels)

    def webhook_attempt(self, outcome: str, seconds: float) -> None:
        """One delivery attempt (``proxy.stages.settle.webhook_delivery``)."""
        self._add(self.webhook_deliveries, (("outcome", outcome),))
        self._observe(self.webhook_seconds, (), seconds)

    def _add(self, counter: Counter, labels: Labels, n: float = 1) -> None:
        key = (counter.name, labels)
        self._counts[key] = self._counts.get(key, 0) + n

    def _observe(self, histogram: Histogram, labels: Labels, value: float) -> None:
        self._observed.setdefault((histogram.name, labels), []).append(value)
        self._waiting += 1
        if self._waiting >= 10_000:  # nobody scrapes: keep memory bounded
            self.flush()

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for (name, labels), n in counts.items():
            self._counters[name].add(dict(labels), n)
        observed, self._observed, self._waiting = self._observed, {}, 0
        for (name, labels), values in observed.items():
            histogram, as_dict = self._histograms[name], dict(labels)
            histogram.observe(as_dict, values[0])  # creates the series if new
            series = histogram.get_value(as_dict)
            assert isinstance(series, hist.Histogram)
            for v in values[1:]:
                series.observe(v)

    def settle(self, record: UsageRecord) -> None:
        self.observe(record, cost_of(record))

    def observe(self, record: UsageRecord, cost: Decimal | None) -> None:
        model = self.model_label(record.config, record.public_model)
        # Tokens and cost are labelled by the model that served them too:
        # a fallback's tokens are the fallback's (its config name, bounded).
        served = model
        if record.served_model is not None and record.served_model != record.public_model:
            served = self.model_label(record.config, record.served_model)
        endpoint = ENDPOINTS.get(record.api, record.api)
        status, provider = str(record.status), record.provider or ""
        self._add(
            self.requests,
            (("endpoint", endpoint), ("model", model), ("provider", provider), ("status", status)),
        )
        self._observe(
            self.duration, (("endpoint", endpoint), ("model", model)), record.latency_ms / 1000
        )
        if record.stream and record.ttft_ms is not None:
            self._observe(self.ttft, (("model", model),), record.ttft_ms / 1000)
        usage = record.usage
        if usage.source != "none":
            source = ("source", usage.source)
            for kind, n in (
                ("prompt", usage.prompt_tokens),
                ("completion", usage.completion_tokens),
            ):
                self._add(
                    self.tokens,
                    (("model", model), ("served_model", served), ("type", kind), source),
                    n,
                )
        if cost is None:
            self._unpriced(record, served)
        elif cost > 0:
            self._add(self.cost, (("model", model), ("served_model", served)), float(cost))
        cache = record.cache or ("hit" if record.cached else "")
        if cache in ("hit", "miss"):
            self._add(self.cache, (("result", cache),))
        if record.status == 429 and record.reason:
            refused = self.quota if record.error_code == "insufficient_quota" else self.ratelimited
            self._add(refused, (("reason", record.reason),))
        if record.attempt_log:
            self._attempts(record, model)
        verdicts = record.extra.get("guardrails")
        if verdicts:
            self._guardrails(verdicts)  # type: ignore[arg-type]
        semantic = record.extra.get("semantic_cache")
        if isinstance(semantic, dict):
            self._semantic(semantic)

    def _semantic(self, facts: dict[str, object]) -> None:
        """What the semantic-cache stage left on the record (``proxy.stages.semcache``)."""
        self._add(self.semantic, (("result", str(facts.get("result"))),))
        for histogram, key in ((self.similarity, "similarity"), (self.embedding, "embed_s")):
            value = facts.get(key)
            if isinstance(value, int | float):
                self._observe(histogram, (), float(value))
        saved = facts.get("saved_usd")
        if isinstance(saved, int | float) and saved > 0:
            self._add(self.saved, (), float(saved))

    def _guardrails(self, verdicts: list[dict[str, object]]) -> None:
        for v in verdicts:
            labels = tuple((k, str(v[k])) for k in ("action", "direction", "guardrail"))
            self._add(self.guardrails, labels, float(v["count"]))  # type: ignore[arg-type]

    def _unpriced(self, record: UsageRecord, served: str) -> None:
        self._add(self.unpriced, (("served_model", served), ("provider", record.provider or "")))
        name = (record.provider or "", record.provider_model or record.served_model or "")
        if name not in self._warned and len(self._warned) < _MAX_WARNED:
            self._warned.add(name)
            log.warning(
                "no price for model %r (provider %r, public model %r): its usage is recorded "
                "with cost NULL; add it to prices: in the config",
                name[1],
                name[0],
                record.served_model or record.public_model,
            )

    def _attempts(self, record: UsageRecord, model: str) -> None:
        log = record.attempt_log
        if len(log) == 1 and record.error_code is None:
            # One attempt that answered (any status it sent as is): no retry,
            # no fallback, no mid-stream failure; its error kind, if any.
            (attempt,) = log
            self._remember(f"{attempt.provider}/{attempt.model}")
            if attempt.status >= 400 or attempt.error_code is not None:
                kind = error_kind(attempt)
                if kind is not None:
                    self._add(
                        self.upstream_errors, (("provider", attempt.provider), ("kind", kind))
                    )
            return
        tried: set[tuple[str, str]] = set()
        for attempt in record.attempt_log:
            target = (attempt.provider, attempt.model)
            if target in tried:
                self._add(self.retries, (("provider", attempt.provider),))
            tried.add(target)
            self._remember(f"{attempt.provider}/{attempt.model}")
            kind = error_kind(attempt)
            if kind is not None:
                self._add(self.upstream_errors, (("provider", attempt.provider), ("kind", kind)))
        last = log[-1]
        broke = _STREAM_FAILURES.get(record.error_code or "")
        if last.status == 200 and broke is not None:  # failed mid-stream, after forward
            self._add(self.upstream_errors, (("provider", last.provider), ("kind", broke)))
        if record.status < 400 and (last.provider, last.model) != (log[0].provider, log[0].model):
            self._add(self.fallbacks, (("model", model),))

    def _remember(self, key: str) -> None:
        if key not in self.targets and len(self.targets) < _MAX_TARGETS:
            self.targets[key] = None

    def model_label(self, config: Config | None, name: str | None) -> str:
        """The config's name for ``name``: itself when listed, its glob when
        a pattern serves it, else ``""`` (a client's typo is no new series)."""
        if config is None or not name:
            return ""
        known = self._models.get(config.version)
        if known is None:
            exact = frozenset(
                n for m in config.models if not m.is_pattern for n in (m.name, *m.aliases)
            )
            patterns = tuple(m.name for m in config.models if m.is_pattern)
            if len(self._models) > 8:
                self._models.clear()
            known = self._models[config.version] = (exact, patterns)
        if name in known[0]:
            return name
        return next((p for p in known[1] if glob_match(p, name)), "")

    def reloaded(self, ok: bool) -> None:
        self.reloads.inc({"result": "success" if ok else "failure"})

    def batch_line(self, result: str) -> None:
        self._add(self.batch_lines, (("result", result),))


def error_kind(attempt: AttemptRecord) -> str | None:
    """What went wrong with one provider call, or None when nothing did."""
    status, code = attempt.status, attempt.error_code
    if status == 499 or (status < 400 and code is None):
        return None  # succeeded, or abandoned by the client
    if not attempt.reached:
        return "connect"
    if code in _STREAM_FAILURES:
        return _STREAM_FAILURES[code]
    if status == 429:
        return "status_429"
    if code in ("upstream_unavailable", "bad_gateway"):
        return "unavailable"
    return "status_5xx" if status >= 500 else "status_4xx"
