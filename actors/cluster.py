"""Calls to a Redis Cluster: one multiplexed connection per master, each command sent by slot.

A Redis Cluster splits the key space into 16,384 hash slots and gives each
master a share. :class:`ClusterConnection` has the interface of
:class:`~actors.multiplexed.MultiplexedConnection` (``execute``,
``execute_many``, ``evalsha``, ``close``, ``reconnects``) and sends each
command to the master that serves the slot of its key, over that master's
own multiplexed connection; so calls stay pipelined, per node, as on one
server. Every scrapeq script touches the keys of one hash tag
(docs/protocol.md), hence one slot, hence one node.

The slot map is read with ``CLUSTER SLOTS`` (Redis 3+; ``CLUSTER SHARDS``
needs 7) from the node the URL names, and again from any known node when the
cluster says it changed. Every node is reached with the URL's credentials
and TLS options. How redirections, retries and node failures are handled:
docs/protocol.md, "Redis Cluster: routing".
"""

from __future__ import annotations

import asyncio
import binascii
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from actors import redis_errors
from actors.backoff import jittered
from actors.endpoint import RedisEndpoint
from actors.multiplexed import MultiplexedConnection

logger = logging.getLogger(__name__)

SLOTS = 16384
#: Redirections (MOVED, ASK) one call follows before it gives up: enough for a
#: slot that moved while nodes still disagree about its owner, not a loop.
MAX_REDIRECTS = 16

Address = tuple[str, int]
#: One try of a call on a node; the flag says whether ``ASKING`` must precede it.
Attempt = Callable[[MultiplexedConnection, bool], Awaitable[Any]]

#: Commands that name no key: they go to any master.
KEYLESS = frozenset(
    {
        "ACL",
        "AUTH",
        "BGREWRITEAOF",
        "BGSAVE",
        "CLIENT",
        "CLUSTER",
        "COMMAND",
        "CONFIG",
        "DBSIZE",
        "DEBUG",
        "ECHO",
        "FLUSHALL",
        "FLUSHDB",
        "FUNCTION",
        "HELLO",
        "INFO",
        "LASTSAVE",
        "LATENCY",
        "MODULE",
        "PING",
        "PUBLISH",
        "PUBSUB",
        "RANDOMKEY",
        "ROLE",
        "SAVE",
        "SCAN",
        "SCRIPT",
        "SLOWLOG",
        "TIME",
        "WAIT",
    }
)
#: ``NAME script numkeys key ...``: the first key follows the key count.
_NUMKEYS_AT_2 = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})
#: ``NAME ... STREAMS key ... id ...``
_STREAMS = frozenset({"XREAD", "XREADGROUP"})
#: ``NAME SUBCOMMAND key ...`` (``MEMORY STATS``, ``XINFO HELP``: no key).
_SUBCOMMAND_FIRST = frozenset({"MEMORY", "OBJECT", "XGROUP", "XINFO"})


class ClusterConfigError(ValueError):
    """A ``[redis]`` setting that cannot name a Redis Cluster; ``field`` is its dotted name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def check_cluster_endpoint(endpoint: RedisEndpoint) -> None:
    """Refuse what a cluster cannot be reached through: Sentinel, a unix socket, a database."""
    if endpoint.sentinels:
        raise ClusterConfigError(
            "redis.sentinel",
            "a Redis Cluster finds its masters itself and cannot be combined with Sentinel",
        )
    if endpoint.path is not None:
        raise ClusterConfigError(
            "redis.url", "a Redis Cluster is reached over TCP (redis:// or rediss://)"
        )
    if endpoint.db:
        raise ClusterConfigError("redis.url", "a Redis Cluster has only database 0")


def node_endpoint(seed: RedisEndpoint, host: str, port: int) -> RedisEndpoint:
    """The endpoint of another node: the seed's credentials and TLS options, its own address."""
    return replace(seed, host=host, port=port)


