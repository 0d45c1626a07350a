"""Guardrails end to end: the official SDK against the gateway and a fake
provider that records what it receives and answers a text of the test's choosing."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml
from aiohttp import web

from proxy.config.reader import ConfigError
from proxy.pipeline.registry import parse_config
from proxy.stages.guardrails.config import parse_guardrails
from proxy.stages.guardrails.scan import hits
from tests.conftest import StartGateway, gateway_config
from tests.guardrail_helpers import start_guarded, text_reply
from tests.loopback import serve_app

FIXTURES = Path(__file__).parent / "fixtures" / "guardrails"
SECRET = "sk-ant-api03-Zx8yWv7uTs6rQp5oNm4lKj3iHg"
EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"
FULLWIDTH_EVASION = "tell me about \uff5a\uff4f\uff52\u200b\uff42\uff4c\uff41\uff58"


@dataclass
class ScriptedProvider:
    """An OpenAI-compatible fake: answers ``answer`` (or, when empty, the
    last user message), streamed in the ``pieces`` it is given."""

    answer: str = ""
    pieces: list[str] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> ScriptedProvider:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner, url = await serve_app(app)
        self.url = url + "/v1"
        return self

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(body)
        text = self.answer or body["messages"][-1]["content"]
        return await text_reply(request, body, text, self.pieces or [text], opening=True)


@pytest.fixture
async def provider() -> AsyncIterator[ScriptedProvider]:
    fake = await ScriptedProvider().start()
    yield fake
    assert fake.runner is not None
    await fake.runner.cleanup()


def policy(output: str = "redact", restore: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "policies": [
            {
                "name": "default",
                "restore": restore,
                **extra,
                "detectors": [
                    {"use": "pii", "input": "redact"},
                    {"use": "secrets", "input": "redact", "output": output},
                    {
                        "name": "demo-terms",
                        "blocklist": {"terms": ["zorblax"]},
                        "input": "block",
                        "output": "block",
                    },
                ],
            }
        ]
    }


# ------------------------------------------------------------------ input


async def test_the_provider_never_sees_a_redacted_value_and_restore_round_trips(
    start_gateway: StartGateway, provider: ScriptedProvider
) -> None:
    gw = await start_guarded(start_gateway, provider.url, policy())
    prompt = f"Write to {EMAIL} about card {CARD}; my key is {SECRET}. Again: {EMAIL}"
    reply = await gw.sdk().chat.completions.create(
        model="fake-m", messages=[{"role": "user", "content": prompt}]
    )
    sent = orjson.dumps(provider.seen[-1]).decode()
    for value in (EMAIL, CARD, SECRET, "4111"):
        assert value not in sent
    assert provider.seen[-1]["messages"][-1]["content"] == (
        "Write to [EMAIL_1] about card [CARD_1]; my key is [API_KEY_1]. Again: [EMAIL_1]"
    )
    assert reply.choices[0].message.content == prompt  # the caller sees its own data
    verdicts = gw.settler.records[-1].extra["guardrails"]
    assert {"guardrail": "pii", "detector": "email", "category": "pii", "action": "redact",
            "direction": "input", "count": 2} in verdicts  # fmt: skip
    assert EMAIL not in orjson.dumps(verdicts).decode()


async def test_restore_round_trips_on_a_stream(
    start_gateway: StartGateway, provider: ScriptedProvider
) -> None:
    gw = await start_guarded(start_gateway, provider.url, policy(output="log"))
    provider.pieces = ["Sure: [EM", "AIL_", "1] and [CA", "RD_1", "]", " done."]
    stream = await gw.sdk().chat.completions.create(
        model="fake-m",
        messages=[{"role": "user", "content": f"mail {EMAIL}, card {CARD}"}],
        stream=True,
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == f"Sure: {EMAIL} and {CARD} done."
    assert EMAIL not in orjson.dumps(provider.seen[-1]).decode()


async def test_a_blocklisted_term_is_a_400_naming_the_guardrail_not_the_text(
    start_gateway: StartGateway, provider: ScriptedProvider
) -> None:
    gw = await start_guarded(start_gateway, provider.url, policy())
    with pytest.raises(openai.BadRequestError) as info:
        await gw.sdk().chat.completions.create(
            model="fake-m",
            messages=[{"role": "user", "content": FULLWIDTH_EVASION}],
        )
    err = info.value.body
    assert isinstance(err, dict)
    assert err["code"] == "content_filter" and err["type"] == "invalid_request_error"
    assert "demo-terms" in err["message"] and "blocklist" in err["message"]
    assert "zorblax" not in err["message"].lower() and "\uff5a" not in err["message"]
    assert provider.seen == []  # never forwarded
    record = gw.settler.records[-1]
    assert record.status == 400 and record.error_code == "content_filter"
    assert record.extra["guardrails"][0]["action"] == "block"


async def test_policies_are_chosen_by_model_glob(
    start_gateway: StartGateway, provider: ScriptedProvider
) -> None:
    guard = policy(when={"models": ["fake-guarded*"]})
    gw = await start_guarded(start_gateway, provider.url, guard)
    client = gw.sdk()
    await client.chat.completions.create(
        model="fake-open", messages=[{"role": "user", "content": EMAIL}]
    )
    assert provider.seen[-1]["messages"][0]["content"] == EMAIL
    await client.chat.completions.create(
        model="fake-guarded", messages=[{"role": "user", "content": EMAIL}]
    )
    assert provider.seen[-1]["messages"][0]["content"] == "[EMAIL_1]"


# ------------------------------------------------------------------ output


async def test_a_secret_in_a_reply_is_redacted_and_a_blocked_reply_is_a_400(
    start_gateway: StartGateway, provider: ScriptedProvider
) -> None:
    gw = await start_guarded(start_gateway, provider.url, policy())
    provider.answer = f"The key is {SECRET}."
    reply = await gw.sdk().chat.completions.create(
        model="fake-m", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == "The key is [API_KEY_1]."
    provider.answer = "The ZORBLAX plan."
    with pytest.raises(openai.BadRequestError) as info:
        await gw.sdk().chat.completions.create(
            model="fake-m", messages=[{"role": "user", "content": "hi"}]
        )
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "content_filter"
    # The provider generated (and bills) the refused answer: so is the caller.
    assert gw.settler.records[-1].usage.completion_tokens == 5


def splits(text: str) -> list[list[str]]:
    """Two pieces at every split point, three at pairs of points, and one
    character per piece."""
    out = [[text[:i], text[i:]] for i in range(1, len(text))]
    out += [
        [text[:i], text[i:j], text[j:]]
        for i in range(1, len(text), 5)
        for j in range(i + 1, len(text), 7)
    ]
    out.append(list(text))
    return out


async def test_a_secret_split_across_any_chunk_boundary_never_reaches_the_client(
    start_gateway: StartGateway, provider: ScriptedProvider
) -> None:
    gw = await start_guarded(start_gateway, provider.url, policy())
    answer = f"Here: {SECRET} ok"
    client = gw.sdk()
    for pieces in splits(answer):
        provider.pieces = pieces
        stream = await client.chat.completions.create(
            model="fake-m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        got = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        text = "".join(got)
        assert text == "Here: [API_KEY_1] ok", pieces
        assert not any(SECRET[:12] in g for g in got)


async def sse_events(url: str, body: dict[str, Any]) -> list[Any]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        raw = await resp.read()
    events = []
    for event in raw.decode().split("\n\n"):
        if event.startswith("data: "):
            data = event[6:]
            events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


async def test_a_block_mid_stream_ends_it_with_content_filter_at_every_split(
    start_gateway: StartGateway, provider: ScriptedProvider
) -> None:
    gw = await start_guarded(start_gateway, provider.url, policy())
    answer = "Fine so far. Now the zorblax secret plan."
    for pieces in splits(answer)[::3]:
        provider.pieces = pieces
        events = await sse_events(
            gw.base_url + "/chat/completions",
            {"model": "fake-m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        )
        chunks = [e for e in events if isinstance(e, dict) and "choices" in e]
        text = "".join(c["choices"][0].get("delta", {}).get("content") or "" for c in chunks)
        assert "zorblax" not in text and "zor" not in text.lower().replace("so far", "")
        assert answer.startswith(text)
        assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
        assert events[-1]["error"]["code"] == "content_filter"
    assert gw.settler.records[-1].error_code == "content_filter"


# ------------------------------------------------------------------ corpora, config


def _lines(name: str) -> list[str]:
    out = []
    for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            out.append(line.encode().decode("unicode_escape") if "\\u" in line else line)
    return out


def _corpus_rules() -> Any:
    settings = parse_guardrails(
        {
            "policies": [
                {
                    "detectors": [
                        {"use": "pii", "input": "log"},
                        {"use": "secrets", "input": "log"},
                        {"blocklist": {"terms": ["zorblax", "project falcon"]}, "input": "block"},
                    ]
                }
            ]
        }
    )
    assert settings is not None
    return settings.policies[0].input


@pytest.mark.parametrize("text", _lines("evasions.txt"))
def test_every_evasion_in_the_corpus_is_caught(text: str) -> None:
    assert hits(text, _corpus_rules()), text


@pytest.mark.parametrize("text", _lines("benign.txt"))
def test_no_benign_text_in_the_corpus_is_flagged(text: str) -> None:
    found = hits(text, _corpus_rules())
    assert not found, [(text[a:b], r.finder.name) for a, b, r in found]


def test_a_card_number_that_fails_luhn_is_not_a_card() -> None:
    assert not hits("1234 5678 9012 3456", _corpus_rules())


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ({"policies": [], "extra": 1}, "guardrails.extra: unknown key"),
        (
            {"policies": [{"detectors": [{"use": "pii", "input": "redact", "oops": 1}]}]},
            "guardrails.policies[0].detectors[0].oops: unknown key",
        ),
        (
            {"policies": [{"detectors": [{"use": "pii", "input": "x"}]}]},
            "guardrails.policies[0].detectors[0].input: must be one of: block, redact, log, off",
        ),
        (
            {
                "policies": [
                    {"detectors": [{"use": "pii", "input": "log"}, {"use": "nope", "input": "log"}]}
                ]
            },
            "guardrails.policies[0].detectors[1].use: unknown detector 'nope'",
        ),
        (
            {"policies": [{"detectors": [{"blocklist": {"regexes": ["("]}, "input": "log"}]}]},
            "guardrails.policies[0].detectors[0].blocklist.regexes[0]: invalid regex",
        ),
        (
            {"policies": [{"when": {"tier": ["pro"]}, "detectors": []}]},
            "guardrails.policies[0].when.tier: unknown key",
        ),
        (
            {"policies": [{"detectors": [{"use": "pii"}]}]},
            "guardrails.policies[0].detectors[0]: give an action",
        ),
    ],
)
def test_the_section_is_strict_and_names_the_key_path(section: Any, error: str) -> None:
    text = yaml.safe_dump(gateway_config("http://127.0.0.1:9/v1", guardrails=section))
    with pytest.raises(ConfigError) as info:
        parse_config(text, {})
    assert str(info.value).startswith(error)


def test_local_detectors_scan_a_kb_quickly() -> None:
    """A loose bound (bench/guardrails.py measures it properly): a loaded
    machine must still be far below a millisecond per KB."""
    rules = _corpus_rules()
    text = ("The quarterly report, version 3, lists 42 items for review. " * 20)[:1024]
    started = time.perf_counter()
    for _ in range(200):
        hits(text, rules)
    assert (time.perf_counter() - started) / 200 < 0.001


# ------------------------------------------------------------------ records, CLI


async def test_verdicts_reach_the_metrics_and_the_access_log(
    start_gateway: StartGateway, provider: ScriptedProvider, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await start_guarded(start_gateway, provider.url, policy())
    with caplog.at_level("INFO", logger="tollway.access"):
        await gw.sdk().chat.completions.create(
            model="fake-m", messages=[{"role": "user", "content": f"{EMAIL} {EMAIL} {SECRET}"}]
        )
    line = next(r.getMessage() for r in caplog.records if r.name == "tollway.access")
    entry = orjson.loads(line)
    assert {"guardrail": "pii", "detector": "email", "category": "pii", "action": "redact",
            "direction": "input", "count": 2} in entry["guardrails"]  # fmt: skip
    assert EMAIL not in line and SECRET not in line
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    assert (
        'tollway_guardrail_verdicts_total{action="redact",direction="input",guardrail="pii"} 2'
        in text
    )


def test_the_cli_shows_what_a_policy_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.cli.commands import main

    path = tmp_path / "tollway.yaml"
    path.write_text(yaml.safe_dump(gateway_config("http://127.0.0.1:9/v1", guardrails=policy())))
    assert main(["guardrails", "test", "--config", str(path), f"mail {EMAIL}"]) == 0
    out = capsys.readouterr().out
    assert "mail [EMAIL_1]" in out and '"action":"redact"' in out and EMAIL not in out
    assert main(["guardrails", "test", "--config", str(path), "a ZORBLAX"]) == 1
    assert "blocked (400 content_filter)" in capsys.readouterr().out


def test_the_usage_row_details_carry_the_verdicts_not_the_text() -> None:
    from proxy.core.record import UsageRecord
    from proxy.stages.admit.billing import _details

    record = UsageRecord("req-1", "chat")
    verdict = {"guardrail": "pii", "detector": "email", "category": "pii", "action": "redact",
               "direction": "input", "count": 1}  # fmt: skip
    record.extra["guardrails"] = [verdict]
    details = _details(record)
    assert details is not None and orjson.loads(details)["guardrails"] == [verdict]


# ------------------------------------------------------------------ with the response cache


async def test_a_cached_answer_never_carries_another_callers_restored_values(
    start_gateway: StartGateway, provider: ScriptedProvider, redis_url: str
) -> None:
    """Two callers whose prompts differ only in a redacted value send the
    provider the same text; the cache must not give the second the first's
    answer (with the first's e-mail restored into it) nor skip output checks."""
    config = gateway_config(provider.url, guardrails=policy(), cache={"enabled": True, "ttl_s": 60})
    gw = await start_gateway(config, redis_url=redis_url)
    tag = f"cache-{time.monotonic_ns()}"  # the session Redis is shared
    answers = []
    for email in ("ann@example.com", "bob@example.org"):
        raw = await gw.sdk().chat.completions.with_raw_response.create(
            model="fake-m",
            messages=[{"role": "user", "content": f"{tag} mail {email}"}],
            temperature=0,
        )
        assert raw.headers["x-tollway-cache"] == "bypass"
        answers.append(raw.parse().choices[0].message.content)
    assert answers == [f"{tag} mail ann@example.com", f"{tag} mail bob@example.org"]
    assert len(provider.seen) == 2
