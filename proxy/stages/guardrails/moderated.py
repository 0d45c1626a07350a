"""Output moderation of a stream: the model's text moderated in segments.

The filter sees the provider's events before the policy's local output
checks and ``restore`` (it hands what it releases to that ``inner``
filter), so the moderation provider reads the model's own text, never the
caller's restored values. Text is collected per segment (``SEGMENT``
characters of content, legacy ``text`` and tool-call arguments), and the
stream's end (a finish or ``[DONE]``) closes the last one. ``before`` keeps
a segment's events until its verdict; ``parallel`` sends them at once,
moderates beside the stream and holds only the end until every verdict is
in (see ``moderation`` for what each promises). A verdict task is one of
``Exchange.checks``, so a client that leaves cancels it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from proxy.core.errors import ContentFiltered, GatewayError
from proxy.core.sse import event_data
from proxy.core.tasks import TaskGroup
from proxy.stages.base import AsyncChunkFilter, ChunkFilter, Exchange, Moderator
from proxy.stages.guardrails.moderation import SEGMENT, ModerationCheck
from proxy.stages.guardrails.scan import Scan
from proxy.stages.guardrails.verdict import verdict


class ModeratedStream(AsyncChunkFilter):
    def __init__(
        self,
        check: ModerationCheck,
        moderator: Moderator | None,
        tasks: TaskGroup | None,
        ex: Exchange,
        scan: Scan,
        inner: ChunkFilter | None,
    ) -> None:
        self.check = check
        self.moderator = moderator
        self.tasks = tasks
        self.ex = ex
        self.scan = scan
        self.inner = inner
        self._text: list[str] = []  # the model's text not yet sent to moderation
        self._size = 0
        self._held: list[bytes] = []  # before: events waiting for their segment's verdict
        self._last: dict[str, Any] = {}  # the last chunk's id, model, ...: for the tail

    async def feed_async(self, data: bytes) -> bytes:
        out: list[bytes] = []
        try:
            return await self._feed(data, out)
        except ContentFiltered as exc:
            # What this read released before the refusal still goes first.
            released = b"".join(out)
            if self.inner is not None and released:
                # A block by the local checks in that text ends the stream first.
                released = self.inner.feed(released)
            exc.stream_tail = released + exc.stream_tail
            raise

    async def _feed(self, data: bytes, out: list[bytes]) -> bytes:
        start = 0
        parallel = self.check.mode == "parallel" and self.tasks is not None
        while (end := data.find(b"\n\n", start)) >= 0:
            event = data[start : end + 2]
            start = end + 2
            final = self._read(event)
            if parallel:
                self._raise_if_refused()
                if final:
                    self._spawn()
                    for task in self._tasks():
                        self._refuse(await task)
                elif self._size >= SEGMENT:
                    self._spawn()
                out.append(event)
            else:
                self._held.append(event)
                if final or self._size >= SEGMENT:
                    self._refuse(await self._segment_verdict())
                    out.extend(self._held)
                    self._held.clear()
        if start < len(data):
            (out if parallel else self._held).append(data[start:])
        released = b"".join(out)
        if self.inner is not None and released:
            return self.inner.feed(released)
        return released

    def _read(self, event: bytes) -> bool:
        """Collect the event's text; True when it ends the answer."""
        payload = event_data(event)
        if payload is None:
            return False
        if payload == b"[DONE]":
            return True
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            return False
        self._last = obj
        final = False
        for choice in obj["choices"]:
            if not isinstance(choice, dict):
                continue
            final = final or choice.get("finish_reason") is not None
            self._take(choice.get("text"))
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._take(delta.get("content"))
                for call in delta.get("tool_calls") or ():
                    func = call.get("function") if isinstance(call, dict) else None
                    if isinstance(func, dict):
                        self._take(func.get("arguments"))
        return final

    def _take(self, text: Any) -> None:
        if isinstance(text, str) and text:
            self._text.append(text)
            self._size += len(text)

    def _next_segment(self) -> list[str]:
        text = "".join(self._text)
        self._text.clear()
        self._size = 0
        return [text] if text else []

    async def _segment_verdict(self) -> GatewayError | None:
        texts = self._next_segment()
        if not texts:
            return None
        return await verdict(self.check, self.moderator, texts, self.ex.record, self.scan, "output")

    def _spawn(self) -> None:
        texts = self._next_segment()
        if texts and self.tasks is not None:
            pending = verdict(
                self.check, self.moderator, texts, self.ex.record, self.scan, "output"
            )
            name = f"output moderation {self.ex.record.request_id}"
            self.ex.checks.append(self.tasks.spawn(pending, name=name))

    def _tasks(self) -> list[asyncio.Future[GatewayError | None]]:
        return list(self.ex.checks)

    def _raise_if_refused(self) -> None:
        for task in self.ex.checks:
            if task.done() and not task.cancelled():
                self._refuse(task.result())

    def _refuse(self, refusal: GatewayError | None) -> None:
        if refusal is None:
            return
        if isinstance(refusal, ContentFiltered):
            base = {
                k: v for k, v in self._last.items() if k in ("id", "object", "created", "model")
            }
            choice: dict[str, Any] = {"index": 0, "finish_reason": "content_filter"}
            if base.get("object") == "text_completion":
                choice["text"] = ""
            else:
                choice["delta"] = {}
            refusal.stream_tail = b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"
        raise refusal
