"""One Redis connection that carries many concurrent calls: the path of every Lua script.

redis-py's asyncio client checks a connection out of a pool for each call and
back in afterwards; that bookkeeping (a condition, timeouts, hooks) cost about
80 µs per call on our machines, three times the round trip itself. Redis
answers the commands of one connection in order, so one connection can carry
any number of calls at once: each call writes its command (packed by hiredis)
and waits on a future; hiredis parses the replies, which go to the futures in
the order the commands were written. Concurrent callers are pipelined for free.

A broken connection (reset, closed, or a call that timed out: its reply
would arrive out of turn) fails every call in flight with
``ConnectionError``/``TimeoutError``; the next call opens a new connection.
Failed calls are retried ``RETRIES`` times with jittered backoff
(``actors/connection.py`` says why every script may be). Error replies become
the classes of ``actors/redis_errors.py``, which ``translated_errors`` turns
into the public ones.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis

from actors import redis_errors
from actors.backoff import jittered
from actors.endpoint import RedisEndpoint


class RespProtocol(asyncio.Protocol):
    """The wire: writes packed commands, hands parsed replies to waiting futures in order.

    In push mode (``push`` set, for pub/sub) every reply goes to ``push`` instead.
    """

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()  # (call, sent at)
        self._transport: asyncio.Transport | None = None
        self.broken: redis_errors.RedisError | None = None
        self.push: Callable[[Any], None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_received = 0.0  # loop time

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def data_received(self, data: bytes) -> None:
        self.last_received = asyncio.get_running_loop().time()
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(redis_errors.ConnectionError(f"protocol error from Redis: {exc}"))
                return
            if reply is False:
                return
            if self.push is not None:
                self.push(reply)
                continue
            if not self._waiting:
                self.abort(redis_errors.ConnectionError("Redis sent a reply nobody asked for"))
                return
            future, _ = self._waiting.popleft()
            if future.done():
                continue  # its caller was cancelled: the reply is dropped, order is kept
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(redis_errors.from_reply(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(redis_errors.ConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Write one command; the future gets its reply."""
        self.write(packed)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((future, loop.time()))
        return future

    def oldest_call(self) -> float | None:
        """When the oldest call still waiting for its reply was sent (loop time)."""
        return self._waiting[0][1] if self._waiting else None

    def write(self, packed: bytes) -> None:
        """Write commands whose replies nobody awaits (push mode)."""
        transport = self._transport
        if self.broken is not None:
            raise self.broken
        if transport is None or transport.is_closing():
            raise redis_errors.ConnectionError("connection to Redis is closed")
        try:
            transport.write(packed)
        except RuntimeError as exc:  # uvloop, on a connection the peer reset
            error = redis_errors.ConnectionError(f"connection lost while writing: {exc}")
            self.abort(error)
            raise error from exc

    def abort(self, error: redis_errors.RedisError) -> None:
        """Fail every call in flight with ``error`` and drop the connection."""
        self._fail(error)
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, error: redis_errors.RedisError) -> None:
        if self.broken is None:
            self.broken = error
        if not self.closed.done():
            self.closed.set_result(None)
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)


