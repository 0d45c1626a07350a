"""Every front door the gateway serves, by the path it answers."""

from __future__ import annotations

from proxy.doors.base import FrontDoor
from proxy.doors.messages import MessagesDoor
from proxy.doors.responses import ResponsesDoor

DOORS: tuple[type[FrontDoor], ...] = (MessagesDoor, ResponsesDoor)
BY_PATH: dict[str, type[FrontDoor]] = {door.path: door for door in DOORS}


def door_for(path: str) -> type[FrontDoor] | None:
    """The door whose API ``path`` belongs to: its own route or one under it
    (``/v1/messages/count_tokens``), so errors there take the door's shape."""
    door = BY_PATH.get(path)
    if door is None and path.count("/") > 2:
        door = BY_PATH.get(path.rsplit("/", 1)[0])
    return door
