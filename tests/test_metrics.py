"""``GET /metrics``: the contract of deploy/METRICS.md, fed by real requests."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from proxy.core.record import AttemptRecord
from proxy.stages.settle.metrics import Metrics, error_kind, text
from tests.billing_helpers import TEST_TIERS, billing_config, tenant_with_key
from tests.conftest import Gateway, StartGateway, gateway_config
from tests.fakes import FakeOpenAI
from tests.test_deploy import CONTRACT_METRICS, _metrics_table

MSG = [{"role": "user", "content": "hi"}]
_SERIES = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")


def parse(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """(type per metric, [(name, labels, value)]) of a Prometheus text page."""
    types, series = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            m = _SERIES.match(line)
            assert m, f"unparseable line {line!r}"
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            series.append((m.group(1), labels, float(m.group(3))))
    return types, series


def value(series: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, ls, v in series if n == name and labels.items() <= ls.items())


async def scrape(gw: Gateway) -> str:
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
        assert r.status == 200 and r.content_type == "text/plain"
        return await r.text()


async def post(gw: Gateway, body: dict[str, Any], key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json=body, headers=headers) as r,
    ):
        await r.read()
        return r.status


def resilient_config(url: str) -> dict[str, Any]:
    cfg = gateway_config(url, retry={"backoff_base_ms": 1, "backoff_max_ms": 2})
    cfg["providers"]["fake"]["breaker"] = {"failures": 1, "cooldown_s": 60}
    cfg["prices"] = {"fake-model": {"prompt": 1.0, "completion": 2.0}}
    cfg["models"] += [
        # first target fails with 503, the fallback model serves
        {
            "name": "fb",
            "targets": [{"provider": "fake", "model": "error-503"}],
            "fallbacks": ["fake-model"],
        },
        # ejected after one failure: its model has another, healthy target
        {
            "name": "br",
            "targets": [
                {"provider": "fake", "model": "error-500", "weight": 1000},
                {"provider": "echo", "weight": 0.001},
            ],
        },
    ]
    return cfg


async def test_metrics_follow_the_contract(
    start_gateway: StartGateway, fake_openai: FakeOpenAI
) -> None:
    gw = await start_gateway(resilient_config(fake_openai.url))
    assert await post(gw, {"model": "fake-model", "messages": MSG}) == 200
    stream = {"model": "fake-model", "messages": MSG, "stream": True}
    assert await post(gw, stream) == 200
    assert await post(gw, {"model": "fake-usage-none", "messages": MSG}) == 200
    assert await post(gw, {"model": "no-such-model-x1", "messages": MSG}) == 404
    assert await post(gw, {"model": "fb", "messages": MSG}) == 200
    assert await post(gw, {"model": "fake-error-500", "messages": MSG}) == 502
    assert await post(gw, {"model": "br", "messages": MSG}) == 200
    types, series = parse(await scrape(gw))

    for name, (kind, labels) in CONTRACT_METRICS.items():
        assert types.get(name) == kind, f"{name}: TYPE {types.get(name)}, expected {kind}"
        for n, ls, _ in series:
            if n == name or (kind == "histogram" and n.startswith(name + "_")):
                assert set(ls) - {"le"} == labels, f"{n} has labels {set(ls)}"

    chat = "/v1/chat/completions"
    assert (
        value(
            series,
            "tollway_requests_total",
            endpoint=chat,
            model="fake-model",
            provider="fake",
            status="200",
        )
        == 2
    )
    # a model the config does not know is no new series: it counts under ""
    assert value(series, "tollway_requests_total", model="", status="404") == 1
    assert not any("no-such-model" in str(ls) for _, ls, _ in series)
    assert (
        value(series, "tollway_request_duration_seconds_count", endpoint=chat, model="fake-model")
        == 2
    )
    assert value(series, "tollway_ttft_seconds_count", model="fake-model") == 1
    assert (
        value(series, "tollway_tokens_total", model="fake-model", type="prompt", source="provider")
        == 22
    )
    assert (
        value(series, "tollway_tokens_total", model="fake-*", type="completion", source="estimated")
        > 0
    )
    assert value(series, "tollway_cost_usd_total", model="fake-model") > 0
    assert value(series, "tollway_fallbacks_total", model="fb") == 1
    assert value(series, "tollway_upstream_errors_total", provider="fake", kind="status_5xx") >= 3
    assert value(series, "tollway_retries_total", provider="fake") >= 1
    assert value(series, "tollway_breaker_state", provider="fake") == 2  # fake/error-500 is open
    assert value(series, "tollway_breaker_state", provider="echo") == 0
    assert value(series, "tollway_inflight_requests") == 0
    assert value(series, "tollway_inflight_streams") == 0
    version = gw.settler.records[0].config.version  # type: ignore[union-attr]
    assert value(series, "tollway_config_version_info", version=version) == 1


async def test_quota_and_rate_limit_rejections_are_counted(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    cfg = billing_config(fake_openai.url)
    cfg["tiers"] = {**TEST_TIERS, "hourly": {"requests_per_hour": 1, "max_tokens": 100}}
    gw = await start_gateway(cfg, database_url=pg_url, data_dir=tmp_path)
    _, tiny = await tenant_with_key(pg, tmp_path, "tiny", set(cfg["tiers"]))
    _, hourly = await tenant_with_key(pg, tmp_path, "hourly", set(cfg["tiers"]))
    body = {"model": "fake-model", "messages": MSG}
    statuses = [await post(gw, body, tiny["api_key"]) for _ in range(11)]
    assert statuses == [200] * 10 + [429]
    assert [await post(gw, body, hourly["api_key"]) for _ in range(2)] == [200, 429]
    _, series = parse(await scrape(gw))
    assert value(series, "tollway_quota_rejections_total", reason="requests") == 1
    assert value(series, "tollway_ratelimit_rejections_total", reason="requests_per_hour") == 1
    assert value(series, "tollway_requests_total", status="429") == 2
    assert value(series, "tollway_cost_usd_total", model="fake-model") > 0
    for gauge in ("tollway_billing_spool_depth", "tollway_settlement_lag_seconds"):
        assert any(n == gauge for n, _, _ in series)


def test_error_kinds() -> None:
    def kind(status: int, code: str | None = None, reached: bool = True) -> str | None:
        return error_kind(AttemptRecord("p", "m", status, code, reached))

    assert kind(200) is None and kind(499) is None
    assert kind(502, "upstream_unavailable", reached=False) == "connect"
    assert kind(504, "upstream_timeout") == "timeout"
    assert kind(502, "upstream_stream_broken") == "protocol"
    assert kind(429) == "status_429"
    assert kind(503) == "status_5xx" and kind(400) == "status_4xx"


def test_metrics_md_lists_every_exported_family() -> None:
    """An operator looks a scraped name up in deploy/METRICS.md: every family
    the gateway declares is there, with the type a scrape announces."""
    documented = _metrics_table()
    types, _ = parse(text(Metrics().registry).text or "")
    assert len(types) > 30
    for name, kind in types.items():
        assert name in documented, f"deploy/METRICS.md does not list {name}"
        assert documented[name][0] == kind, f"{name}: METRICS.md says {documented[name][0]}"


def test_model_labels_are_bounded_by_the_config() -> None:
    from proxy.pipeline.registry import parse_config

    cfg = parse_config(
        "providers: {e: {kind: echo}}\n"
        "models: [{name: a, aliases: [a1], targets: [{provider: e}]},"
        " {name: 'gpt-*', targets: [{provider: e}]}]\n",
        {},
    )
    m = Metrics()
    assert m.model_label(cfg, "a1") == "a1"
    assert m.model_label(cfg, "gpt-4o-2024-08-06") == "gpt-*"
    assert m.model_label(cfg, "sk-someones-key-pasted-as-a-model") == ""
