"""A real Redis Cluster on loopback for tests: three masters, no replicas, a password.

``started_cluster`` starts the masters (each in its own directory, on a free
port), joins them with ``redis-cli --cluster create``, waits until every node
says ``cluster_state:ok`` and, afterwards, stops them and removes their files.
Test modules wrap it in a module-scoped fixture; ``cluster_support_missing``
gives the reason to skip when this machine cannot run one.

``cluster-require-full-coverage no``: a stopped master then takes down only
its own slots, so a test can show that calls for the other slots go on.

A node also listens on its port + 10,000 (the cluster bus), so ports are
picked where both are free and below the kernel's ephemeral range (which
``free_port`` draws from, and where port + 10,000 may not even exist).
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.asyncio

from supervisor.redis_server import RedisServer, RedisServerError, find_redis_server

PASSWORD = "cluster-secret"
NODE_TIMEOUT_MS = 2000
BUS_OFFSET = 10000


def redis_cli() -> Path | None:
    """The redis-cli of the same install as redis-server, else the one on PATH."""
    with contextlib.suppress(RedisServerError):
        sibling = find_redis_server().with_name("redis-cli")
        if sibling.is_file():
            return sibling
    on_path = shutil.which("redis-cli")
    return Path(on_path) if on_path else None


def cluster_port() -> int:
    """A port that is free, with its cluster bus port (+10,000), both below 32768."""
    for _ in range(1000):
        port = random.randrange(20000, 32768 - BUS_OFFSET)
        try:
            with contextlib.ExitStack() as stack:
                for candidate in (port, port + BUS_OFFSET):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair for a cluster node")


def cluster_support_missing() -> str | None:
    """Why no cluster can be started here (None when one can)."""
    try:
        server = find_redis_server()
    except RedisServerError as exc:
        return str(exc)
    if redis_cli() is None:
        return "redis-cli is not installed: it is what creates the cluster"
    version = subprocess.run(
        [str(server), "--version"], capture_output=True, text=True, check=False
    ).stdout
    found = re.search(r"v=(\d+)\.", version)
    if found is None or int(found.group(1)) < 5:
        return f"{server} has no `redis-cli --cluster` support (Redis 5+ needed): {version!r}"
    return None


@dataclass
class ClusterTopology:
    masters: list[RedisServer]

    @property
    def url(self) -> str:
        """The seed URL: the first master, with the password every node wants."""
        return self.masters[0].url

    def client(self, server: RedisServer) -> redis.Redis:
        """A plain (not cluster-aware) client of one node: it sees only that node's keys."""
        return redis.Redis(port=server.port, password=PASSWORD, socket_timeout=5)

    def async_client(self, server: RedisServer) -> redis.asyncio.Redis:
        return redis.asyncio.Redis(port=server.port, password=PASSWORD, socket_timeout=5)

    def node_id(self, server: RedisServer) -> str:
        with self.client(server) as client:
            return str(client.execute_command("CLUSTER", "MYID").decode())

    def owner(self, key: str) -> RedisServer:
        """The master serving ``key``, as the cluster itself says (CLUSTER KEYSLOT, SLOTS)."""
        with self.client(self.masters[0]) as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
        return self.serving(slot)

    def serving(self, slot: int) -> RedisServer:
        """The master serving ``slot``, as the cluster itself says (CLUSTER SLOTS)."""
        with self.client(self.masters[0]) as client:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        for first, last, master, *_ in ranges:
            if first <= slot <= last:
                return next(s for s in self.masters if s.port == int(master[1]))
        raise AssertionError(f"no master serves slot {slot}")

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every master says cluster_state:ok and sees no peer failing."""

        def healthy(server: RedisServer) -> bool:
            with self.client(server) as client:
                info = client.execute_command("CLUSTER", "INFO").decode()
                nodes = client.execute_command("CLUSTER", "NODES")
            text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
            return "cluster_state:ok" in info and "fail" not in text

        _wait(lambda: all(healthy(server) for server in self.masters), timeout, "cluster healthy")


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if condition():
                return
        time.sleep(0.1)
    raise AssertionError(f"not {what} within {timeout} s")


def cluster_node(folder: Path) -> RedisServer:
    """One cluster-enabled redis-server (not started) on a free port pair, with the password."""
    return RedisServer(
        folder,
        port=cluster_port(),
        appendonly=False,
        password=PASSWORD,
        extra={
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": str(NODE_TIMEOUT_MS),
            "cluster-require-full-coverage": "no",
            "masterauth": PASSWORD,
        },
    )


@contextlib.contextmanager
def started_cluster(folder: Path, size: int = 3) -> Iterator[ClusterTopology]:
    """``size`` masters joined into one cluster; everything stopped and removed afterwards."""
    masters = [cluster_node(folder / f"node{index}") for index in range(size)]
    try:
        for server in masters:
            server.start()
        cli = redis_cli()
        assert cli is not None, cluster_support_missing()
        subprocess.run(
            [
                str(cli),
                "-a",
                PASSWORD,
                "--no-auth-warning",
                "--cluster",
                "create",
                *(f"127.0.0.1:{server.port}" for server in masters),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        topology = ClusterTopology(masters)
        topology.wait_healthy()
        yield topology
    finally:
        for server in masters:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
