"""Pure translation between OpenAI's shapes and Gemini's ``generateContent``.

No I/O: ``to_gemini`` builds the request, ``from_gemini`` turns a
GenerateContentResponse into an OpenAI ``chat.completion`` (or
``text_completion``), ``to_gemini_embed``/``from_gemini_embed`` do the same for
``batchEmbedContents``; the stream translator in ``gemini.py`` reuses the
candidate and usage mapping.

Usage: ``prompt_tokens`` = ``promptTokenCount`` (+ ``toolUsePromptTokenCount``),
``completion_tokens`` = ``candidatesTokenCount`` + ``thoughtsTokenCount``;
thoughts are kept as ``completion_tokens_details.reasoning_tokens`` and
``cachedContentTokenCount`` (already inside ``promptTokenCount``) as
``prompt_tokens_details.cached_tokens``.

Tool call ids: Gemini calls functions by name, so an id is made up per call
(``call_<request>_<choice>_<n>``) unless Gemini sent one; a part's
``thoughtSignature`` rides along in the id after ``~ts~`` so it can be handed
back on the next turn, as Gemini's thinking models require.
"""

from __future__ import annotations

import base64
import mimetypes
import re
import struct
from typing import Any

import orjson

from proxy.core.errors import InvalidRequest
from proxy.providers.translated import function_call, positive_int, prompt_text

Json = dict[str, Any]
SIGNATURE_MARK = "~ts~"
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)", re.DOTALL)
# Gemini finish reasons that mean "filtered"; anything unknown counts as "stop".
_FILTERED = frozenset(
    ("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY")
)
_TOOL_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}


# -- request ------------------------------------------------------------------


def _media(url: Any, where: str) -> Json:
    if isinstance(url, str):
        m = _DATA_URL.fullmatch(url)
        if m:
            return {"inlineData": {"mimeType": m.group(1), "data": m.group(2)}}
        if url.startswith(("https://", "http://")):
            mime = mimetypes.guess_type(url.split("?")[0])[0] or "image/jpeg"
            return {"fileData": {"mimeType": mime, "fileUri": url}}
    raise InvalidRequest("Image URLs must be https:// URLs or base64 data URLs.", param=where)


def _part(part: Any, where: str) -> Json:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"text": part["text"]}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        return _media(url, f"{where}.image_url")
    if kind == "input_audio" and isinstance(part.get("input_audio"), dict):
        audio = part["input_audio"]
        return {
            "inlineData": {"mimeType": f"audio/{audio.get('format')}", "data": audio.get("data")}
        }
    raise InvalidRequest(f"Content part type {kind!r} is not supported by Gemini.", param=where)


def _parts(content: Any, where: str) -> list[Json]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if isinstance(content, list):
        return [_part(p, f"{where}[{i}]") for i, p in enumerate(content)]
    if content is None:
        return []
    raise InvalidRequest("Message content must be a string or an array.", param=where)


def _model_parts(msg: Json, where: str, names: dict[str, str]) -> list[Json]:
    parts = [p for p in _parts(msg.get("content"), f"{where}.content") if "text" in p]
    for j, call in enumerate(msg.get("tool_calls") or ()):
        name, args = function_call(call, f"{where}.tool_calls[{j}]")
        part: Json = {"functionCall": {"name": name, "args": args}}
        call_id = str(call.get("id") or "")
        if SIGNATURE_MARK in call_id:
            part["thoughtSignature"] = call_id.rpartition(SIGNATURE_MARK)[2]
        names[call_id] = name
        parts.append(part)
    return parts


def _function_response(msg: Json, where: str, names: dict[str, str]) -> list[Json]:
    name = names.get(str(msg.get("tool_call_id")))
    if name is None:
        raise InvalidRequest(
            "A tool message must answer a tool call of an earlier assistant message.",
            param=f"{where}.tool_call_id",
        )
    text = "".join(p.get("text", "") for p in _parts(msg.get("content"), f"{where}.content"))
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        parsed = None
    response = parsed if isinstance(parsed, dict) else {"content": text}
    return [{"functionResponse": {"name": name, "response": response}}]


