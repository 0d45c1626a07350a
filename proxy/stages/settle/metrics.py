"""Prometheus metrics (aioprometheus) at ``GET /metrics``; names in deploy/METRICS.md.

Counters and histograms are fed by the settle stage (``observe``: one call
per ``UsageRecord``), gauges are read when scraped (``collect``). Labels are
bounded by the config, never by what a client sends: ``model`` is a model
name or glob from the YAML (``""`` when the request named none of them),
``provider`` a provider name, ``status`` an HTTP status, ``endpoint`` one of
three routes. No key, tenant or prompt is ever a label.

Several workers (``tollway serve --workers N``) share one port, so one
scrape reaches one worker; ``proxy.web.metrics_share`` makes every worker answer
for the whole instance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from decimal import Decimal

from aioprometheus import Counter, Gauge, Histogram, Registry
from aioprometheus import histogram as hist

from proxy.config.model import Config
from proxy.config.reader import glob_match
from proxy.core.pricing import cost_of
from proxy.core.prometheus import text as text  # the /metrics page, imported from here too
from proxy.core.record import AttemptRecord, UsageRecord

ENDPOINTS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "moderations": "/v1/moderations",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
}
INF = math.inf
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, INF)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, INF)
SIMILARITY_BUCKETS = (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 1.0, INF)
EMBEDDING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, INF)
WEBHOOK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, INF)
WEBHOOK_OUTCOMES = ("delivered", "retried", "failed")
BREAKER = {"closed": 0, "half_open": 1, "open": 2}
BUDGET_THRESHOLDS = (50, 80, 100)  # the levels sql/0005_budgets.sql announces
# How the workers' gauges combine into the instance's (counters always add up).
GAUGE_MERGE = {
    "tollway_breaker_state": max,
    "tollway_config_version_info": max,
    "tollway_settlement_lag_seconds": max,
    "tollway_redis_up": min,  # 0 when any worker is on the fallbacks
    "tollway_event_loop_lag_max_seconds": max,
    # Read from Postgres by each worker: the same fleet-wide number, not a share.
    "tollway_batch_queue_depth": max,
    "tollway_batch_oldest_pending_seconds": max,
    "tollway_webhook_deliveries_pending": max,  # every worker reads the same queue
}
_STREAM_FAILURES = {"upstream_timeout": "timeout", "upstream_stream_broken": "protocol"}
_MAX_TARGETS = 1024
_MAX_WARNED = 1024  # unpriced models warned about, per process
log = logging.getLogger("tollway.prices")
Labels = tuple[tuple[str, str], ...]


def _counter(registry: Registry, name: str, doc: str) -> Counter:
    return Counter(name, doc, registry=registry)


def _gauge(registry: Registry, name: str, doc: str) -> Gauge:
    return Gauge(name, doc, registry=registry)


def _histogram(registry: Registry, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
    return Histogram(name, doc, registry=registry, buckets=buckets)


class Metrics:
    """One per process: the registry and its collectors, as app state.

    The families are declared by concern, in the order a scrape lists them
    (the registry keeps its insertion order)."""

    def __init__(self) -> None:
        self.registry = r = Registry()
        self._declare_requests(r)
        self._declare_usage(r)
        self._declare_failures(r)
        self._declare_process(r)
        self._declare_ledger_and_batches(r)
        self._declare_redis_and_server(r)
        self._declare_guardrails_and_semantic_cache(r)
        self._declare_webhooks_and_events(r)
        self._start_at_zero()
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

    def _declare_requests(self, r: Registry) -> None:
        self.requests = _counter(r, "tollway_requests_total", "Requests answered.")
        self.duration = _histogram(
            r,
            "tollway_request_duration_seconds",
            "Request received to last byte sent.",
            DURATION_BUCKETS,
        )
        self.ttft = _histogram(
            r,
            "tollway_ttft_seconds",
            "Request received to first content chunk sent (streams).",
            TTFT_BUCKETS,
        )

    def _declare_usage(self, r: Registry) -> None:
        """What the answers used: tokens, their cost, response-cache look-ups."""
        self.tokens = _counter(r, "tollway_tokens_total", "Tokens billed.")
        self.cost = _counter(r, "tollway_cost_usd_total", "Cost of billed tokens (USD).")
        self.unpriced = _counter(
            r,
            "tollway_unpriced_requests_total",
            "Requests that used tokens of a model without a price (cost NULL).",
        )
        self.cache = _counter(r, "tollway_cache_requests_total", "Response-cache look-ups.")

    def _declare_failures(self, r: Registry) -> None:
        """Refusals, budget alerts, and the providers' failures and their cure."""
        self.ratelimited = _counter(
            r, "tollway_ratelimit_rejections_total", "429s from rate limits."
        )
        self.quota = _counter(r, "tollway_quota_rejections_total", "429s from monthly quotas.")
        self.upstream_errors = _counter(
            r, "tollway_upstream_errors_total", "Failed provider calls."
        )
        self.budget_alerts = _counter(
            r, "tollway_budget_alerts_total", "USD budgets crossing 50/80/100%."
        )
        self.retries = _counter(r, "tollway_retries_total", "Retries of a provider call.")
        self.fallbacks = _counter(
            r, "tollway_fallbacks_total", "Requests served by a fallback target."
        )
        self.breaker = _gauge(
            r, "tollway_breaker_state", "0 closed, 1 half-open, 2 open (worst target)."
        )

    def _declare_process(self, r: Registry) -> None:
        """What the worker is handling now, and its config."""
        self.inflight = _gauge(r, "tollway_inflight_requests", "Requests being handled.")
        self.streams = _gauge(r, "tollway_inflight_streams", "SSE streams open to clients.")
        self.reloads = _counter(r, "tollway_config_reload_total", "Config reload attempts.")
        self.version = _gauge(r, "tollway_config_version_info", "The live config's version hash.")

    def _declare_ledger_and_batches(self, r: Registry) -> None:
        self.spool = _gauge(r, "tollway_billing_spool_depth", "Usage events waiting for Postgres.")
        self.lag = _gauge(
            r, "tollway_settlement_lag_seconds", "Age of the oldest unsettled usage event."
        )
        self.dead_letters = _counter(
            r,
            "tollway_billing_dead_letter_total",
            "Usage rows Postgres refused for their content, kept in dead-letter.jsonl.",
        )
        self.batch_lines = _counter(
            r,
            "tollway_batch_lines_total",
            "Batch lines run by this worker, by result (completed, failed, deferred).",
        )
        self.batch_queue = _gauge(
            r, "tollway_batch_queue_depth", "Pending lines of open batches (fleet-wide)."
        )
        self.batch_oldest = _gauge(
            r,
            "tollway_batch_oldest_pending_seconds",
            "Age of the oldest open batch with a pending line (fleet-wide).",
        )

    def _declare_redis_and_server(self, r: Registry) -> None:
        """Redis health, and the server's own refusals (``proxy.web.http_guard``)."""
        self.redis_up = _gauge(r, "tollway_redis_up", "1 while Redis answers, else 0.")
        self.redis_errors = _counter(
            r, "tollway_redis_errors_total", "Redis commands that failed or timed out."
        )
        self.ratelimit_local = _counter(
            r,
            "tollway_ratelimit_local_checks_total",
            "Limit checks answered per process because Redis was down.",
        )
        self.connections = _gauge(
            r, "tollway_open_connections", "Client connections open to this worker."
        )
        self.refused = _counter(
            r,
            "tollway_connections_refused_total",
            "Connections refused over server.max_connections.",
        )
        self.http_refusals = _counter(
            r,
            "tollway_http_refusals_total",
            "Requests refused below the app (reason: header_timeout, body_timeout, malformed).",
        )
        self.auth_throttled = _counter(
            r,
            "tollway_auth_failures_throttled_total",
            "Requests refused because their address failed authentication too often.",
        )

    def _declare_guardrails_and_semantic_cache(self, r: Registry) -> None:
        self.guardrails = _counter(
            r,
            "tollway_guardrail_verdicts_total",
            "Guardrail findings, by guardrail (a policy entry's name), action and direction.",
        )
        self.semantic = _counter(
            r,
            "tollway_semantic_cache_requests_total",
            "Semantic-cache look-ups (result: hit, miss, bypass).",
        )
        self.similarity = _histogram(
            r,
            "tollway_semantic_cache_similarity",
            "Cosine similarity of the nearest stored question (hits and misses that found one).",
            SIMILARITY_BUCKETS,
        )
        self.embedding = _histogram(
            r,
            "tollway_semantic_cache_embedding_seconds",
            "The semantic cache's embedding call, failures and timeouts included.",
            EMBEDDING_BUCKETS,
        )
        self.saved = _counter(
            r,
            "tollway_semantic_cache_saved_usd_total",
            "What semantic hits saved: the price of the answers they served again.",
        )

    def _declare_webhooks_and_events(self, r: Registry) -> None:
        self.webhook_deliveries = _counter(
            r, "tollway_webhook_deliveries_total", "Webhook delivery attempts, by outcome."
        )
        self.webhook_seconds = _histogram(
            r,
            "tollway_webhook_delivery_seconds",
            "One webhook POST: sent to answered, refused or timed out.",
            WEBHOOK_BUCKETS,
        )
        self.webhook_pending = _gauge(
            r,
            "tollway_webhook_deliveries_pending",
            "Webhook deliveries waiting for their first or next attempt.",
        )
        self.event_streams = _gauge(r, "tollway_event_streams_open", "GET /v1/events streams open.")
        self.events_published = _counter(
            r, "tollway_events_published_total", "Tenant events written to the log."
        )

    def _start_at_zero(self) -> None:
        """The series a scrape shows before anything happened."""
        gauges = (self.inflight, self.streams, self.spool, self.lag)
        for gauge in (*gauges, self.webhook_pending, self.event_streams):
            gauge.set({}, 0)
        # From 0, like the budget alerts: increase() must see the first failure.
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.set({"outcome": outcome}, 0)
        for result in ("success", "failure"):
            self.reloads.set({"result": result}, 0)
        # Every budget-alert series exists from the start at 0: Prometheus's
        # increase() cannot see a first crossing that creates its series at 1,
        # so an alert rule on it (deploy/prometheus/alerts.yml) would never fire.
        for scope in ("tenant", "key"):
            for span in ("month", "day"):
                for threshold in BUDGET_THRESHOLDS:
                    labels = {"scope": scope, "span": span, "threshold": str(threshold)}
                    self.budget_alerts.set(labels, 0)

    # ------------------------------------------------------------ settle side

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

    # ------------------------------------------------------------ scrape side

    def set_gauges(
        self,
        *,
        inflight: int,
        streams: int,
        version: str,
        spool: int,
        lag: float,
        breakers: dict[str, int],
    ) -> None:
        self.inflight.set({}, inflight)
        self.streams.set({}, streams)
        self.version.values.clear()
        self.version.set({"version": version}, 1)
        self.spool.set({}, spool)
        self.lag.set({}, round(lag, 3))
        self.breaker.values.clear()
        for provider, state in breakers.items():
            self.breaker.set({"provider": provider}, state)

    def batch_line(self, result: str) -> None:
        self._add(self.batch_lines, (("result", result),))

    def set_batch_queue(self, depth: int, oldest_s: float) -> None:
        self.batch_queue.set({}, depth)
        self.batch_oldest.set({}, round(oldest_s, 3))

    def set_dead_letters(self, count: int) -> None:
        """Rows the ledger dead-lettered (read from it at scrape time)."""
        self.dead_letters.set({}, count)

    def set_redis(self, up: bool, errors: int, local_checks: int) -> None:
        """Redis health, read from the client and the limiter (only with Redis)."""
        self.redis_up.set({}, int(up))
        self.redis_errors.set({}, errors)
        self.ratelimit_local.set({}, local_checks)

    def set_guard(
        self, open_: int, refused: int, refusals: Mapping[str, int], auth_throttled: int
    ) -> None:
        """The server's own refusals (``proxy.web.http_guard``: open connections,
        refused ones, refusals by reason) and failed-auth throttling."""
        self.connections.set({}, open_)
        self.refused.set({}, refused)
        for reason, n in refusals.items():
            self.http_refusals.set({"reason": reason}, n)
        self.auth_throttled.set({}, auth_throttled)

    def set_events(self, streams: int, published: Mapping[str, int], pending: int | None) -> None:
        """The event log's side (``proxy.stores.events``), read at scrape
        time; ``pending`` None: the queue could not be read just now."""
        self.event_streams.set({}, streams)
        for kind, n in published.items():
            self.events_published.set({"type": kind}, n)
        if pending is not None:
            self.webhook_pending.set({}, pending)

    def collectors(self) -> Iterable[Counter | Gauge | Histogram]:
        return self.registry.get_all()  # type: ignore[return-value]


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


def target_keys(config: Config) -> list[str]:
    return [
        f"{t.provider}/{t.model or m.name}"
        for m in config.models
        if not m.is_pattern
        for t in m.targets
    ]


def breaker_states(health: dict[str, str]) -> dict[str, int]:
    """Per provider, its worst target's state."""
    out: dict[str, int] = {}
    for key, state in health.items():
        provider = key.split("/", 1)[0]
        out[provider] = max(out.get(provider, 0), BREAKER.get(state, 0))
    return out
