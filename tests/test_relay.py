"""The streaming tee: chunks go out as they arrive; failures end cleanly."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from tests.conftest import StartGateway, gateway_config
from tests.fakes import WORDS, FakeOpenAI
from tests.fakes_faults import FaultyOpenAI
from tests.waiting import until

BODY = {"messages": [{"role": "user", "content": "hi"}], "stream": True}


async def _events(resp: aiohttp.ClientResponse) -> list[bytes]:
    raw = await resp.read()
    return [e for e in raw.split(b"\n\n") if e]


async def test_first_chunk_arrives_while_provider_holds_the_rest(
    start_gateway: StartGateway, fake_openai: FakeOpenAI
) -> None:
    gw = await start_gateway(gateway_config(fake_openai.url))
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json={**BODY, "model": "fake-held"}) as resp,
    ):
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        seen = b""
        async with asyncio.timeout(2):
            while WORDS[0].encode() not in seen:
                seen += await resp.content.readany()
        # The provider is still holding the rest of the answer.
        assert not fake_openai.release.is_set()
        assert WORDS[1].encode() not in seen
        fake_openai.release.set()
        rest = await resp.read()
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_heartbeat_comments_pass_through(
    start_gateway: StartGateway, fake_openai: FakeOpenAI
) -> None:
    gw = await start_gateway(gateway_config(fake_openai.url))
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json={**BODY, "model": "fake-heartbeat"}) as resp,
    ):
        events = await _events(resp)
    assert events.count(b": ping") == len(WORDS)


async def test_client_disconnect_cancels_upstream_and_still_settles(
    start_gateway: StartGateway, fake_openai: FakeOpenAI
) -> None:
    gw = await start_gateway(gateway_config(fake_openai.url))
    async with aiohttp.ClientSession() as s:
        resp = await s.post(gw.base_url + "/chat/completions", json={**BODY, "model": "fake-held"})
        seen = b""
        while WORDS[0].encode() not in seen:
            seen += await resp.content.readany()
        resp.close()  # the client walks away while the provider is mid-answer
    async with asyncio.timeout(5):
        await fake_openai.disconnected.wait()  # upstream request was cancelled
    await until(lambda: gw.settler.records)
    record = gw.settler.records[-1]
    assert record.client_disconnected
    assert record.usage.source == "estimated"  # the usage chunk never came
    assert record.usage.completion_tokens >= 1  # what was delivered is billed
    assert record.usage.prompt_tokens > 0


async def test_upstream_dying_mid_stream_ends_with_error_event(
    start_gateway: StartGateway, fake_openai: FakeOpenAI
) -> None:
    gw = await start_gateway(gateway_config(fake_openai.url))
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json={**BODY, "model": "fake-cut"}) as resp,
    ):
        async with asyncio.timeout(5):
            events = await _events(resp)
    assert resp.status == 200
    payloads = [orjson.loads(e.removeprefix(b"data: ")) for e in events]  # every line whole JSON
    assert payloads[-1]["error"]["code"] == "upstream_stream_broken"
    record = gw.settler.records[-1]
    assert record.status == 502
    assert record.usage.source == "estimated" and record.usage.completion_tokens >= 1


async def test_stalled_stream_times_out_with_error_event(
    start_gateway: StartGateway, fake_openai: FakeOpenAI
) -> None:
    cfg = gateway_config(fake_openai.url)
    cfg["providers"]["fake"]["timeouts"] = {"connect": 1, "first_byte": 1, "idle": 0.3, "total": 10}
    gw = await start_gateway(cfg)
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json={**BODY, "model": "fake-held"}) as resp,
    ):
        async with asyncio.timeout(5):
            events = await _events(resp)
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_timeout"
    fake_openai.release.set()


async def test_a_complete_answer_without_done_is_a_success(
    start_gateway: StartGateway,
) -> None:
    """Finish reason and usage arrived, only ``[DONE]`` did not: the SDK gets
    the whole answer and no error, the gateway adds the ``[DONE]``, the row
    says 200. A stream cut before its finish stays an error."""
    fake = await FaultyOpenAI().start()
    try:
        gw = await start_gateway(gateway_config(fake.url))
        client = gw.sdk()
        for usage in (True, False):
            stream = await client.chat.completions.create(
                model="fake-no-done",
                messages=BODY["messages"],
                stream=True,
                stream_options={"include_usage": True} if usage else None,
            )
            chunks = [chunk async for chunk in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "".join(WORDS)
            assert (chunks[-1].usage is not None) is usage
            record = gw.settler.records[-1]
            assert record.status == 200 and record.error_code is None
            assert record.usage.source == "provider"
        async with (
            aiohttp.ClientSession() as s,
            s.post(gw.base_url + "/chat/completions", json={**BODY, "model": "fake-no-done"}) as r,
        ):
            assert (await r.read()).endswith(b"\n\ndata: [DONE]\n\n")
        # Two choices asked for, one finished: the answer is not whole.
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                gw.base_url + "/chat/completions",
                json={**BODY, "model": "fake-no-done", "n": 2},
            ) as r,
        ):
            events = await _events(r)
        assert b"upstream_stream_broken" in events[-1]
        assert gw.settler.records[-1].status == 502
    finally:
        await fake.close()
