"""A real Redis Cluster for the tests, from the bundled ``redis-server``.

Nodes are embedded servers (``proxy/stores/embedded.py``) started with
``--cluster-enabled yes``; the cluster is then assembled from Python, as
``redis-cli --cluster create`` would: the 16384 slots split over the masters
(``CLUSTER ADDSLOTS``), every node introduced (``CLUSTER MEET``), each
replica attached to its master (``CLUSTER REPLICATE``). A small
``cluster-node-timeout`` (1 s) keeps a failover within a few seconds.
Each wait is bounded (``tests/waiting.py``).
"""

from __future__ import annotations

import socket
from pathlib import Path

from redis.asyncio import Redis

from proxy.stores.embedded import EmbeddedRedis
from tests.waiting import until

SLOTS = 16384
BUS_OFFSET = 10000  # redis-server 6.2: the cluster bus listens on port + 10000


def _port_pair() -> int:
    """A free port whose bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + BUS_OFFSET > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + BUS_OFFSET))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class LocalCluster:
    """``masters`` primaries, each with ``replicas`` replicas, on 127.0.0.1."""

    def __init__(
        self, root: Path, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000
    ) -> None:
        self.root = root
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[EmbeddedRedis] = []
        self.ids: list[str] = []

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """What ``REDIS_URL`` is set to: the masters as the discovery nodes."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports[: self.masters])
        return f"redis+cluster://{hosts}"

    def client(self, i: int) -> Redis:
        return Redis(host="127.0.0.1", port=self.ports[i], socket_timeout=5)

    async def start(self) -> LocalCluster:
        count = self.masters * (1 + self.replicas)
        for i in range(count):
            node = EmbeddedRedis(
                self.root / f"node{i}",
                extra_args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(self.node_timeout_ms),
                    # a replica takes over however long it was cut off
                    "--cluster-replica-validity-factor",
                    "0",
                ),
            )
            node.start(port=_port_pair())
            self.nodes.append(node)
        clients = [self.client(i) for i in range(count)]
        try:
            await self._assemble(clients)
        finally:
            for c in clients:
                await c.aclose()
        return self

    async def _assemble(self, clients: list[Redis]) -> None:
        self.ids = [(await c.execute_command("CLUSTER MYID")).decode() for c in clients]
        per = SLOTS // self.masters
        for m in range(self.masters):
            end = SLOTS if m == self.masters - 1 else (m + 1) * per
            await clients[m].execute_command("CLUSTER ADDSLOTS", *range(m * per, end))
        for port in self.ports[1:]:
            await clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)

        async def all_met() -> bool:
            for c in clients:
                known = await c.execute_command("CLUSTER NODES")  # parsed: by address
                if len(known) < len(clients):
                    return False
                if any("handshake" in node["flags"] for node in known.values()):
                    return False
            return True

        await until(all_met, 20, interval=0.05, what="every node knows every other")
        for i in range(self.masters, len(clients)):
            master = (i - self.masters) % self.masters
            await clients[i].execute_command("CLUSTER REPLICATE", self.ids[master])
        await self.wait_ok(clients)

    async def wait_ok(self, clients: list[Redis] | None = None, limit: float = 20.0) -> float:
        """Seconds until every live node (or each of ``clients``) says
        ``cluster_state:ok`` with all slots served, and every replica among
        them is in sync with its master."""
        own = [] if clients is not None else [self.client(i) for i in self.live()]
        asked = clients if clients is not None else own

        async def ok() -> bool:
            for c in asked:
                info = await c.execute_command("CLUSTER INFO")  # parsed: a dict
                if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != SLOTS:
                    return False
                repl = await c.info("replication")
                if repl["role"] == "slave" and repl.get("master_link_status") != "up":
                    return False
            return True

        try:
            return await until(ok, limit, interval=0.05, what="the cluster is ok")
        finally:
            for c in own:
                await c.aclose()

    def live(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.proc is not None and n.proc.poll() is None]

    async def slot_owner(self, slot: int, via: int) -> int:
        """Index of the node serving ``slot``, as node ``via`` sees it."""
        c = self.client(via)
        try:
            for start, end, primary, *_ in await c.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return self.ports.index(int(primary[1]))
        finally:
            await c.aclose()
        raise AssertionError(f"slot {slot} is not served")

    def kill(self, i: int) -> None:
        proc = self.nodes[i].proc
        assert proc is not None
        proc.kill()
        proc.wait(5)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
