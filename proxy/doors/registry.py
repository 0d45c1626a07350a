"""Every front door the gateway serves, by the path it answers."""

from __future__ import annotations

from proxy.doors.base import FrontDoor

DOORS: tuple[type[FrontDoor], ...] = ()
BY_PATH: dict[str, type[FrontDoor]] = {door.path: door for door in DOORS}
