"""Redis clients and the translation of redis-py errors into the public ones."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from actors.exceptions import BackpressureException, QueueConnectionException, ScriptError
from config.settings import Settings

logger = logging.getLogger(__name__)

#: How many times a client retries a command whose connection broke; the
#: callers' loops back off further (actors/backoff.py), so a reset loop on the
#: network does not turn into a reconnect storm.
RETRIES = 2
#: Connections per client; callers beyond that wait for one.
MAX_CONNECTIONS = 16
#: How long a caller waits for a free connection.
POOL_WAIT = 30.0


class _HiredisPacking:
    """Connection behaviour redis-py's asyncio connections lack.

    Commands are packed with hiredis's C serializer (redis-py's asyncio
    connections pack in Python, its sync ones with hiredis: for a script call
    with two dozen arguments that was a quarter of the client's time), and a
    write on a reset connection is reported as a lost connection.
    """

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except RuntimeError as exc:
            # uvloop raises RuntimeError, not ConnectionError, for a write on a
            # connection the peer reset (MagicStack/uvloop#506); redis-py would
            # neither retry it nor report it as a lost connection.
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise redis_errors.ConnectionError(f"connection lost while writing: {exc}") from exc

    def pack_command(self, *args: Any) -> list[bytes]:
        command = args[0]
        if isinstance(command, str) and " " in command:  # "CONFIG GET" and the like
            args = (*command.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise redis_errors.DataError(str(exc)) from exc


_FAST_CONNECTIONS: dict[type[AbstractConnection], type[AbstractConnection]] = {
    base: type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
    for base in (Connection, UnixDomainSocketConnection, SSLConnection)
}


def create_client(settings: Settings, *, max_connections: int = MAX_CONNECTIONS) -> Redis:
    """A client for ``[redis] url`` that retries lost connections with jittered backoff.

    Retrying is safe for every script: enqueue and complete are idempotent by
    request id and lease, and a claim whose reply was lost only leaves a lease
    that expires and is requeued. The pool is bounded and blocking: thousands
    of concurrent calls share a handful of connections and queue for them
    instead of failing with "too many connections".
    """
    pool = BlockingConnectionPool.from_url(
        settings.redis.url,
        max_connections=max_connections,
        timeout=POOL_WAIT,
        retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=2.0), RETRIES),
        retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
        socket_connect_timeout=5,
        socket_timeout=15,
        socket_keepalive=True,
        health_check_interval=30,
    )
    pool.connection_class = _FAST_CONNECTIONS.get(pool.connection_class, pool.connection_class)
    return Redis.from_pool(pool)


def is_oom(error: redis_errors.ResponseError) -> bool:
    """Redis refused a write at maxmemory (also when wrapped in a script error)."""
    if isinstance(error, redis_errors.OutOfMemoryError):
        return True
    return "OOM command not allowed" in str(error)  # wrapped: "Error running script ..."


class translated_errors:  # noqa: N801 - used like a function: `with translated_errors():`
    """Turn redis-py errors into the contract's exceptions.

    A Redis at ``maxmemory`` refuses writes with an OOM error: that is
    reported as backpressure (retry later), never as a crash. A plain
    (synchronous) context manager: it wraps awaits all the same, and on the
    path of every script call it costs a tenth of a generator-based one.
    """

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None or not isinstance(exc, redis_errors.RedisError):
            return
        if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError)):
            logger.warning("Redis 연결 실패: %s", exc)
            raise QueueConnectionException(f"Redis is unreachable: {exc}") from exc
        if isinstance(exc, redis_errors.ResponseError):
            if is_oom(exc):
                logger.warning("Redis 메모리 한도 도달, 요청 거부: %s", exc)
                raise BackpressureException(1.0, "Redis is at maxmemory") from exc
            logger.error("Redis가 작업을 거부함: %s", exc)
            raise ScriptError(f"Redis refused the operation: {exc}") from exc