def key_slot(key: bytes) -> int:
    """The hash slot of ``key``: CRC16 of the key, or of its hash tag, mod 16,384.

    The hash tag is what lies between the first ``{`` and the first ``}``
    after it, when that is not empty (the Redis Cluster specification). The
    specification's CRC16 is CRC16/XMODEM, which ``binascii.crc_hqx`` computes
    (in C) from a start value of 0.
    """
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % SLOTS


def routing_key(command: Sequence[Any]) -> Any | None:
    """The key ``command`` is sent by, or None when it names none."""
    name = _text(command[0]).upper()
    if name in KEYLESS or len(command) < 2:
        return None
    if name in _NUMKEYS_AT_2:
        return command[3] if len(command) > 3 and int(command[2]) > 0 else None
    if name in _STREAMS:
        for index, argument in enumerate(command[:-1]):
            if _text(argument).upper() == "STREAMS":
                return command[index + 1]
        return None
    if name in _SUBCOMMAND_FIRST:
        return command[2] if len(command) > 2 else None
    return command[1]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _as_bytes(value: Any) -> bytes:
    """A key as Redis receives it (hiredis writes str as UTF-8, numbers as their text)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode()


def _redirection(error: redis_errors.ResponseError, replier: Address) -> tuple[str, int, Address]:
    """``MOVED slot host:port`` / ``ASK slot host:port`` as (kind, slot, address).

    An empty host means the replier's own (a node that knows no endpoint of its peer's).
    """
    kind, slot, where = str(error).split(" ", 2)
    host, _, port = where.strip().rpartition(":")
    return kind, int(slot), (host.strip("[]") or replier[0], int(port))


class ClusterConnection:
    """Calls to a Redis Cluster over one :class:`MultiplexedConnection` per master.

    Built from the endpoint of any one node (the seed); the slot map is read
    on the first call. ``retries``, the timeouts and the backoff mean what
    they mean for a single server; the retries are this class's (each node's
    connection makes none), so a node that stopped answering is retried after
    a fresh look at the map, not blindly on the same socket.
    """

    def __init__(
        self,
        seed: RedisEndpoint,
        *,
        retries: int,
        connect_timeout: float = 5.0,
        call_timeout: float = 15.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 2.0,
    ) -> None:
        check_cluster_endpoint(seed)
        self._seed = seed
        self._retries = retries
        self._connect_timeout = connect_timeout
        self._call_timeout = call_timeout
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        # Connections to nodes that stop being masters stay, idle, until close():
        # a cluster has few nodes, and a demoted master may be promoted again.
        self._nodes: dict[Address, MultiplexedConnection] = {}
        self._slots: list[Address | None] = [None] * SLOTS
        self._masters: list[Address] = []  # by their first slot; keyless calls go to one
        self._keyless = 0  # which master keyless commands go to
        self._suspects: set[Address] = set()  # failed their last call: asked for the map last
        self._reading: asyncio.Task[None] | None = None
        self._rode_out = 0
        self._closed = False

    @property
    def reconnects(self) -> int:
        """Outages calls rode out: node connections reopened after they broke,
        and calls retried after their node stopped answering (as
        ``MultiplexedConnection.reconnects``, for the judges of heartbeats)."""
        return self._rode_out + sum(node.reconnects for node in self._nodes.values())

    def node_of(self, key: Any) -> Address | None:
        """Where the slot map says ``key`` is served now (None before the map is read)."""
        return self._slots[key_slot(_as_bytes(key))]

    async def execute(self, *args: Any) -> Any:
        """Run one command on the master of its key's slot (any master if it has no key)."""
        return await self._routed(routing_key(args), lambda node, asking: _send(node, args, asking))

    async def execute_at(self, key: Any, *args: Any) -> Any:
        """Run one command on the master of ``key``'s slot although it names no key.

        What a keyless command means per node: SCAN of one partition's keys,
        WAIT for the replicas of the master a script just wrote to.
        """
        return await self._routed(key, lambda node, asking: _send(node, args, asking))

    async def execute_many(self, *commands: Sequence[Any]) -> list[Any]:
        """Run commands pipelined; replies in the caller's order.

        Each command is written to its node's connection in the same turn of
        the event loop, so every node gets its share as one pipeline, and each
        command follows its own redirections.
        """
        return list(await asyncio.gather(*(self.execute(*command) for command in commands)))

    async def evalsha(self, sha: str, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run a script on the master of its first key's slot, loading it there on NOSCRIPT."""
        command = ("EVALSHA", sha, len(keys), *keys, *args)

        async def attempt(node: MultiplexedConnection, asking: bool) -> Any:
            try:
                return await _send(node, command, asking)
            except redis_errors.NoScriptError:
                await node.execute("SCRIPT", "LOAD", source)
                return await _send(node, command, asking)

        return await self._routed(keys[0] if keys else None, attempt)

    async def close(self) -> None:
        """Close every node's connection; a map read under way fails with them."""
        self._closed = True
        for node in self._nodes.values():
            await node.close()

    async def _routed(self, key: Any | None, attempt: Attempt) -> Any:
        """Run ``attempt`` on the node serving ``key``, following the cluster's redirections.

        MOVED: the slot has a new owner; the map is read again and the call
        goes there. ASK: the slot is being migrated and the key is already
        on the target; the call goes there once, after ASKING, and the map
        stays. TRYAGAIN, CLUSTERDOWN and a node that does not answer are
        retried with backoff, up to ``retries`` times, after a fresh map.
        """
        slot = None if key is None else key_slot(_as_bytes(key))
        tries = redirects = 0
        target: Address | None = None  # set by a redirection
        asking = False
        while True:
            address = target
            try:
                if self._closed:
                    raise redis_errors.ConnectionError("connection closed by the client")
                if not self._masters:
                    await self._read_map()
                address = address or self._address(slot)
                reply = await attempt(self._node(address), asking)
                self._suspects.discard(address)
                return reply
            except redis_errors.ResponseError as exc:
                kind = str(exc).split(" ", 1)[0]
                if kind in ("MOVED", "ASK") and address is not None:
                    redirects += 1
                    if redirects > MAX_REDIRECTS:
                        raise redis_errors.ConnectionError(
                            f"Redis Cluster redirected a call {MAX_REDIRECTS} times: {exc}"
                        ) from exc
                    _, moved, target = _redirection(exc, address)
                    asking = kind == "ASK"
                    if not asking:
                        await self._moved(moved, target)
                    continue
                if kind not in ("TRYAGAIN", "CLUSTERDOWN"):
                    raise
                if tries >= self._retries or self._closed:
                    raise redis_errors.ConnectionError(
                        f"Redis Cluster did not serve the call in {tries + 1} tries: {exc}"
                    ) from exc
                if kind == "CLUSTERDOWN":
                    await self._reread_map()
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                if tries >= self._retries or self._closed:
                    raise
                self._rode_out += 1
                await self._unreachable(address, slot, exc)
            tries += 1
            target, asking = None, False
            await asyncio.sleep(jittered(tries, self._backoff_base, self._backoff_cap))

    def _address(self, slot: int | None) -> Address:
        if not self._masters:
            raise redis_errors.ConnectionError("the Redis Cluster serves no hash slot")
        if slot is None:
            return self._masters[self._keyless % len(self._masters)]
        address = self._slots[slot]
        if address is None:
            raise redis_errors.ConnectionError(f"no Redis Cluster node serves hash slot {slot}")
        return address

    def _node(self, address: Address) -> MultiplexedConnection:
        node = self._nodes.get(address)
        if node is None:
            if self._closed:
                raise redis_errors.ConnectionError("connection closed by the client")
            node = self._nodes[address] = MultiplexedConnection(
                node_endpoint(self._seed, *address),
                retries=0,
                connect_timeout=self._connect_timeout,
                call_timeout=self._call_timeout,
                backoff_base=self._backoff_base,
                backoff_cap=self._backoff_cap,
            )
        return node

    async def _moved(self, slot: int, owner: Address) -> None:
        """A node said ``slot`` moved: read the whole map (other slots may have moved too),
        then trust the node's word for this slot over a map read from a node that lags."""
        await self._reread_map()
        self._slots[slot] = owner
        if owner not in self._masters:
            self._masters.append(owner)

    async def _unreachable(
        self, address: Address | None, slot: int | None, error: Exception
    ) -> None:
        """A node did not answer: read the map from the others, and send keyless calls elsewhere."""
        if address is not None:
            if address not in self._suspects:
                logger.warning("Redis Cluster 노드 %s:%d 응답 없음: %s", *address, error)
                self._suspects.add(address)
            if slot is None and self._masters and address == self._address(None):
                self._keyless += 1
        if self._masters:  # else the next try reads the map anyway
            await self._reread_map()

    async def _reread_map(self) -> None:
        """Read the map again; a failure leaves the old one (the call's retry will tell)."""
        try:
            await self._read_map()
        except redis_errors.RedisError as exc:
            logger.warning("Redis Cluster 슬롯 맵을 다시 읽지 못함: %s", exc)

    async def _read_map(self) -> None:
        """Read the slot map; concurrent callers share one read."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.get_running_loop().create_task(self._fetch_map())
            # Retrieved here, so that a read whose callers were all cancelled logs nothing.
            self._reading.add_done_callback(lambda task: task.cancelled() or task.exception())
        await asyncio.shield(self._reading)

    async def _fetch_map(self) -> None:
        """Ask the masters, then the seed, then nodes that just failed, until one answers."""
        seed = (self._seed.host, self._seed.port)
        healthy = [a for a in self._masters if a not in self._suspects]
        suspects = [a for a in self._masters if a in self._suspects]
        candidates = list(dict.fromkeys([*healthy, seed, *suspects]))
        errors = []
        refused: redis_errors.ResponseError | None = None
        for address in candidates:
            try:
                reply = await self._node(address).execute("CLUSTER", "SLOTS")
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                errors.append(f"{address[0]}:{address[1]}: {exc or 'no reply'}")
                continue
            except redis_errors.ResponseError as exc:
                refused = refused or exc
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            self._apply_map(reply, address)
            return
        if refused is not None:
            raise redis_errors.ResponseError(
                f"cannot read the Redis Cluster slot map "
                f"(is {self._seed.address} a cluster node?): " + "; ".join(errors)
            )
        raise redis_errors.ConnectionError("no Redis Cluster node answered: " + "; ".join(errors))

    def _apply_map(self, reply: list[Any], source: Address) -> None:
        """Install a ``CLUSTER SLOTS`` reply: ``[[first, last, [host, port, id], ...], ...]``."""
        slots: list[Address | None] = [None] * SLOTS
        masters: list[Address] = []
        for first, last, master, *_ in sorted(reply, key=lambda entry: int(entry[0])):
            host = _text(master[0])
            # "" or "?": a node that knows no endpoint of its own; it is where we asked.
            address = (host if host not in ("", "?") else source[0], int(master[1]))
            if address not in masters:
                masters.append(address)
            slots[int(first) : int(last) + 1] = [address] * (int(last) - int(first) + 1)
        if masters != self._masters:
            logger.info(
                "Redis Cluster 슬롯 맵 갱신: 마스터 %s",
                ", ".join(f"{host}:{port}" for host, port in masters),
            )
        self._slots = slots
        self._masters = masters


def _send(node: MultiplexedConnection, command: Sequence[Any], asking: bool) -> Awaitable[Any]:
    """One command on one node; after ``ASKING`` on the same connection when ``asking``."""
    return _after_asking(node, command) if asking else node.execute(*command)


async def _after_asking(node: MultiplexedConnection, command: Sequence[Any]) -> Any:
    """``ASKING``, then the command, written back to back on the node's connection.

    Should another call's command slip between them (possible only while the
    connection is being reopened), that one spends the flag, harmlessly (the
    target serves its slot, or it came after an ASKING of its own), and this
    one gets ``MOVED`` back to the source and is redirected again.
    """
    _, reply = await node.execute_many(("ASKING",), command)
    return reply
