"""The parse stage: a size-capped body, decoded once, checked for OpenAI's shape.

Only what the gateway relies on is checked (types of the fields it reads and
OpenAI's own required fields); every other field is left for the provider, so
new OpenAI parameters pass through without a gateway release.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy.core.errors import BodyTooLarge, InvalidRequest
from proxy.providers.base import GENERATIVE, Endpoint
from proxy.providers.moderation import DEFAULT_MODEL

MAX_MODEL_CHARS = 256
MAX_USER_CHARS = 256


async def read_json(request: web.Request, max_bytes: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(max_bytes) from None
    if len(raw) > max_bytes:
        raise _too_large(max_bytes)
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc.msg} "
            f"(line {exc.lineno}, column {exc.colno})."
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def _too_large(max_bytes: int) -> BodyTooLarge:
    return BodyTooLarge(f"The request body exceeds the limit of {max_bytes} bytes.")


def _type_error(param: str, expected: str, value: Any) -> InvalidRequest:
    got = type(value).__name__ if value is not None else "null"
    names = {
        "str": "string",
        "dict": "object",
        "list": "array",
        "int": "integer",
        "float": "number",
        "bool": "boolean",
    }
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {names.get(got, got)}.",
        param=param,
        code="invalid_type",
    )


def _require(body: dict[str, Any], param: str) -> Any:
    if param not in body or body[param] is None:
        raise InvalidRequest(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    return body[param]


def _optional(
    body: dict[str, Any], param: str, types: type | tuple[type, ...], expected: str
) -> None:
    value = body.get(param)
    if value is None:
        return
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _type_error(param, expected, value)
    if not isinstance(value, types):
        raise _type_error(param, expected, value)


def _model(body: dict[str, Any]) -> str:
    model = _require(body, "model")
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if not model.strip():
        raise InvalidRequest("'model' must not be empty.", param="model")
    _plain(model, "model", MAX_MODEL_CHARS)
    return model


def _plain(value: str, param: str, limit: int) -> None:
    """Refuse a name the gateway stores, logs or puts in a header when it is
    longer than ``limit`` or holds a control, format or separator character:
    Postgres refuses NUL, a CR/LF breaks a header, and a megabyte is no name."""
    if len(value) > limit:
        raise InvalidRequest(
            f"'{param}' is too long: {len(value)} characters, at most {limit}.",
            param=param,
            code="string_above_max_length",
        )
    if not value.isprintable():
        raise InvalidRequest(
            f"'{param}' must not contain control or invisible characters.",
            param=param,
            code="invalid_value",
        )


def _common(body: dict[str, Any]) -> None:
    _optional(body, "stream", bool, "a boolean")
    _optional(body, "stream_options", dict, "an object")
    _optional(body, "n", int, "an integer")
    _optional(body, "max_tokens", int, "an integer")
    _optional(body, "max_completion_tokens", int, "an integer")
    _optional(body, "temperature", (int, float), "a number")
    _optional(body, "top_p", (int, float), "a number")
    for param in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(param)
        if isinstance(value, int) and value < 1:
            raise InvalidRequest(f"'{param}' must be at least 1.", param=param)


def _user(body: dict[str, Any]) -> None:
    _optional(body, "user", str, "a string")
    if isinstance(body.get("user"), str):
        _plain(body["user"], "user", MAX_USER_CHARS)


def _messages(body: dict[str, Any]) -> None:
    messages = _require(body, "messages")
    if not isinstance(messages, list):
        raise _type_error("messages", "an array", messages)
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _type_error(f"messages[{i}]", "an object", msg)
        role = msg.get("role")
        if not isinstance(role, str):
            raise InvalidRequest(
                f"Missing or invalid 'role' in messages[{i}].", param=f"messages[{i}].role"
            )


def _prompt(body: dict[str, Any], param: str) -> None:
    value = _require(body, param)
    if isinstance(value, str):
        return
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(v, str | int) or (isinstance(v, list) and all(isinstance(t, int) for t in v))
            for v in value
        )
    ):
        return
    raise _type_error(param, "a string or an array of strings or token arrays", value)


def _moderation_input(body: dict[str, Any]) -> None:
    """A string, or a non-empty array of strings or of ``{"type": ...}`` parts."""
    value = _require(body, "input")
    if isinstance(value, str):
        return
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return
        if all(isinstance(v, dict) and isinstance(v.get("type"), str) for v in value):
            return
    raise _type_error("input", "a string or an array of strings or of input parts", value)


def validate(body: dict[str, Any], endpoint: Endpoint) -> str:
    """Check the body for ``endpoint``; return the requested model name."""
    if endpoint == "moderations" and body.get("model") is None:
        body["model"] = DEFAULT_MODEL  # optional there, as on OpenAI
    model = _model(body)
    _user(body)
    if endpoint == "chat":
        _messages(body)
        _common(body)
    elif endpoint == "completions":
        _prompt(body, "prompt")
        _common(body)
    elif endpoint == "moderations":
        _moderation_input(body)
    else:
        _prompt(body, "input")
        _optional(body, "dimensions", int, "an integer")
        _optional(body, "encoding_format", str, "a string")
    return model


def wants_stream(body: dict[str, Any], endpoint: Endpoint) -> bool:
    return endpoint in GENERATIVE and body.get("stream") is True


def choices(body: dict[str, Any]) -> int:
    """How many choices the answer has (``n``)."""
    n = body.get("n")
    return n if isinstance(n, int) and n > 1 else 1


def wants_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True
