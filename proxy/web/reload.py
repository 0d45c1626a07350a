"""Hot reload: a new config file becomes a new snapshot, or is refused.

Three triggers, one path (``Reloader.reload``): the file watcher, SIGHUP
(``server.serve``) and ``POST /admin/reload``. The file is read whole,
validated by the same ``parse_config`` as ``tollway check-config`` and
start-up, compiled into a new ``Snapshot``, and only then swapped in with
one assignment; requests already running keep the snapshot they started
with (``pipeline.handle`` reads it once), so a stream finishes on its own.

A refused edit (bad YAML, schema error, unknown provider, unset ``${VAR}``,
an empty or cut-off file) changes nothing: the error is logged with its key
path (config errors never carry values, so no secret), counted in
``tollway_config_reload_total{result="failure"}`` and shown by
``GET /admin/config`` until a later reload succeeds or the file is back to
the text being served.

The watcher polls ``os.stat`` of the path every 250 ms: device, inode,
size, mtime and the resolved path. Polling needs no extra dependency and
follows both an editor's rename-and-replace (a new inode) and a Kubernetes
ConfigMap update (kubelet swaps a ``..data`` symlink; ``stat`` follows it).
A change is applied once the file has looked the same for ``debounce_s``, so
a burst of writes is one reload and a half-written file is not read. Each
worker of an instance watches the same file, so all converge within about
0.5 s; a SIGHUP to the supervisor is forwarded to every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from proxy.config.model import Config
from proxy.config.reader import ConfigError
from proxy.core.errors import ConfigRefused
from proxy.pipeline.registry import parse_config
from proxy.pipeline.snapshot import ConfigStore, Snapshot, build_snapshot
from proxy.providers.pool import Pool
from proxy.stages.settle.metrics import Metrics
from proxy.web.keys import BILLING, CONFIG, METRICS, TASKS, UPSTREAM_POOL

log = logging.getLogger("tollway.reload")
SUPERVISOR_ENV = "TOLLWAY_SUPERVISOR_PID"


@dataclass(frozen=True, slots=True)
class ReloadOptions:
    path: Path | None  # None: nothing to reload from (config given as an object)
    poll_s: float = 0.25
    debounce_s: float = 0.25
    env: Mapping[str, str] | None = None  # ${VAR} values; None: the process environment


@dataclass(frozen=True, slots=True)
class Outcome:
    result: str  # "success" | "failure" | "unchanged"
    version: str  # the live version afterwards
    previous: str
    error: str | None = None


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def stamp(path: Path) -> tuple[Any, ...] | None:
    """What changes when the file (or the symlink chain to it) changes."""
    try:
        st = os.stat(path)
        return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        return None


class Reloader:
    def __init__(
        self,
        opts: ReloadOptions,
        store: ConfigStore,
        client: Pool,
        metrics: Metrics,
        can_bill: bool,
    ) -> None:
        self.opts = opts
        self._store = store
        self._client = client
        self._metrics = metrics
        self._can_bill = can_bill
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_attempt: dict[str, Any] | None = None
        self._refused_digest: str | None = None  # the watcher tries a bad text once

    def reload(self, reason: str, *, force: bool = True) -> Outcome:
        """Read, validate, compile and swap. Never raises for a bad file."""
        current = self._store.current.config
        try:
            text = self._read()
            digest = hashlib.sha256(text.encode()).hexdigest()[:12]
            if digest == current.version:
                # The live file is the one being served again: valid, so no error.
                self._refused_digest = None
                self.last_error = self.last_error_at = None
                same = Outcome("unchanged", current.version, current.version)
                return self._note(reason, same) if force else same
            if not force and digest == self._refused_digest:
                return Outcome("unchanged", current.version, current.version)
            self._refused_digest = digest
            config = parse_config(text, self.opts.env)
            self._check(current, config)
            snapshot = self._compile(config)
        except ConfigError as exc:
            return self._refuse(reason, current, str(exc))
        self._store.swap(snapshot)
        self._refused_digest = None
        self.last_error = self.last_error_at = None
        self._metrics.reloaded(True)
        log.info("config reloaded (%s): version %s -> %s", reason, current.version, config.version)
        return self._note(reason, Outcome("success", config.version, current.version))

    def _compile(self, config: Config) -> Snapshot:
        try:
            return build_snapshot(config, self._client, self._store.stages)
        except Exception as exc:  # noqa: BLE001 - any failure refuses the file, never crashes
            raise ConfigError(f"<root>: cannot be compiled ({type(exc).__name__})") from None

    def _read(self) -> str:
        path = self.opts.path
        if path is None:
            raise ConfigError("no config file: this gateway was started from a config object")
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None

    def _check(self, old: Config, new: Config) -> None:
        if new.auth == "keys" and not self._can_bill:
            raise ConfigError("auth: 'keys' needs a database; restart the gateway to switch")
        for key in ("host", "port"):
            if getattr(old.server, key) != getattr(new.server, key):
                log.warning("server.%s changed: it takes effect at the next restart", key)

    def _refuse(self, reason: str, current: Config, message: str) -> Outcome:
        self.last_error, self.last_error_at = message, time.time()
        self._metrics.reloaded(False)
        log.error(
            "config reload refused (%s), still serving version %s: %s",
            reason,
            current.version,
            message,
        )
        return self._note(reason, Outcome("failure", current.version, current.version, message))

    def _note(self, reason: str, outcome: Outcome) -> Outcome:
        self.last_attempt = {"at": _iso(time.time()), "reason": reason, "result": outcome.result}
        return outcome

    async def watch(self) -> None:
        """Poll the file; reload once it changed and then held still."""
        path = self.opts.path
        if path is None:
            return
        # The first look counts as a change: an edit made between loading the
        # config and this task's start is then not missed.
        seen: tuple[Any, ...] | None = ("unseen",)
        changed_at: float | None = None
        while True:
            await asyncio.sleep(self.opts.poll_s)
            now = await asyncio.to_thread(stamp, path)
            if now != seen:
                seen, changed_at = now, time.monotonic()
                continue
            if changed_at is None or time.monotonic() - changed_at < self.opts.debounce_s:
                continue
            changed_at = None
            if self._store.current.config.server.watch_config:
                self.reload("file changed", force=False)

    def status(self) -> dict[str, Any]:
        snap = self._store.current
        return {
            "version": snap.config.version,
            "loaded_at": _iso(snap.loaded_at),
            "path": str(self.opts.path) if self.opts.path else None,
            "watching": bool(self.opts.path) and snap.config.server.watch_config,
            "last_error": (
                {"message": self.last_error, "at": _iso(self.last_error_at)}
                if self.last_error
                else None
            ),
            "last_reload": self.last_attempt,
            "worker_pid": os.getpid(),
        }


RELOADER = web.AppKey("reloader", Reloader)


def reload_ctx(opts: ReloadOptions) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        reloader = Reloader(opts, app[CONFIG], app[UPSTREAM_POOL], app[METRICS], BILLING in app)
        app[RELOADER] = reloader
        watcher = app[TASKS].spawn(reloader.watch(), name="config-watch")
        yield
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher

    return ctx


def notify_siblings() -> None:
    """Under ``--workers N``: ask the supervisor to SIGHUP every worker."""
    pid = os.environ.get(SUPERVISOR_ENV)
    if pid and pid.isdigit():
        with contextlib.suppress(OSError):
            os.kill(int(pid), signal.SIGHUP)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


async def post_reload(request: web.Request) -> web.Response:
    outcome = request.app[RELOADER].reload("admin API")
    if outcome.result == "failure":
        raise ConfigRefused(f"The config was refused: {outcome.error}")
    if outcome.result == "success":
        notify_siblings()
    return _json(
        {"result": outcome.result, "version": outcome.version, "previous_version": outcome.previous}
    )


async def get_config(request: web.Request) -> web.Response:
    return _json(request.app[RELOADER].status())
