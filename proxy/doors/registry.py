"""Every front door the gateway serves, by the path it answers."""

from __future__ import annotations

from proxy.doors.base import FrontDoor
from proxy.doors.responses import ResponsesDoor

DOORS: tuple[type[FrontDoor], ...] = (ResponsesDoor,)
BY_PATH: dict[str, type[FrontDoor]] = {door.path: door for door in DOORS}
