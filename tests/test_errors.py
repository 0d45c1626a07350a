"""Every error a client sees is OpenAI-shaped, with the right status and SDK class."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import Gateway, StartGateway, gateway_config
from tests.fakes import FakeOpenAI
from tests.schema import validate

MSG = [{"role": "user", "content": "hi"}]
# Retries stay on, but quick: a 429's retry-after of 7 s is beyond this deadline.
FAST_RETRY = {"backoff_base_ms": 1, "backoff_max_ms": 5, "deadline_s": 2.5}


@pytest.fixture
async def gateway(start_gateway: StartGateway, fake_openai: FakeOpenAI) -> Gateway:
    return await start_gateway(gateway_config(fake_openai.url, retry=FAST_RETRY))


async def _post(
    gateway: Gateway,
    body: bytes | str,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(gateway.url + path, data=body, headers=headers or {}) as r,
    ):
        payload = await r.json(content_type=None)
        return r.status, {k.lower(): v for k, v in r.headers.items()}, payload


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ("{not json", None, "could not parse the JSON"),
        ("[1, 2]", None, "must be a JSON object"),
        ('{"model": "echo", "messages": [], "stream": "yes"}', "messages", "at least one"),
        (
            '{"model": "echo", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
            "stream",
            "expected a boolean",
        ),
        (
            '{"model": {}, "messages": [{"role": "user", "content": "x"}]}',
            "model",
            "expected a string",
        ),
        ('{"messages": [{"role": "user", "content": "x"}]}', "model", "Missing required"),
        ('{"model": "echo"}', "messages", "Missing required"),
        ('{"model": "echo", "messages": [{"content": "x"}]}', "messages[0].role", "role"),
        # names that reach the ledger, logs and headers: no control characters, capped
        ('{"model": "echo\\r\\nx", "messages": [{"role": "user"}]}', "model", "control"),
        ('{"model": "' + "e" * 257 + '", "messages": [{"role": "user"}]}', "model", "at most 256"),
        (
            '{"model": "echo", "messages": [{"role": "user"}], "user": "a\\u0000"}',
            "user",
            "control",
        ),
        (
            '{"model": "echo", "messages": [{"role": "user"}], "user": "' + "u" * 257 + '"}',
            "user",
            "at most 256",
        ),
    ],
)
async def test_bad_requests_are_400(
    gateway: Gateway, body: str, param: str | None, fragment: str
) -> None:
    status, headers, payload = await _post(gateway, body)
    assert status == 400
    validate(payload, "ErrorResponse")
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["param"] == param
    assert fragment in payload["error"]["message"]
    assert headers["x-request-id"]


async def test_sdk_exception_classes(gateway: Gateway) -> None:
    client = gateway.sdk()
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="echo", messages=[])
    assert bad.value.status_code == 400
    with pytest.raises(openai.NotFoundError) as nf:
        await client.chat.completions.create(model="no-such-model", messages=MSG)
    assert nf.value.code == "model_not_found"


async def test_body_over_cap_is_413(start_gateway: StartGateway, fake_openai: FakeOpenAI) -> None:
    gw = await start_gateway(gateway_config(fake_openai.url, server={"max_body_bytes": 1000}))
    big = '{"model": "echo", "messages": [{"role": "user", "content": "' + "x" * 2000 + '"}]}'
    status, _, payload = await _post(gw, big)
    assert status == 413
    assert payload["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as exc:
        await gw.sdk().chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "x" * 2000}]
        )
    assert exc.value.status_code == 413


async def test_unknown_v1_route_is_openai_404(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s, s.get(gateway.url + "/v1/nothing/here") as r:
        assert r.status == 404
        payload = await r.json()
    validate(payload, "ErrorResponse")
    assert payload["error"]["code"] == "not_found"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 429])
async def test_provider_4xx_passed_on(gateway: Gateway, status: int) -> None:
    body = f'{{"model": "fake-error-{status}", "messages": [{{"role": "user", "content": "x"}}]}}'
    code, headers, payload = await _post(gateway, body)
    assert code == status
    validate(payload, "ErrorResponse")
    assert payload["error"]["message"] == f"fake provider error {status}"
    assert payload["error"]["code"] == f"fake_{status}"
    if status == 429:
        assert headers["retry-after"] == "7"


async def test_provider_errors_raise_matching_sdk_classes(gateway: Gateway) -> None:
    client = gateway.sdk()
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="fake-error-429", messages=MSG)
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="fake-error-401", messages=MSG)
    with pytest.raises(openai.InternalServerError) as exc:
        await client.chat.completions.create(model="fake-error-500", messages=MSG)
    assert exc.value.status_code == 502  # retried, then a bad gateway of our own
    assert exc.value.response.headers["x-tollway-attempts"] == "3"


async def test_provider_unreachable_is_502(start_gateway: StartGateway) -> None:
    gw = await start_gateway(gateway_config("http://127.0.0.1:9/v1"))  # discard port: refused
    with pytest.raises(openai.InternalServerError) as exc:
        await gw.sdk().chat.completions.create(model="fake-model", messages=MSG)
    assert exc.value.status_code == 502
    body: Any = exc.value.body
    assert body["code"] == "upstream_unavailable"
    assert "127.0.0.1" not in body["message"]  # no internal URLs in errors


async def test_provider_timeout_is_504(gateway: Gateway) -> None:
    with pytest.raises(openai.InternalServerError) as exc:
        await gateway.sdk().chat.completions.create(model="fake-hang", messages=MSG)
    assert exc.value.status_code == 504
    assert gateway.settler.records[-1].status == 504


async def test_provider_non_json_is_502(gateway: Gateway) -> None:
    with pytest.raises(openai.InternalServerError) as exc:
        await gateway.sdk().chat.completions.create(model="fake-garbage", messages=MSG)
    assert exc.value.status_code == 502


async def test_no_stack_trace_on_unexpected_error(gateway: Gateway) -> None:
    status, _, payload = await _post(
        gateway, '{"model": "echo", "messages": [{"role": "user", "content": "x"}], "n": 1.5}'
    )
    assert status == 400
    assert "Traceback" not in str(payload)