class MultiplexedConnection:
    """Calls to one Redis endpoint over a single pipelined connection."""

    def __init__(
        self,
        endpoint: RedisEndpoint,
        *,
        retries: int,
        connect_timeout: float = 5.0,
        call_timeout: float = 15.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 2.0,
    ) -> None:
        self._endpoint = endpoint
        self._retries = retries
        self._connect_timeout = connect_timeout
        self._call_timeout = call_timeout
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._protocol: RespProtocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False
        #: Connections opened after the first one broke: a judge of heartbeats
        #: learns of an outage that its own calls rode out by retrying.
        self.reconnects = 0

    async def execute(self, *args: Any) -> Any:
        """Run one command; retried when the connection breaks."""
        try:
            packed = hiredis.pack_command(args)
        except TypeError as exc:
            raise redis_errors.DataError(str(exc)) from exc
        attempt = 0
        while True:
            try:
                protocol = self._protocol
                if protocol is None or protocol.broken is not None:
                    protocol = await self._connected()
                # A cancelled caller leaves a cancelled future: its reply is skipped.
                try:
                    return await protocol.send(packed)
                except redis_errors.ReadOnlyError as exc:
                    # The server became a replica (a failover demoted it) and refused
                    # a write, so nothing was written: a lost connection, in effect.
                    # The next one goes through the Sentinels to the new master.
                    lost = redis_errors.ConnectionError(f"Redis is read-only: {exc}")
                    protocol.abort(lost)
                    raise lost from exc
            except (redis_errors.ConnectionError, redis_errors.TimeoutError):
                if attempt >= self._retries or self._closed:
                    raise
                attempt += 1
                await asyncio.sleep(jittered(attempt, self._backoff_base, self._backoff_cap))

    async def execute_at(self, key: Any, *args: Any) -> Any:
        """Run one command; ``key`` says where on a cluster (``actors/calls.py``), here nothing."""
        return await self.execute(*args)

    async def execute_many(self, *commands: Sequence[Any]) -> list[Any]:
        """Run commands pipelined (all written before any reply is awaited); replies in order."""
        return list(await asyncio.gather(*(self.execute(*command) for command in commands)))

    async def evalsha(self, sha: str, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run a script by its SHA, loading it first if Redis does not know it (yet)."""
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            await self.execute("SCRIPT", "LOAD", source)
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    async def close(self) -> None:
        self._closed = True
        if self._protocol is not None:
            self._protocol.abort(redis_errors.ConnectionError("connection closed by the client"))
            self._protocol = None

    def _watch(self, protocol: RespProtocol) -> None:
        """Abort a connection whose oldest call has waited ``call_timeout``.

        One timer per connection rather than one per call: a per-call timeout
        cost more than the rest of the call's Python. Later replies would go
        to the wrong callers, so the whole connection goes, and its calls are
        retried on a new one.
        """
        if protocol.broken is not None:
            return
        loop = asyncio.get_running_loop()
        sent = protocol.oldest_call()
        if sent is not None and loop.time() - sent >= self._call_timeout:
            timeout = self._call_timeout
            protocol.abort(redis_errors.TimeoutError(f"no reply from Redis in {timeout:g} s"))
            return
        loop.call_later(min(1.0, self._call_timeout / 4), self._watch, protocol)

    async def _connected(self) -> RespProtocol:
        if self._closed:
            raise redis_errors.ConnectionError("connection closed by the client")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is None or self._protocol.broken is not None:
                if self._protocol is not None:
                    self.reconnects += 1
                self._protocol = await open_protocol(self._endpoint, self._connect_timeout)
                self._watch(self._protocol)
            return self._protocol


async def open_protocol(endpoint: RedisEndpoint, timeout: float) -> RespProtocol:
    """A connected protocol, authenticated and on the right database: every connection's start.

    Through Sentinels, the master is looked up anew for every connection and
    asked its ``ROLE``: a connection opened while a failover is under way
    fails (and is retried) rather than landing on a replica.
    """
    host, port = endpoint.host, endpoint.port
    if endpoint.sentinels:
        host, port = await master_address(endpoint, timeout)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            if endpoint.path is not None and not endpoint.sentinels:
                _, protocol = await loop.create_unix_connection(RespProtocol, endpoint.path)
            else:
                _, protocol = await loop.create_connection(
                    RespProtocol, host, port, ssl=endpoint.tls.context() if endpoint.tls else None
                )
    except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError: a refused certificate
        raise redis_errors.ConnectionError(
            f"cannot connect to Redis at {endpoint.address}: {exc}"
        ) from exc
    setup: list[tuple[Any, ...]] = []
    if endpoint.password is not None:
        credentials = [endpoint.username] if endpoint.username else []
        setup.append(("AUTH", *credentials, endpoint.password))
    if endpoint.db:
        setup.append(("SELECT", endpoint.db))
    try:
        async with asyncio.timeout(timeout):
            for command in setup:
                await protocol.send(hiredis.pack_command(command))
    except BaseException as exc:
        protocol.abort(redis_errors.ConnectionError(f"connection setup failed: {exc}"))
        if isinstance(exc, TimeoutError):
            raise redis_errors.TimeoutError("no reply from Redis to AUTH/SELECT") from exc
        raise
    if endpoint.sentinels:
        await _check_master(protocol, host, port, timeout)
    return protocol


async def master_address(endpoint: RedisEndpoint, timeout: float) -> tuple[str, int]:
    """Where the Sentinels say the master is now; the first Sentinel that answers wins."""
    loop = asyncio.get_running_loop()
    lookup: tuple[Any, ...] = ("SENTINEL", "GET-MASTER-ADDR-BY-NAME", endpoint.master_name)
    errors = []
    for host, port in endpoint.sentinels:
        try:
            async with asyncio.timeout(timeout):
                _, sentinel = await loop.create_connection(RespProtocol, host, port)
                try:
                    reply = await sentinel.send(hiredis.pack_command(lookup))
                finally:
                    sentinel.abort(redis_errors.ConnectionError("lookup done"))
        except (OSError, TimeoutError, redis_errors.RedisError) as exc:
            errors.append(f"{host}:{port}: {exc or type(exc).__name__}")
            continue
        if reply:
            return reply[0].decode(), int(reply[1])
        errors.append(f"{host}:{port}: no master named {endpoint.master_name!r}")
    raise redis_errors.ConnectionError("no Sentinel knows the master: " + "; ".join(errors))


async def _check_master(protocol: RespProtocol, host: str, port: int, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            role = await protocol.send(hiredis.pack_command(("ROLE",)))
    except redis_errors.ResponseError:
        return  # an ACL without ROLE: trust the Sentinels (READONLY still reconnects)
    except BaseException as exc:
        protocol.abort(redis_errors.ConnectionError(f"ROLE failed: {exc}"))
        raise redis_errors.ConnectionError(f"no answer to ROLE from {host}:{port}") from exc
    if role[0] != b"master":
        protocol.abort(redis_errors.ConnectionError("not the master"))
        raise redis_errors.ConnectionError(
            f"{host}:{port} is a {role[0].decode()}, not the master: a failover is under way"
        )