def _append(contents: list[Json], role: str, parts: list[Json]) -> None:
    # Parallel function responses belong in one turn, as Gemini sent the calls.
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    elif parts:
        contents.append({"role": role, "parts": parts})


def split_messages(messages: list[Any]) -> tuple[list[Json], list[Json]]:
    """(system instruction parts, contents) from OpenAI messages."""
    system: list[Json] = []
    contents: list[Json] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, as the turns go
    for i, msg in enumerate(messages):
        where, role = f"messages[{i}]", msg.get("role")
        if role in ("system", "developer"):
            system.extend(_parts(msg.get("content"), f"{where}.content"))
        elif role == "user":
            _append(contents, "user", _parts(msg.get("content"), f"{where}.content"))
        elif role == "assistant":
            _append(contents, "model", _model_parts(msg, where, names))
        elif role == "tool":
            _append(contents, "user", _function_response(msg, where, names))
        else:
            raise InvalidRequest(f"Role {role!r} is not supported.", param=f"{where}.role")
    return system, contents


def _generation_config(body: Json) -> Json:
    pairs = (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("top_k", "topK"),
        ("n", "candidateCount"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
        ("seed", "seed"),
    )
    out: Json = {ours: body[theirs] for theirs, ours in pairs if body.get(theirs) is not None}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens:
        out["maxOutputTokens"] = max_tokens
    stop = body.get("stop")
    if stop:
        out["stopSequences"] = [stop] if isinstance(stop, str) else stop
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("json_object", "json_schema"):
        out["responseMimeType"] = "application/json"
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")  # type: ignore[union-attr]
        if not isinstance(schema, dict):
            raise InvalidRequest("'json_schema.schema' must be an object.", param="response_format")
        out["responseJsonSchema"] = schema
    return out


def _declaration(tool: Any, where: str) -> Json:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or tool.get("type") != "function" or "name" not in fn:
        raise InvalidRequest("Only function tools are supported.", param=where)
    out: Json = {"name": fn["name"]}
    if fn.get("description"):
        out["description"] = fn["description"]
    if fn.get("parameters"):
        out["parametersJsonSchema"] = fn["parameters"]
    return out


def _tool_config(choice: Any) -> Json | None:
    if choice is None:
        return None
    if isinstance(choice, str) and choice in _TOOL_MODES:
        return {"functionCallingConfig": {"mode": _TOOL_MODES[choice]}}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        names = [choice["function"].get("name")]
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": names}}
    raise InvalidRequest("Unsupported 'tool_choice'.", param="tool_choice")


def to_gemini(body: Json, endpoint: str) -> Json:
    """An OpenAI chat (or legacy completions) body as a generateContent body."""
    if endpoint == "completions":
        messages: list[Any] = [{"role": "user", "content": prompt_text(body)}]
    else:
        messages = list(body.get("messages") or [])
    system, contents = split_messages(messages)
    out: Json = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    config = _generation_config(body)
    if config:
        out["generationConfig"] = config
    tools = body.get("tools") if endpoint == "chat" else None
    if tools:
        decls = [_declaration(t, f"tools[{i}]") for i, t in enumerate(tools)]
        out["tools"] = [{"functionDeclarations": decls}]
        tool_config = _tool_config(body.get("tool_choice"))
        if tool_config is not None:
            out["toolConfig"] = tool_config
    return out


# -- response -----------------------------------------------------------------


def usage_json(meta: Any) -> Json | None:
    """Gemini ``usageMetadata`` as OpenAI's ``usage`` (see the module docstring)."""
    if not isinstance(meta, dict):
        return None
    prompt = positive_int(meta.get("promptTokenCount")) + positive_int(
        meta.get("toolUsePromptTokenCount")
    )
    thoughts = positive_int(meta.get("thoughtsTokenCount"))
    completion = positive_int(meta.get("candidatesTokenCount")) + thoughts
    out: Json = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    cached = positive_int(meta.get("cachedContentTokenCount"))
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    if thoughts:
        out["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    return out


def finish_reason(reason: Any, called_tools: bool, endpoint: str) -> str:
    if reason == "MAX_TOKENS":
        return "length"
    if reason in _FILTERED:
        return "content_filter"
    return "tool_calls" if called_tools and endpoint == "chat" else "stop"


def tool_call(part: Json, call_id: str) -> Json:
    """A ``functionCall`` part as an OpenAI tool call (whole, never in pieces)."""
    fc = part["functionCall"]
    if isinstance(fc.get("id"), str) and fc["id"]:
        call_id = fc["id"]
    if isinstance(part.get("thoughtSignature"), str):
        call_id += SIGNATURE_MARK + part["thoughtSignature"]
    args = orjson.dumps(fc.get("args") or {}).decode()
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": fc.get("name"), "arguments": args},
    }


def call_id(chat_id: str, choice: int, n: int) -> str:
    return f"call_{chat_id.partition('-')[2]}_{choice}_{n}"


def candidate_parts(candidate: Json) -> list[Json]:
    """The answer's parts, thoughts left out (their tokens are in the usage)."""
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    return [p for p in parts or () if isinstance(p, dict) and not p.get("thought")]


def _choice(cand: Json, index: int, chat_id: str, endpoint: str) -> Json:
    parts = candidate_parts(cand)
    text = "".join(p["text"] for p in parts if isinstance(p.get("text"), str))
    fcs = [p for p in parts if isinstance(p.get("functionCall"), dict)]
    calls = [tool_call(p, call_id(chat_id, index, n)) for n, p in enumerate(fcs)]
    finish = finish_reason(cand.get("finishReason"), bool(calls), endpoint)
    if endpoint == "completions":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    content = text or (None if calls or finish == "content_filter" else "")
    message: Json = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}


