"""Real Redis for the tests: ``REDIS_URL`` if set, else an embedded server.

The session shares one server; tests isolate themselves by their own keys
(fresh API keys, unique prompts), never by flushing it. A test that kills,
restarts or flushes Redis starts its own with the ``own_redis`` fixture.
"""

from __future__ import annotations

import os
from pathlib import Path

from proxy.stores.embedded import EmbeddedRedis


def start_redis(root: Path) -> tuple[str, EmbeddedRedis | None]:
    url = os.environ.get("REDIS_URL")
    if url:
        return url, None
    server = EmbeddedRedis(root / "redis")
    return server.start(), server


class OwnRedis:
    """An embedded Redis this test may kill and start again on the same port."""

    def __init__(self, root: Path) -> None:
        self.server = EmbeddedRedis(root / "own-redis")
        self.url = self.server.start()

    def kill(self) -> None:
        proc = self.server.proc
        assert proc is not None
        proc.kill()
        proc.wait(5)

    def restart(self) -> None:
        self.server.start(port=self.server.port)

    def stop(self) -> None:
        self.server.stop()
