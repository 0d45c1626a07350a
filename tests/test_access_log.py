"""The access log: one JSON line per request, request ids, bodies only when allowed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import asyncpg
import orjson
import pytest
import yaml

from proxy.config.model import ConfigError
from proxy.pipeline.registry import parse_config
from proxy.web.middleware import sanitise_request_id
from tests.billing_helpers import billing_config, tenant_with_key
from tests.conftest import Gateway, StartGateway, gateway_config
from tests.fakes import FakeOpenAI
from tests.fakes_providers import FakeAnthropic
from tests.test_door_native import config as door_config

PROMPT = "the secret recipe is 42"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "tollway.access"]


async def chat(
    gw: Gateway, key: str | None = None, request_id: str | None = None, **body: Any
) -> tuple[int, dict[str, str]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if request_id is not None:
        headers["x-request-id"] = request_id
    payload = {"model": "fake-model", "messages": [{"role": "user", "content": PROMPT}], **body}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json=payload, headers=headers) as r,
    ):
        await r.read()
        return r.status, {k.lower(): v for k, v in r.headers.items()}


async def test_one_json_line_per_request(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tollway.access")
    status, headers = await chat(gateway, request_id="client-id-1")
    assert status == 200 and headers["x-request-id"] == "client-id-1"
    status, headers = await chat(gateway, request_id="bad id <x>", stream=True)
    assert status == 200 and headers["x-request-id"] == "badidx"
    status, headers = await chat(gateway, model="no-such-model")
    assert status == 404 and headers["x-request-id"].startswith("req_")
    lines = access_lines(caplog)
    assert [line["request_id"] for line in lines] == [
        "client-id-1",
        "badidx",
        headers["x-request-id"],
    ]
    first = lines[0]
    assert first["status"] == 200 and first["model"] == "fake-model" and first["provider"] == "fake"
    assert first["prompt_tokens"] == 11 and first["completion_tokens"] == 6
    assert first["usage_source"] == "provider" and first["attempts"] == 1
    assert first["latency_ms"] > 0 and first["upstream"][0]["status"] == 200
    assert {"tenant", "key_prefix", "cache", "ttft_ms", "config_version"} <= first.keys()
    assert lines[1]["stream"] is True and lines[1]["ttft_ms"] is not None
    assert lines[2]["status"] == 404 and lines[2]["error_code"] == "model_not_found"
    assert all(PROMPT not in orjson.dumps(line).decode() for line in lines)


async def test_cost_is_zero_for_a_free_model_and_null_for_an_unpriced_one(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tollway.access")
    cfg = gateway_config(fake_openai.url, prices={"fake-model": {"prompt": 0, "completion": 0}})
    gw = await start_gateway(cfg)
    assert (await chat(gw))[0] == 200
    assert (await chat(gw, model="fake-unpriced"))[0] == 200
    assert [line["cost_usd"] for line in access_lines(caplog)] == [0.0, None]


def test_request_ids_are_sanitised() -> None:
    assert sanitise_request_id("abc-123_X.y:z") == "abc-123_X.y:z"
    assert sanitise_request_id("a\"b'c;d{e}") == "abcde"
    assert len(sanitise_request_id("x" * 500)) == 128
    assert sanitise_request_id("<>").startswith("req_")
    assert sanitise_request_id(None).startswith("req_")


async def test_bodies_are_logged_only_for_named_tenants(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tollway.access")
    cfg = billing_config(fake_openai.url)
    loud_tenant, loud = await tenant_with_key(pg, tmp_path, "pro")
    quiet_tenant, quiet = await tenant_with_key(pg, tmp_path, "pro")
    cfg["logging"] = {"bodies": {"tenants": [loud_tenant], "max_chars": 200}}
    gw = await start_gateway(cfg, database_url=pg_url, data_dir=tmp_path)
    assert (await chat(gw, loud["api_key"]))[0] == 200
    assert (await chat(gw, loud["api_key"], stream=True))[0] == 200
    assert (await chat(gw, quiet["api_key"]))[0] == 200
    by_tenant: dict[str, list[dict[str, Any]]] = {}
    for line in access_lines(caplog):
        by_tenant.setdefault(line["tenant"], []).append(line)
    for line in by_tenant[loud_tenant]:
        assert PROMPT in line["prompt"] and line["completion"] == "Hello from the fake provider."
        assert line["key_prefix"] == loud["api_key"][:10]
    (line,) = by_tenant[quiet_tenant]
    assert "prompt" not in line and "completion" not in line
    assert PROMPT not in orjson.dumps(line).decode()


async def test_access_log_can_be_turned_off(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tollway.access")
    gw = await start_gateway(gateway_config(fake_openai.url, logging={"access_log": False}))
    assert (await chat(gw))[0] == 200
    assert access_lines(caplog) == []


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ({"access_log": "yes"}, "logging.access_log: must be true or false"),
        ({"bodies": {"tenants": "acme"}}, "logging.bodies.tenants: must be a list"),
        ({"bodies": {"max_chars": 0}}, "logging.bodies.max_chars: must be a positive integer"),
        ({"prompts": True}, "logging.prompts: unknown key"),
    ],
)
def test_logging_section_is_validated(section: dict[str, Any], error: str) -> None:
    text = yaml.safe_dump(gateway_config("http://127.0.0.1:9/v1", logging=section))
    with pytest.raises(ConfigError) as exc:
        parse_config(text, {})
    assert str(exc.value).startswith(error)


async def test_a_passed_through_answer_has_its_text_in_the_transcript(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An answer in Anthropic's Messages or OpenAI's Responses, as the
    provider sent it, is logged with its text as a chat answer is."""
    caplog.set_level(logging.INFO, logger="tollway.access")
    ant = FakeAnthropic()
    await ant.start()
    try:
        cfg = door_config(fake_openai.url, ant.url, billing_config(fake_openai.url))
        tenant, key = await tenant_with_key(pg, tmp_path, "pro")
        cfg["logging"] = {"bodies": {"tenants": [tenant], "max_chars": 500}}
        gw = await start_gateway(cfg, database_url=pg_url, data_dir=tmp_path)
        claude = anthropic.AsyncAnthropic(base_url=gw.url, api_key=key["api_key"], max_retries=0)
        msg = await claude.messages.create(
            model="claude-thinking", max_tokens=2048, messages=[{"role": "user", "content": PROMPT}]
        )
        resp = await gw.sdk(api_key=key["api_key"]).responses.create(
            model="gpt-native", input=PROMPT
        )
    finally:
        ant.release.set()
        await ant.close()
    assert ant.seen[-1].path == "/v1/messages" and fake_openai.seen[-1].path == "/v1/responses"
    said = "".join(b.text for b in msg.content if b.type == "text")
    assert said and resp.output_text
    lines = [line for line in access_lines(caplog) if line.get("tenant") == tenant]
    assert [(line["completion"], PROMPT in line["prompt"]) for line in lines] == [
        (said, True),
        (resp.output_text, True),
    ]
