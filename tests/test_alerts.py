"""deploy/prometheus/alerts.yml: valid rules, unit-tested, on real metric names.

``promtool`` (Debian's ``prometheus`` package; ``make test`` installs it)
checks the rules and runs their unit tests (alerts.test.yml). Then a real
gateway, driven through every path the rules and the Grafana dashboard
look at, is scraped: every metric name they use must be one it exported.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.billing_helpers import TEST_TIERS, billing_config
from tests.conftest import Gateway, StartKeyed
from tests.fakes import FakeOpenAI
from tests.test_deploy import DASHBOARD, _expressions, _metrics_table
from tests.test_metrics import parse
from tests.waiting import until

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
# What the issue and the README promise to alert on.
SLO_ALERTS = {
    "TollwayLatencyP95High",
    "TollwayGatewayErrorRateHigh",
    "TollwayErrorBudgetFastBurn",
    "TollwayCacheHitRateLow",
    "TollwaySettlementLagHigh",
    "TollwayBillingSpoolDeep",
    "TollwayRedisDown",
    "TollwayBreakerOpen",
    "TollwayBudgetNearLimit",
}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        raise AssertionError(
            "promtool is not installed: `make test` installs it (Debian's prometheus package); "
            "by hand: apt-get install --no-install-recommends prometheus"
        )
    return path


def _run(*args: str) -> str:
    done = subprocess.run(
        [_promtool(), *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_rules() -> None:
    assert "SUCCESS" in _run("check", "rules", RULES.name)


def test_promtool_unit_tests_pass() -> None:
    assert "SUCCESS" in _run("test", "rules", RULE_TESTS.name)


def test_every_slo_has_an_alert_with_a_unit_test() -> None:
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert SLO_ALERTS <= alerts, f"missing alerts: {sorted(SLO_ALERTS - alerts)}"
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text(encoding="utf-8")))
    assert alerts <= tested, f"alerts without a promtool test: {sorted(alerts - tested)}"
    for rule in _rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"], rule["alert"]


def _rule_metrics() -> set[str]:
    return {m for r in _rules() for m in re.findall(r"\btollway_\w+", r["expr"])}


def _dashboard_metrics() -> set[str]:
    return {m for e in _expressions() for m in re.findall(r"\btollway_\w+", e)}


def _base(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


def test_rules_use_documented_metrics_and_labels() -> None:
    table = _metrics_table()
    for rule in _rules():
        expr = rule["expr"]
        for name, matchers in re.findall(r"\b(tollway_\w+)\s*\{([^}]*)\}", expr):
            base = name if name in table else _base(name)
            assert base in table, f"{name} is not in deploy/METRICS.md"
            allowed = table[base][1] | {"instance", "job", "le"}
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in allowed, f"{name} has no label {label!r} ({expr!r})"
        for name in re.findall(r"\btollway_\w+", expr):
            assert name in table or _base(name) in table, f"{name} is not in deploy/METRICS.md"


# ------------------------------------------------ against a running gateway


def _everything_config(provider_url: str) -> dict[str, Any]:
    cfg = billing_config(provider_url)
    cfg["tiers"] = {
        **TEST_TIERS,
        "hourly": {"requests_per_hour": 1, "max_tokens": 100},
        "once": {"requests_per_hour": 100, "monthly_requests": 1, "max_tokens": 100},
    }
    cfg["prices"] = {
        "fake-model": {"prompt": 1.0, "completion": 2.0},
        "echo": {"prompt": 1.0, "completion": 2.0},
    }
    cfg["retry"] = {"backoff_base_ms": 1, "backoff_max_ms": 2}
    cfg["providers"]["fake"]["breaker"] = {"failures": 1, "cooldown_s": 60}
    cfg["models"] += [
        {
            "name": "fb",
            "targets": [{"provider": "fake", "model": "error-503"}],
            "fallbacks": ["fake-model"],
        },
    ]
    cfg["cache"] = {"enabled": True, "ttl_s": 60, "models": {"fake-model": {"scope": "tenant"}}}
    cfg["semantic_cache"] = {
        "enabled": True,
        "embedding_model": "echo",
        "threshold": 0.87,
        "ttl_s": 60,
        "embedding_billing": "tenant",
    }
    cfg["guardrails"] = {
        "policies": [
            {
                "name": "terms",
                "detectors": [
                    {"name": "demo-terms", "blocklist": {"terms": ["zorblax"]}, "input": "block"}
                ],
            }
        ]
    }
    return cfg


async def _post(gw: Gateway, key: str, body: dict[str, Any]) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        await r.read()
        return r.status


async def test_rules_and_dashboard_use_only_metrics_the_gateway_exports(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOLLWAY_LOOP_LAG_MS", "5")  # exports the event-loop lag metrics
    cfg = _everything_config(fake_openai.url)
    names = set(cfg["tiers"])
    keyed = await start_keyed(cfg, "pro", names, redis_url=redis_url)
    hourly = await keyed.another("hourly", names)
    once = await keyed.another("once", names)
    key = keyed.api_key
    msg = [{"role": "user", "content": f"alerts {tmp_path.name}"}]
    fake = {"model": "fake-model", "messages": msg, "temperature": 0}
    assert await _post(keyed.gw, key, fake) == 200  # response-cache miss
    await until(lambda: _cache_hit(keyed.gw, key, fake), limit=10, what="response-cache hit")
    assert await _post(keyed.gw, key, {**fake, "stream": True, "temperature": 1}) == 200  # ttft
    question = [{"role": "user", "content": "What is the capital of France?"}]
    paraphrase = [{"role": "user", "content": "Whats the capital of France?"}]
    assert await _post(keyed.gw, key, {"model": "echo", "messages": question}) == 200
    await until(lambda: _semantic_hit(keyed.gw, key, paraphrase), limit=10, what="semantic hit")
    assert await _post(keyed.gw, key, {"model": "fake-unpriced", "messages": msg}) == 200
    assert await _post(keyed.gw, key, {"model": "fb", "messages": msg}) == 200  # retry, fallback
    assert await _post(keyed.gw, key, {"model": "fake-error-500", "messages": msg}) == 502
    blocked = [{"role": "user", "content": "say zorblax"}]
    assert await _post(keyed.gw, key, {"model": "echo", "messages": blocked}) == 400
    statuses = [await _post(keyed.gw, hourly.api_key, fake) for _ in range(2)]
    assert statuses[-1] == 429
    statuses = [await _post(keyed.gw, once.api_key, fake) for _ in range(2)]
    assert statuses[-1] == 429
    async with aiohttp.ClientSession() as s, s.get(keyed.gw.url + "/metrics") as r:
        types, _ = parse(await r.text())
    exported = set(types)
    for name in _rule_metrics():
        assert name in exported or _base(name) in exported, (
            f"alerts.yml uses {name}, which the gateway does not export"
        )
    for name in _dashboard_metrics():
        assert name in exported or _base(name) in exported, (
            f"{DASHBOARD.name} uses {name}, which the gateway does not export"
        )
    documented = set(_metrics_table())
    assert exported <= documented, f"exported, not in METRICS.md: {exported - documented}"
    assert documented <= exported, f"in METRICS.md, never exported: {documented - exported}"


async def _cache_hit(gw: Gateway, key: str, body: dict[str, Any]) -> bool:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        await r.read()
        return r.headers.get("x-tollway-cache") == "hit"


async def _semantic_hit(gw: Gateway, key: str, messages: list[dict[str, str]]) -> bool:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions",
            json={"model": "echo", "messages": messages},
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        await r.read()
        return r.headers.get("x-tollway-cache") == "semantic-hit"