def from_gemini(resp: Json, *, chat_id: str, created: int, model: str, endpoint: str) -> Json:
    """A GenerateContentResponse as OpenAI's ``chat.completion`` / ``text_completion``.
    A prompt blocked by safety settings (no candidates) is one empty choice
    with ``finish_reason: content_filter``."""
    cands = [c for c in resp.get("candidates") or () if isinstance(c, dict)]
    if not cands:
        cands = [{"finishReason": "SAFETY"}]
    choices = [_choice(c, c.get("index", i), chat_id, endpoint) for i, c in enumerate(cands)]
    kind = "text_completion" if endpoint == "completions" else "chat.completion"
    out: Json = {"id": chat_id, "object": kind, "created": created}
    out.update(model=resp.get("modelVersion") or model, choices=choices)
    usage = usage_json(resp.get("usageMetadata"))
    if usage is not None:
        out["usage"] = usage
    return out


# -- embeddings ---------------------------------------------------------------


def embed_inputs(body: Json) -> list[str]:
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
        raise InvalidRequest("Gemini embeds text; token arrays are not supported.", param="input")
    return inputs


def to_gemini_embed(body: Json, model: str) -> Json:
    requests = []
    for text in embed_inputs(body):
        req: Json = {"model": f"models/{model}", "content": {"parts": [{"text": text}]}}
        if body.get("dimensions"):
            req["outputDimensionality"] = body["dimensions"]
        requests.append(req)
    return {"requests": requests}


def _encode(values: list[float], as_base64: bool) -> Any:
    if not as_base64:
        return values
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def from_gemini_embed(resp: Json, *, model: str, as_base64: bool, prompt_tokens: int) -> Json:
    """``batchEmbedContents`` as OpenAI's embeddings list; ``base64`` packs
    little-endian float32 like OpenAI. ``prompt_tokens`` is what to report
    when Gemini reports no usage (it usually does not)."""
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(e.get("values") or [], as_base64)}
        for i, e in enumerate(resp.get("embeddings") or ())
    ]
    reported = usage_json(resp.get("usageMetadata"))
    tokens = reported["prompt_tokens"] if reported else prompt_tokens
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}
