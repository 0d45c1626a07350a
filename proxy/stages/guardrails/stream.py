"""The output guardrail of a stream: a chunk filter over whole SSE events.

Each choice's text (``delta.content``, or ``text`` for legacy completions)
and each of its tool calls' ``function.arguments`` go through their own
``HeldText`` (a key split across argument deltas is caught like one split
across content deltas); an event carries what was released, and a
choice's finish event also carries the rest it held. An event left with
nothing to say (its text all held back, no finish, no other delta field, no
usage) is not sent: the client gets the same text in fewer events, and the
gateway saves a write per held event. A block mid-stream
raises ``ContentFiltered`` with the safe text and a ``content_filter``
finish as its ``stream_tail``: the relay writes that tail, then the error
event, and closes the upstream (the provider stops generating).
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.core.errors import ContentFiltered
from proxy.core.sse import event_data
from proxy.stages.guardrails.config import Policy
from proxy.stages.guardrails.held import Blocked, HeldText
from proxy.stages.guardrails.scan import Scan, refusal


class GuardStream:
    __slots__ = ("_held", "_last", "policy", "scan")

    def __init__(self, policy: Policy, scan: Scan) -> None:
        self.policy = policy
        self.scan = scan
        # Per choice index; per (choice index, tool call index) for arguments.
        self._held: dict[int | tuple[int, int], HeldText] = {}
        self._last: dict[str, Any] = {}  # the last chunk's id, model, ...: for a flush chunk

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        start = 0
        while (end := data.find(b"\n\n", start)) >= 0:
            event = data[start : end + 2]
            start = end + 2
            try:
                out.append(self._event(event))
            except Blocked as blocked:
                raise self._stop(blocked, out) from None
        if start < len(data):
            out.append(data[start:])
        return b"".join(out)

    def _held_for(self, index: int | tuple[int, int]) -> HeldText:
        held = self._held.get(index)
        if held is None:
            p = self.policy
            held = self._held[index] = HeldText(self.scan, p.output, p.hold_back, p.restore)
        return held

    def _event(self, event: bytes) -> bytes:
        payload = event_data(event)
        if payload is None:
            return event
        if payload == b"[DONE]":
            return self._flush_all() + event
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(obj, dict) or not obj.get("choices"):
            return event
        self._last = obj
        empty = True
        for choice in obj["choices"]:
            if isinstance(choice, dict):
                empty = self._choice(choice) and empty
        if empty and obj.get("usage") is None:
            return b""  # all its text is held back: an event that says nothing is not sent
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def _choice(self, choice: dict[str, Any]) -> bool:
        """Filter one choice's text in place; True when nothing is left in it
        (no text released, no finish, nothing but the text in its delta)."""
        raw_index = choice.get("index", 0)
        index = raw_index if isinstance(raw_index, int) else 0
        key, holder = _text_slot(choice)
        held = self._held_for(index)
        text = holder.get(key) if holder is not None else None
        finished = choice.get("finish_reason") is not None
        try:
            released = held.push(text) if isinstance(text, str) else ""
            calls = holder.get("tool_calls") if holder is not None and key == "content" else None
            if isinstance(calls, list):
                for call in calls:
                    self._arguments(index, call)
            if finished:
                released += held.finish()
                del self._held[index]
                rest = self._finish_tools(index)
                if rest:
                    delta = choice.setdefault("delta", {})
                    if isinstance(delta, dict):
                        delta.setdefault("tool_calls", []).extend(rest)
        except Blocked as blocked:
            blocked.index = index
            raise
        if holder is not None and (isinstance(text, str) or released):
            holder[key] = released
        return (
            not released
            and not finished
            and choice.get("logprobs") is None
            and (holder is None or holder is choice or all(k == "content" for k in holder))
        )

    def _arguments(self, index: int, call: Any) -> None:
        """One tool call's ``function.arguments`` delta, through its own hold."""
        func = call.get("function") if isinstance(call, dict) else None
        args = func.get("arguments") if isinstance(func, dict) else None
        tool = call.get("index", 0) if isinstance(call, dict) else 0
        if not isinstance(args, str) or not isinstance(tool, int) or func is None:
            return
        try:
            func["arguments"] = self._held_for((index, tool)).push(args)
        except Blocked as blocked:
            blocked.tool = tool
            raise

    def _finish_tools(self, index: int) -> list[dict[str, Any]]:
        """The choice ended: the arguments its tool calls still held, checked."""
        out = []
        for slot in sorted(k for k in self._held if isinstance(k, tuple) and k[0] == index):
            held = self._held.pop(slot)
            try:
                rest = held.finish()
            except Blocked as blocked:
                blocked.tool = slot[1]
                raise
            if rest:
                out.append({"index": slot[1], "function": {"arguments": rest}})
        return out

    def _flush_all(self) -> bytes:
        """``[DONE]`` with choices still open: their held text first."""
        parts = []
        for index in sorted({k if isinstance(k, int) else k[0] for k in self._held}):
            held = self._held.pop(index, None)
            rest = held.finish() if held is not None else ""
            delta: dict[str, Any] = {"content": rest} if rest else {}
            tools = self._finish_tools(index)
            if tools:
                delta["tool_calls"] = tools
            if delta:
                parts.append(self._chunk(index, delta, None))
        self._held.clear()
        return b"".join(parts)

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None) -> bytes:
        base = {k: v for k, v in self._last.items() if k in ("id", "object", "created", "model")}
        legacy = base.get("object") == "text_completion"
        choice: dict[str, Any] = {"index": index, "finish_reason": finish}
        if legacy:
            choice["text"] = delta.get("content", "")
        else:
            choice["delta"] = delta
        return b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"

    def _stop(self, blocked: Blocked, sent: list[bytes]) -> ContentFiltered:
        index = blocked.index
        exc = refusal(blocked.rule, "output")
        tail = list(sent)
        if blocked.released and blocked.tool is not None:
            call = {"index": blocked.tool, "function": {"arguments": blocked.released}}
            tail.append(self._chunk(index, {"tool_calls": [call]}, None))
        elif blocked.released:
            tail.append(self._chunk(index, {"content": blocked.released}, None))
        tail.append(self._chunk(index, {}, "content_filter"))
        self._held.clear()
        exc.stream_tail = b"".join(tail)
        return exc


def _text_slot(choice: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """Where this choice's text is: ``delta.content``, or ``text`` (legacy)."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return "content", delta
    if "text" in choice:
        return "text", choice
    return "content", None
