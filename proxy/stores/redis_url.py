"""Which Redis ``REDIS_URL`` names: one server, or the nodes of a Redis Cluster.

A cluster is named by the scheme ``redis+cluster://`` (``rediss+cluster://``
for TLS) or by a ``redis://`` URL listing several nodes, comma-separated:
``redis+cluster://user:pass@10.0.0.1:6379,10.0.0.2:6379``. The nodes are
only where discovery starts — the client asks one of them for the slot map
and finds the others — so two or three are enough for a cluster of any size.
The user and password (if any) apply to every node; a cluster has one
database, so a ``/db`` other than 0 is refused. Query options
(``?ssl_cert_reqs=…``) are read only for a single server.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

DEFAULT_PORT = 6379
_CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
_PLAIN_SCHEMES = {"redis": False, "rediss": True}


class RedisUrlError(ValueError):
    """``REDIS_URL`` cannot be read: the message says which part."""


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False


def cluster_url(url: str) -> ClusterUrl | None:
    """The cluster ``url`` names, or None when it names one server (left to
    redis-py's own ``from_url``, with every option it reads)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or (scheme not in _CLUSTER_SCHEMES and scheme not in _PLAIN_SCHEMES):
        return None
    netloc, _, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        hosts = netloc
    if scheme in _PLAIN_SCHEMES and "," not in hosts:
        return None  # one server
    db = tail.split("?", 1)[0]
    if db not in ("", "0"):
        raise RedisUrlError(f"REDIS_URL: a Redis Cluster has only database 0, not /{db}")
    username, password = _credentials(userinfo) if at else (None, None)
    nodes = tuple(_node(part) for part in hosts.split(",") if part.strip())
    if not nodes:
        raise RedisUrlError("REDIS_URL: a Redis Cluster URL names no node")
    tls = _CLUSTER_SCHEMES.get(scheme, _PLAIN_SCHEMES.get(scheme, False))
    return ClusterUrl(nodes, username, password, tls)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    user, _, password = userinfo.partition(":")  # as redis-py's from_url reads it
    return unquote(user) or None, unquote(password) or None


def _node(part: str) -> tuple[str, int]:
    part = part.strip()
    if part.startswith("["):  # [::1]:7000
        host, _, port = part[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
    if not host:
        raise RedisUrlError(f"REDIS_URL: node {part!r} has no host")
    if not port:
        return host, DEFAULT_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise RedisUrlError(f"REDIS_URL: node {part!r} has no valid port")
    return host, int(port)
