"""The one place that turns ``[redis]`` settings into connections, and the
translation of Redis errors into the public exceptions.

Two kinds of connection, both opened from one parsed :class:`RedisEndpoint`
(so every URL option means the same on each): the multiplexed call
connection (``actors/multiplexed.py``: scripts, reads, operator commands,
pipelined on one socket) and pub/sub subscriptions
(``actors/subscription.py``). docs/design.md says why scrapeq speaks RESP
itself rather than through a client library.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType

from actors import redis_errors
from actors.calls import Calls
from actors.cluster import ClusterConnection
from actors.endpoint import RedisEndpoint
from actors.exceptions import BackpressureException, QueueConnectionException, ScriptError
from actors.multiplexed import MultiplexedConnection
from actors.subscription import Message, Subscription
from config.settings import Settings

logger = logging.getLogger(__name__)

#: How many times a call is retried when its connection broke; the callers'
#: loops back off further (actors/backoff.py), so a reset loop on the network
#: does not turn into a reconnect storm. Retrying is safe for every script:
#: enqueue and complete are idempotent by request id and lease, and a claim
#: whose reply was lost only leaves a lease that expires and is requeued.
RETRIES = 2


def endpoint_of(settings: Settings) -> RedisEndpoint:
    """The endpoint ``[redis]`` names: the URL (validated with the settings), and the
    Sentinels that find its master when ``sentinel`` lists any."""
    endpoint = RedisEndpoint.parse(settings.redis.url)
    if settings.redis.sentinel:
        endpoint = endpoint.with_sentinels(settings.redis.sentinel, settings.redis.master_name)
    return endpoint


def open_calls(settings: Settings) -> Calls:
    """The connection a process's calls share: scripts, reads, operator commands.

    With ``[redis] cluster`` it spans the cluster that ``url`` names one node
    of, and raises :class:`~actors.cluster.ClusterConfigError` (a ValueError
    naming the setting) for what a cluster cannot be reached through: a unix
    socket, a database other than 0.
    """
    if settings.redis.cluster:
        return ClusterConnection(endpoint_of(settings), retries=RETRIES)
    return MultiplexedConnection(endpoint_of(settings), retries=RETRIES)


def open_subscription(
    settings: Settings,
    what: str,
    on_message: Callable[[Message], None],
    on_outage: Callable[[], None] | None = None,
) -> Subscription:
    """A pub/sub connection that resubscribes after every reconnect (``what`` names it in logs)."""
    return Subscription(endpoint_of(settings), what, on_message, on_outage)


def is_oom(error: redis_errors.ResponseError) -> bool:
    """Redis refused a write at maxmemory (also when wrapped in a script error)."""
    if isinstance(error, redis_errors.OutOfMemoryError):
        return True
    return "OOM command not allowed" in str(error)  # wrapped: "Error running script ..."


class translated_errors:  # noqa: N801 - used like a function: `with translated_errors():`
    """Turn Redis errors (actors/redis_errors.py) into the contract's exceptions.

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
