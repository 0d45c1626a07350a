"""Drive one stage alone, without the app (mitmproxy's ``taddons.context``).

    h = StageHarness(ResponseCacheStage, {"enabled": True})
    async with h:                       # open() / close() with the given services
        ex = h.exchange({"model": "m", "messages": [...]})
        answer = await h.request(ex)    # on_request: a response, or None to go on
        out = h.stream(ex, [b"data: ...\\n\\n", ...])   # every chunk through on_stream
        h.settle(ex)                    # on_settle

The stage's section is read by its own ``configure`` inside a minimal config,
so a test sees exactly the settings a real config would give it.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.config import model
from proxy.core.principal import Principal
from proxy.core.record import UsageRecord
from proxy.core.tasks import TaskGroup
from proxy.providers.base import Reply
from proxy.stages.base import Exchange, Services, Stage
from proxy.stores.redis_client import SharedRedis

BASE = {
    "auth": "none",
    "providers": {"echo": {"kind": "echo"}},
    "models": [{"name": "m", "targets": [{"provider": "echo"}]}],
}


class StageHarness:
    def __init__(
        self, stage: type[Stage], section: Any = None, redis: SharedRedis | None = None
    ) -> None:
        raw = dict(BASE)
        if stage.section is not None and section is not None:
            raw[stage.section] = section
        sections = [model.Section(stage.section, stage.configure)] if stage.section else []
        self.config = model.parse_config(yaml.safe_dump(raw), {}, sections)
        self.settings = self.config.section(stage.section) if stage.section else None
        self.stage = stage()
        self._redis = redis
        self._http: aiohttp.ClientSession | None = None
        self.tasks = TaskGroup()

    @property
    def enabled(self) -> bool:
        return self.stage.section is None or self.settings is not None

    async def __aenter__(self) -> StageHarness:
        self._http = aiohttp.ClientSession()
        await self.stage.open(Services(self._http, self.tasks, self._redis))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stage.close()
        await self.tasks.drain(grace=5)
        if self._http is not None:
            await self._http.close()

    def exchange(
        self,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
        endpoint: str = "chat",
        who: Principal | None = None,
    ) -> Exchange:
        request = make_mocked_request("POST", "/v1/chat/completions", headers=headers or {})
        record = UsageRecord("req_test", endpoint, config=self.config)
        record.public_model = str(body.get("model", "m"))
        ex = Exchange(request, record, self.config, endpoint, body, time.perf_counter(), who)
        ex.model = record.public_model
        return ex

    async def request(self, ex: Exchange) -> web.StreamResponse | None:
        return await self.stage.on_request(ex, self.settings)

    def reply(self, ex: Exchange, reply: Reply) -> Reply:
        ex.reply = self.stage.on_reply(ex, self.settings, reply)
        return ex.reply

    def stream(self, ex: Exchange, chunks: list[bytes]) -> bytes:
        """What the client would receive of ``chunks`` through the stage's filter."""
        chunk_filter = self.stage.on_stream(ex, self.settings)
        if chunk_filter is None:
            return b"".join(chunks)
        return b"".join(chunk_filter.feed(c) for c in chunks)

    def settle(self, ex: Exchange) -> None:
        self.stage.on_settle(ex, self.settings)
