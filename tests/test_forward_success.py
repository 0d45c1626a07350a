"""The forward stage records a target's success only when it changes the
breaker's state, and then always: a counted failure is reset."""

from __future__ import annotations

from tests.conftest import StartGateway
from tests.fakes_faults import FaultyOpenAI
from tests.test_forward import RETRY, _chat, _health, config, started


async def test_a_success_resets_the_failures_counted_before_it(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    """Failures count only in a row: one answered request in between
    starts the count again (the forward stage records a success whenever
    it changes the target's state, and only then), streams as non-streams."""
    cfg = config(fake_a, fake_b, retry={**RETRY, "max_attempts": 1})
    cfg["providers"]["a"]["breaker"] = {"failures": 2, "cooldown_s": 60}
    gw = await started(start_gateway, cfg)
    for stream in (False, True, False):
        fake_a.force = "error-500"
        assert (await _chat(gw, "pair"))[0] == 502  # a failed: one counted
        fake_a.force = None
        status, headers, _ = await _chat(gw, "pair", stream=stream)
        assert status == 200 and headers["x-tollway-provider"] == "a"
        assert await _health(gw, "a/plain") == "closed"
    fake_a.force = "error-500"
    for _ in range(2):  # two in a row do eject it (b is there to serve)
        assert (await _chat(gw, "pair"))[0] == 502
    assert await _health(gw, "a/plain") == "open"
