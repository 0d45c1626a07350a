"""What every front door shares: the request it translates, its error shape.

A door is made per request (it may keep state for its stream: ids, sequence
numbers, open blocks) and satisfies ``proxy.stages.base.Door``: the pipeline
calls ``to_chat`` on the client's body, runs the chat request, and hands the
answer to ``reply`` (JSON) or to the ``stream()`` translation (SSE).

Errors: the front middleware renders every ``GatewayError`` on a door's path
with the door's ``error`` (Anthropic's clients expect Anthropic's error shape
and statuses, from the key check on).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from proxy.core.errors import GatewayError
from proxy.stages.base import DoorStream


class FrontDoor(ABC):
    name: ClassVar[str]  # the API's name in usage rows, metrics and the access log
    path: ClassVar[str]  # the POST route it answers

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id

    @abstractmethod
    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    def reply(self, body: bytes) -> bytes: ...

    @abstractmethod
    def stream(self) -> DoorStream: ...

    @classmethod
    def error(cls, exc: GatewayError) -> tuple[int, bytes]:
        """The status and body a client of this API gets for ``exc``
        (OpenAI's shape, unless the door's API has its own)."""
        return exc.http_status, exc.body()
