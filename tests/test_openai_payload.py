"""What an OpenAI-wire provider is sent: the client's body with only the
adapter's edits (model, gateway fields dropped, the completion-limit
parameter, usage on streams), the same bytes whether or not the body needed
an edit, and the request's own body never changed."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import orjson

from proxy.config.model import ProviderConfig
from proxy.providers.base import Call
from proxy.providers.openai import _GATEWAY_FIELDS, OpenAIProvider, _token_limit


def reference_payload(call: Call) -> bytes:
    """The adapter's contract written out plainly: a copy, every edit applied."""
    body = {k: v for k, v in call.body.items() if k not in _GATEWAY_FIELDS}
    body["model"] = call.model
    if call.token_limit is not None and call.endpoint == "chat":
        _token_limit(body, call.token_limit)
    if call.stream:
        opts = body.get("stream_options")
        body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return orjson.dumps(body)


def provider() -> OpenAIProvider:
    cfg = ProviderConfig("up", "openai", base_url="http://127.0.0.1:1/v1")
    return OpenAIProvider(cfg, None)  # type: ignore[arg-type]  # payload() sends nothing


def bodies() -> list[dict[str, Any]]:
    base = {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}
    extras: list[dict[str, Any]] = [
        {},
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"stream": True, "stream_options": {"include_usage": False, "other": 1}},
        {"stream_options": {"other": 1, "include_usage": True}},
        {"stream_options": "not an object"},
        {"max_tokens": 5},
        {"max_completion_tokens": 7},
        {"max_tokens": 9, "max_completion_tokens": 3},
        {"api_key": "sk-client", "temperature": 0.2},
        {"base_url": "http://elsewhere", "api_base": "http://elsewhere"},
    ]
    out = []
    for extra in extras:
        out.append({**base, **extra})
        # the same fields before the model: the key order must survive
        out.append({**extra, **base})
    return out


def test_payload_is_the_reference_edit_of_every_body() -> None:
    adapter = provider()
    for body, model, stream, endpoint, limit in itertools.product(
        bodies(),
        ("gpt-x", "gpt-x-2024"),
        (False, True),
        ("chat", "completions"),
        (None, "max_tokens", "max_completion_tokens"),
    ):
        before = copy.deepcopy(body)
        call = Call(endpoint, body, model, stream, "req_1", token_limit=limit)  # type: ignore[arg-type]
        assert adapter.payload(call) == reference_payload(call), (body, model, stream, limit)
        assert body == before and list(body) == list(before)  # the request's body untouched


def test_an_unedited_body_goes_as_it_was_parsed() -> None:
    """No edit needed: the payload is the body's own encoding, key order and all."""
    body = {
        "messages": [{"role": "user", "content": "héllo"}],
        "stream": True,
        "model": "gpt-x",
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 20,
    }
    call = Call("chat", body, "gpt-x", True, "req_1", token_limit="max_completion_tokens")
    assert provider().payload(call) == orjson.dumps(body)


def test_an_edit_is_made_on_a_copy() -> None:
    body = {"model": "public", "stream": True, "api_key": "sk-x", "max_tokens": 4}
    call = Call("chat", body, "served", True, "req_1", token_limit="max_completion_tokens")
    sent = orjson.loads(provider().payload(call))
    assert sent == {
        "model": "served",
        "stream": True,
        "max_completion_tokens": 4,
        "stream_options": {"include_usage": True},
    }
    assert body == {"model": "public", "stream": True, "api_key": "sk-x", "max_tokens": 4}


def test_every_gateway_field_is_dropped() -> None:
    for field in _GATEWAY_FIELDS:
        body = {"model": "gpt-x", "messages": [], field: "http://elsewhere"}
        call = Call("chat", body, "gpt-x", False, "req_1")
        assert field not in orjson.loads(provider().payload(call))
