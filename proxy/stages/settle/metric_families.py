"""The registry behind ``GET /metrics``: every family, declared in the order
a scrape lists them, and the gauges read at scrape time (``set_*``, called
by ``proxy.web.observe``). Names and labels are in deploy/METRICS.md.

What requests and events add to it is ``metrics.Metrics``'s job (the
per-request path); this module only says what exists and what a scrape
reads. Labels are bounded by the config, never by what a client sends.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from aioprometheus import Counter, Gauge, Histogram, Registry

from proxy.config.model import Config

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


def _counter(registry: Registry, name: str, doc: str) -> Counter:
    return Counter(name, doc, registry=registry)


def _gauge(registry: Registry, name: str, doc: str) -> Gauge:
    return Gauge(name, doc, registry=registry)


def _histogram(registry: Registry, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
    return Histogram(name, doc, registry=registry, buckets=buckets)


class Families:
    """The registry and its collectors (one per process, as ``Metrics``).

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
