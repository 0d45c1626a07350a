"""What every front door shares: the request it translates, its error shape.

A door is made per request (it may keep state for its stream: ids, sequence
numbers, open blocks) and satisfies ``proxy.stages.base.Door``: the pipeline
calls ``to_chat`` on the client's body, ``prepare`` once the caller is
known, runs the chat request, hands the answer to ``reply`` (JSON) or to the
``stream()`` translation (SSE), and calls ``finish`` when it settles.

Passed through: an attempt whose provider speaks the door's API (its
``name``; ``Provider.speaks``) sends ``native_body`` instead, the client's
own body, and the answer goes back as the provider sent it
(``native_reply``; ``native_stream``, metered by ``native_meter``); see
``proxy.doors.native``. ``original`` keeps the body ``to_chat`` was given.

Errors: the front middleware renders every ``GatewayError`` on a door's path
with the door's ``error`` (Anthropic's clients expect Anthropic's error shape
and statuses, from the key check on).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from proxy.core.errors import GatewayError
from proxy.core.metering import StreamMeter
from proxy.doors.native import PassThrough
from proxy.stages.base import DoorStream, Exchange
from proxy.stores.responses import ResponseStore


@dataclass(frozen=True, slots=True)
class DoorServices:
    """What the web layer opened that a door may need (each None when absent)."""

    responses: ResponseStore | None = None  # stored responses (needs the database)


NO_SERVICES = DoorServices()


class FrontDoor(ABC):
    name: ClassVar[str]  # the API's name in usage rows, metrics and the access log
    path: ClassVar[str]  # the POST route it answers

    def __init__(self, request_id: str, services: DoorServices | None = None) -> None:
        self.request_id = request_id
        self.services = services or NO_SERVICES
        self.original: dict[str, Any] = {}  # the client's body, as ``to_chat`` got it

    @abstractmethod
    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]: ...

    async def prepare(self, ex: Exchange) -> None:
        """After authentication, before routing and admission: a door whose
        API keeps state (a stored conversation) completes ``ex.body`` for
        the caller here, so the token estimate and the cache see it all."""
        return None

    @abstractmethod
    def reply(self, body: bytes) -> bytes: ...

    @abstractmethod
    def stream(self) -> DoorStream: ...

    async def finish(self, ex: Exchange) -> None:
        """At settle, before the usage is written; awaited, so what it keeps
        exists before the client sees the end of the answer. Must not raise."""
        return None

    @abstractmethod
    def native_body(self, model: str, limit: int | None) -> dict[str, Any]: ...

    def native_reply(self, body: bytes) -> bytes:
        return body

    def native_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        return {}

    @abstractmethod
    def native_meter(self) -> StreamMeter: ...

    def native_stream(self) -> DoorStream:
        return PassThrough(self.native_error)

    @abstractmethod
    def native_error(self, exc: GatewayError, sent: int) -> bytes:
        """The API's error event for ``exc`` after ``sent`` events."""

    @classmethod
    def error(cls, exc: GatewayError) -> tuple[int, bytes]:
        """The status and body a client of this API gets for ``exc``
        (OpenAI's shape, unless the door's API has its own)."""
        return exc.http_status, exc.body()
