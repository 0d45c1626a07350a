"""A chat completion stream as the Responses API's event sequence.

    response.created, response.in_progress,
    per output item: response.output_item.added,
      a message: response.content_part.added, response.output_text.delta…,
                 response.output_text.done, response.content_part.done
      a function call: response.function_call_arguments.delta…, .done
    response.output_item.done; then response.completed (or .incomplete)
    with the usage of the chat stream's usage chunk.

Every event is ``event: <type>`` plus its JSON with a ``sequence_number``
one more than the last. Bytes may arrive split anywhere: a partial event
waits for the rest, so a stream cut at any byte gives the same events.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from proxy.core.errors import GatewayError, RateLimited
from proxy.core.sse import event_data
from proxy.doors import responses_object as obj
from proxy.doors.responses_request import Asked

Json = dict[str, Any]


class ResponsesStream:
    """One streamed answer; ``done`` gets the finished Response object."""

    def __init__(self, ids: obj.Ids, ask: Asked, done: Callable[[Json], None]) -> None:
        self.ids, self.ask, self._done = ids, ask, done
        self.model = ask.model
        self._buf = b""
        self._seq = 0
        self._out: list[bytes] = []
        self.output: list[Json] = []
        self._started = self._finished = False
        self._text: Json | None = None  # the open message item
        self._call: Json | None = None  # the open function call item
        self._calls: dict[int, Json] = {}  # chat tool-call index → its item
        self.usage: Json | None = None
        self.finish: str | None = None

    # ---- chat in -----------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        buf = self._buf + data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        start = 0
        while (end := buf.find(b"\n\n", start)) >= 0:
            payload = event_data(buf[start : end + 2])
            start = end + 2
            if payload is not None:
                self._chat_event(payload)
        self._buf = buf[start:]
        out, self._out = b"".join(self._out), []
        return out

    def _chat_event(self, payload: bytes) -> None:
        if self._finished:
            return
        if payload == b"[DONE]":
            self._finish()
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(chunk, dict):
            return
        self._start(chunk)
        if "error" in chunk and not chunk.get("choices"):
            return  # the relay's error event, followed by fail()
        if chunk.get("usage"):
            self.usage = obj.usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # n > 1 has no Responses equivalent: the first answer
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._text_delta(str(delta["content"]))
            for call in delta.get("tool_calls") or []:
                self._call_delta(call)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    # ---- Responses out -----------------------------------------------------

    def _emit(self, kind: str, **fields: Any) -> None:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        self._out.append(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")

    def _response(self, status: str, error: Json | None = None) -> Json:
        return obj.response(
            self.ids, self.ask, self.model, status, self.output, self.usage, self.finish, error
        )

    def _start(self, chunk: Json | None = None) -> None:
        if self._started:
            return
        self._started = True
        if chunk is not None and isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        self._emit("response.created", response=self._response("in_progress"))
        self._emit("response.in_progress", response=self._response("in_progress"))

    def _add(self, item: Json) -> int:
        self.output.append(item)
        index = len(self.output) - 1
        self._emit("response.output_item.added", output_index=index, item=item)
        return index

    def _text_delta(self, text: str) -> None:
        if self._text is None:
            self._close_call()
            item = obj.message(self.ids.item("msg"), [], "in_progress")
            self._text = {"item": item, "index": self._add(item), "text": []}
            part = obj.text_part("")
            self._emit(
                "response.content_part.added",
                item_id=item["id"],
                output_index=self._text["index"],
                content_index=0,
                part=part,
            )
        self._text["text"].append(text)
        self._emit(
            "response.output_text.delta",
            item_id=self._text["item"]["id"],
            output_index=self._text["index"],
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def _close_text(self) -> None:
        if self._text is None:
            return
        opened, self._text = self._text, None
        item, index = opened["item"], opened["index"]
        text = "".join(opened["text"])
        part = obj.text_part(text)
        common = {"item_id": item["id"], "output_index": index, "content_index": 0}
        self._emit("response.output_text.done", **common, text=text, logprobs=[])
        self._emit("response.content_part.done", **common, part=part)
        item = obj.message(item["id"], [part])
        self.output[index] = item
        self._emit("response.output_item.done", output_index=index, item=item)

    def _call_delta(self, call: Json) -> None:
        n = int(call.get("index", 0))
        fn = call.get("function") or {}
        known = self._calls.get(n)
        if known is None:
            self._close_text()
            self._close_call()
            call_id = str(call.get("id") or self.ids.item("call"))
            item = obj.function_call(
                self.ids.item("fc"), call_id, str(fn.get("name") or ""), "", "in_progress"
            )
            known = {"item": item, "index": self._add(item), "args": []}
            self._calls[n] = self._call = known
        args = fn.get("arguments")
        if not args:
            return
        known["args"].append(str(args))
        if known is self._call:
            self._emit(
                "response.function_call_arguments.delta",
                item_id=known["item"]["id"],
                output_index=known["index"],
                delta=str(args),
            )
        else:  # a late fragment of an earlier call: kept for the final object
            item = known["item"]
            self.output[known["index"]] = {**item, "arguments": "".join(known["args"])}

    def _close_call(self) -> None:
        if self._call is None:
            return
        opened, self._call = self._call, None
        item, index = opened["item"], opened["index"]
        args = "".join(opened["args"])
        self._emit(
            "response.function_call_arguments.done",
            item_id=item["id"],
            name=item["name"],
            output_index=index,
            arguments=args,
        )
        item = {**item, "arguments": args, "status": "completed"}
        self.output[index] = item
        self._emit("response.output_item.done", output_index=index, item=item)

    def _finish(self) -> None:
        self._start()
        self._close_text()
        self._close_call()
        self._finished = True
        final = self._response("completed")
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        self._emit(kind, response=final)
        self._done(final)

    def fail(self, exc: GatewayError) -> bytes:
        """After the headers: ``response.failed`` (the response so far, its
        error), or a bare ``error`` event when nothing had started."""
        if self._finished:
            return b""
        self._finished = True
        if not self._started:
            self._emit("error", code=exc.error_code, message=exc.message, param=exc.param)
        else:
            code = "rate_limit_exceeded" if isinstance(exc, RateLimited) else "server_error"
            error = {"code": code, "message": exc.message}
            self._emit("response.failed", response=self._response("failed", error))
        out, self._out = b"".join(self._out), []
        return out
