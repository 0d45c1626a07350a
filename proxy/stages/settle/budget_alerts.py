"""Budget alerts: a budget crossing 50, 80 or 100 percent is announced once.

The ledger finds the crossings in the transaction that moves the budget
counters (``proxy.stores.usage_batch.Crossing``; Postgres remembers the highest
threshold announced, so each is announced once across all workers) and hands
them here after the commit. Each becomes a log event (``tollway.budgets``),
a count in ``tollway_budget_alerts_total{scope,span,threshold}`` and, when
``budget_alerts.webhook`` is configured, a POST signed the Standard Webhooks
way (``proxy.core.webhooks``), tried three times.

```yaml
budget_alerts:
  webhook: {url: "https://ops.example.com/hooks/tollway", secret: "${TOLLWAY_WEBHOOK_SECRET}"}
```
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp
import asyncpg
import orjson

from proxy.config.budgets import usd
from proxy.config.model import Config
from proxy.config.reader import ConfigError
from proxy.core import webhooks
from proxy.stages.base import Services, Stage
from proxy.stores.usage_batch import Crossing

log = logging.getLogger("tollway.budgets")
_TRIES = 3


@dataclass(frozen=True, slots=True)
class AlertSettings:
    url: str | None = None
    key: bytes = b""


def _settings(raw: Any) -> AlertSettings | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"webhook"}:
        raise ConfigError("budget_alerts: must be a mapping with 'webhook'")
    hook = raw.get("webhook")
    if hook is None:
        return AlertSettings()
    if not isinstance(hook, dict) or set(hook) != {"url", "secret"}:
        raise ConfigError("budget_alerts.webhook: must be {url, secret}")
    url, secret = hook["url"], hook["secret"]
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError("budget_alerts.webhook.url: must be an http(s) URL")
    try:
        key = webhooks.secret_key(str(secret))
    except ValueError as exc:
        raise ConfigError(f"budget_alerts.webhook.secret: {exc} (whsec_<base64>)") from None
    return AlertSettings(url, key)


class BudgetAlertsStage(Stage):
    """Owns the ``budget_alerts:`` section and sends the webhooks; it has no
    request hooks, so it costs nothing per request."""

    name: ClassVar[str] = "budget_alerts"
    section: ClassVar[str | None] = "budget_alerts"

    def __init__(self) -> None:
        self._services: Services | None = None
        self.sent = 0

    @classmethod
    def configure(cls, raw: Any, config: Config) -> object | None:
        return _settings(raw)

    async def open(self, services: Services) -> None:
        self._services = services

    def notify(
        self, crossings: list[Crossing], settings: object | None, pool: asyncpg.Pool, count: Any
    ) -> None:
        for c in crossings:
            scope = "tenant" if c.subject.startswith("t:") else "key"
            log.warning(
                "budget %s %s %s reached %d%%: $%s of $%s",
                scope,
                c.subject[2:],
                c.span,
                c.level,
                usd(c.used_micros),
                usd(c.limit_micros),
            )
            count(scope, c.span, c.level)
        if isinstance(settings, AlertSettings) and settings.url and self._services is not None:
            services = self._services
            services.tasks.spawn(
                self._send(services.http, settings, pool, crossings), name="budget-alerts"
            )

    async def _send(
        self,
        http: aiohttp.ClientSession,
        s: AlertSettings,
        pool: asyncpg.Pool,
        crossings: list[Crossing],
    ) -> None:
        assert s.url is not None
        for c in crossings:
            body = orjson.dumps(await _event(pool, c))
            for attempt in range(_TRIES):
                try:
                    async with http.post(
                        s.url,
                        data=body,
                        headers=webhooks.headers(s.key, body),
                        timeout=aiohttp.ClientTimeout(total=10),
                    ) as r:
                        if r.status < 300:
                            self.sent += 1
                            break
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.5 * 2**attempt)
            else:
                log.error(
                    "budget alert webhook failed %d times; alert for %s dropped", _TRIES, c.subject
                )


async def _event(pool: asyncpg.Pool, c: Crossing) -> dict[str, Any]:
    """The webhook body: Standard Webhooks' ``type``/``timestamp``/``data``."""
    scope, ident = (
        ("tenant", c.subject[2:]) if c.subject.startswith("t:") else ("key", c.subject[2:])
    )
    try:
        if scope == "tenant":
            tenant = await pool.fetchval("SELECT name FROM tenants WHERE id = $1", int(ident))
        else:
            tenant = await pool.fetchval(
                "SELECT t.name FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
                " WHERE k.id = $1",
                ident,
            )
    except (OSError, asyncpg.PostgresError):
        tenant = None
    return {
        "type": "budget.threshold_crossed",
        "data": {
            "scope": scope,
            "tenant": tenant,
            "key_id": ident if scope == "key" else None,
            "span": c.span,
            "period": c.period.isoformat(),
            "threshold_percent": c.level,
            "used_usd": usd(c.used_micros),
            "limit_usd": usd(c.limit_micros),
        },
    }
