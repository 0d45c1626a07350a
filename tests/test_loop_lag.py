"""The event-loop lag probe (``proxy/loop_lag.py``), read on ``GET /metrics``."""

from __future__ import annotations

import time

import pytest

from proxy.web.loop_lag import ENV, MAX_NAME, NAME
from tests.conftest import Gateway, StartGateway, gateway_config
from tests.fakes import FakeOpenAI
from tests.test_metrics import parse, scrape, value
from tests.waiting import until


async def _lag(gw: Gateway) -> tuple[float, float]:
    """(observations so far, the max gauge) from one scrape."""
    types, series = parse(await scrape(gw))
    assert types.get(NAME) == "histogram" and types.get(MAX_NAME) == "gauge"
    return value(series, f"{NAME}_count"), value(series, MAX_NAME)


async def test_off_by_default(gateway: Gateway) -> None:
    types, _ = parse(await scrape(gateway))
    assert NAME not in types and MAX_NAME not in types


async def test_a_blocked_loop_shows_as_lag(
    monkeypatch: pytest.MonkeyPatch, start_gateway: StartGateway, fake_openai: FakeOpenAI
) -> None:
    monkeypatch.setenv(ENV, "1")
    gw = await start_gateway(gateway_config(fake_openai.url))

    async def probing() -> bool:
        return (await _lag(gw))[0] >= 20

    await until(probing, 10, interval=0.01, what="20 lag observations")
    time.sleep(0.08)  # noqa: ASYNC251 - the point: hold the gateway's loop for 80 ms
    _, series = parse(await scrape(gw))
    worst = value(series, MAX_NAME)
    assert worst >= 0.06, f"80 ms with the loop held, yet the worst lag reads {worst:.4f} s"
    above_50ms = value(series, f"{NAME}_count") - value(series, f"{NAME}_bucket", le="0.05")
    assert above_50ms >= 1
