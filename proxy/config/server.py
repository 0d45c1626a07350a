"""The ``server:`` section: where the gateway listens and its limits."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from proxy.config.reader import Node


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 4 * 1024 * 1024
    # After SIGTERM: how long in-flight requests and streams may take to finish.
    shutdown_grace_s: float = 120.0
    watch_config: bool = True  # reload when the file changes (else SIGHUP / POST /admin/reload)
    # Read when the server starts (a reload does not change them): see http_guard.
    header_timeout_s: float = 10.0  # connection start (or a next request's first byte) to headers
    body_timeout_s: float = 30.0  # end of the headers to end of the body
    max_connections: int = 10_000  # open connections per worker
    # Peers whose X-Forwarded-For names the client (its right-most untrusted address).
    trusted_proxies: tuple[str, ...] = ()


_SERVER_KEYS = (
    "host",
    "port",
    "max_body_bytes",
    "shutdown_grace_s",
    "watch_config",
    "header_timeout_s",
    "body_timeout_s",
    "max_connections",
    "trusted_proxies",
)


def _trusted_proxies(node: Node) -> tuple[str, ...]:
    out = []
    for item in node.items():
        try:
            out.append(str(ipaddress.ip_network(item.string(), strict=False)))
        except ValueError:
            raise item.fail("must be an IP address or network (10.0.0.0/8, ::1)") from None
    return tuple(out)


def parse_server(node: Node) -> ServerConfig:
    m = node.mapping(_SERVER_KEYS)
    grace = m["shutdown_grace_s"].number() if "shutdown_grace_s" in m else 120.0
    if grace < 0:
        raise m["shutdown_grace_s"].fail("must be >= 0")
    d = ServerConfig()
    return ServerConfig(
        header_timeout_s=(
            m["header_timeout_s"].number(positive=True)
            if "header_timeout_s" in m
            else d.header_timeout_s
        ),
        body_timeout_s=(
            m["body_timeout_s"].number(positive=True) if "body_timeout_s" in m else d.body_timeout_s
        ),
        max_connections=(
            m["max_connections"].integer(positive=True)
            if "max_connections" in m
            else d.max_connections
        ),
        trusted_proxies=(_trusted_proxies(m["trusted_proxies"]) if "trusted_proxies" in m else ()),
        host=m["host"].string() if "host" in m else "127.0.0.1",
        port=m["port"].integer(positive=True) if "port" in m else 8080,
        max_body_bytes=(
            m["max_body_bytes"].integer(positive=True) if "max_body_bytes" in m else 4 << 20
        ),
        shutdown_grace_s=grace,
        watch_config=m["watch_config"].boolean() if "watch_config" in m else True,
    )
