"""Stored responses (Postgres) and billing through ``/v1/responses``: kept per
tenant, retrieved and continued with the official SDK, ``store: false`` keeps
nothing, another tenant's id is not found, usage rows name the endpoint."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import aiohttp
import asyncpg
import openai
import pytest

from proxy.stores.responses import ResponseStore
from tests.billing_helpers import USAGE_COUNT, USAGE_ROWS, billing_config, wait_for
from tests.conftest import StartKeyed
from tests.fakes import FAKE_USAGE, WORDS, FakeOpenAI
from tests.schema import validate


async def test_store_retrieve_continue_and_tenant_scope(
    start_keyed: StartKeyed, fake_openai: FakeOpenAI, pg: asyncpg.Pool
) -> None:
    keyed = await start_keyed(billing_config(fake_openai.url))
    other = (await keyed.another()).sdk()
    client = keyed.sdk()
    first = await client.responses.create(
        model="echo", input="My name is Ada.", instructions="Be brief.", metadata={"k": "v"}
    )
    got = await client.responses.retrieve(first.id)
    assert got.model_dump(mode="json") == first.model_dump(mode="json")
    validate(got.model_dump(mode="json", by_alias=True, exclude_unset=True), "Response")
    assert got.metadata == {"k": "v"} and got.output_text == "My name is Ada."
    # the next turn carries the stored input and output as chat history
    second = await client.responses.create(
        model="fake-model", input="What is my name?", previous_response_id=first.id
    )
    assert second.previous_response_id == first.id
    assert fake_openai.seen[-1].body["messages"] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "My name is Ada."},
        {"role": "user", "content": "What is my name?"},
    ]  # the first turn's instructions do not carry over, as on OpenAI
    # a streamed answer is stored too, retrievable once the stream has ended
    stream = await client.responses.create(
        model="fake-model", input="And now?", previous_response_id=second.id, stream=True
    )
    events = [e async for e in stream]
    streamed = events[-1].response  # type: ignore[union-attr]
    assert (await client.responses.retrieve(streamed.id)).output_text == "".join(WORDS)
    assert len(fake_openai.seen[-1].body["messages"]) == 5
    # another tenant sees none of it
    with pytest.raises(openai.NotFoundError):
        await other.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        await other.responses.create(model="echo", input="hi", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        await other.responses.delete(first.id)
    # store: false keeps nothing
    unstored = await client.responses.create(model="echo", input="secret", store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored.id)
    assert await pg.fetchval("SELECT count(*) FROM responses WHERE id = $1", unstored.id) == 0
    # the owner deletes it
    await client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(first.id)


async def test_bad_key_is_authentication_error(
    start_keyed: StartKeyed, fake_openai: FakeOpenAI
) -> None:
    keyed = await start_keyed(billing_config(fake_openai.url))
    client = keyed.gw.sdk(api_key="tw-not-a-key")
    with pytest.raises(openai.AuthenticationError):
        await client.responses.create(model="echo", input="hi")
    with pytest.raises(openai.AuthenticationError):
        await client.responses.retrieve("resp_x")


async def test_expired_responses_are_swept(
    start_keyed: StartKeyed, fake_openai: FakeOpenAI, pg: asyncpg.Pool
) -> None:
    from proxy.web.responses_api import DOOR_SERVICES

    keyed = await start_keyed(billing_config(fake_openai.url))
    client = keyed.sdk()
    resp = await client.responses.create(model="echo", input="old")
    await pg.execute(
        "UPDATE responses SET expires_at = now() - interval '1 s' WHERE id = $1", resp.id
    )
    with pytest.raises(openai.NotFoundError):  # past its retention: gone, even before a sweep
        await client.responses.retrieve(resp.id)
    store = keyed.gw.app[DOOR_SERVICES].responses
    assert store is not None and await store.sweep() >= 1
    assert await pg.fetchval("SELECT count(*) FROM responses WHERE id = $1", resp.id) == 0


async def test_usage_rows_name_the_endpoint_with_exact_tokens(
    start_keyed: StartKeyed, fake_openai: FakeOpenAI, pg: asyncpg.Pool
) -> None:
    keyed = await start_keyed(billing_config(fake_openai.url))
    client = keyed.sdk()
    await client.responses.create(model="fake-model", input="hi")
    _ = [
        e async for e in await client.responses.create(model="fake-model", input="hi", stream=True)
    ]
    # a client that walks away mid-stream: what was delivered is billed
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            keyed.gw.base_url + "/responses",
            json={"model": "fake-held", "input": "hi", "stream": True},
            headers={"Authorization": f"Bearer {keyed.api_key}"},
        )
        seen = b""
        while b"response.output_text.delta" not in seen:
            seen += await resp.content.readany()
        resp.close()
    await wait_for(pg, USAGE_COUNT, keyed.tenant, expect=3)
    rows = await pg.fetch(USAGE_ROWS, keyed.tenant)
    assert {r["endpoint"] for r in rows} == {"responses"}
    by_kind = {(r["stream"], r["status"]): r for r in rows}
    whole, streamed, gone = by_kind[(False, 200)], by_kind[(True, 200)], by_kind[(True, 499)]
    for row in (whole, streamed):
        assert row["status"] == 200 and row["usage_source"] == "provider"
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            FAKE_USAGE["prompt_tokens"],
            FAKE_USAGE["completion_tokens"],
        )
    assert gone["client_disconnected"]
    assert gone["prompt_tokens"] > 0 and gone["completion_tokens"] >= 1
    fake_openai.release.set()


def _readme_snippet() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## OpenAI Responses API") :]
    return section[section.index("```python\n") + 10 : section.index("```\n", 20)]


async def test_readme_snippet_runs(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README's Responses snippet, as written, against a gateway with a
    database and the echo model (the port is the test gateway's)."""
    snippet = _readme_snippet()
    keyed = await start_keyed(billing_config(fake_openai.url))
    monkeypatch.setenv("TOLLWAY_KEY", keyed.api_key)
    code = snippet.replace("http://127.0.0.1:8080", keyed.gw.url)
    await asyncio.to_thread(exec, compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("My name is Ada.") and "Who am I?\nstream me" in out


async def test_the_same_id_kept_by_two_owners_is_two_rows(pg: asyncpg.Pool) -> None:
    """A passed-through response keeps the provider's id, so two tenants on
    one upstream account may store the same id: neither shadows the other."""
    store = ResponseStore(pg, retention_s=60, timeout_s=5)
    rid = f"resp_{secrets.token_hex(6)}"
    await store.put("t9001", rid, b'{"owner":1}', b"[]")
    await store.put("t9002", rid, b'{"owner":2}', b"[]")
    first, second = await store.get("t9001", rid), await store.get("t9002", rid)
    assert first is not None and first.body == b'{"owner":1}'
    assert second is not None and second.body == b'{"owner":2}'
