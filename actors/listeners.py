"""A live-events listener's announcement, on a Redis Cluster.

On one server the scripts ask Redis whether anyone is subscribed to the
events channel and skip encoding events nobody hears. A cluster node counts
only its own subscribers, and forwards every PUBLISH to every other master
(3 events per task, each handled by every master, cost the partitioned queue
a third of its scaling: docs/benchmarks.md). So there a listener announces
itself instead: :class:`ListenerAnnouncement` keeps a key with a TTL in every
partition (``KeySpace.listeners``) for as long as it listens, and the scripts
publish events only while it exists (``events_wanted`` in lua/_lib.lua). On
one server it does nothing.

A subscriber of our own that follows the channel (``supervisor events`` with
the history off, tests) holds one; anyone else subscribing on a cluster sets
the same keys (docs/events.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

from actors.connection import translated_errors
from actors.exceptions import QueueError
from actors.queue import RedisQueue

logger = logging.getLogger(__name__)

#: How long one announcement lasts; it is renewed every third of it.
ANNOUNCEMENT_TTL = 30.0


class ListenerAnnouncement:
    """``async with ListenerAnnouncement(queue):`` while subscribed to ``queue.keys.events``."""

    def __init__(self, queue: RedisQueue, ttl: float = ANNOUNCEMENT_TTL) -> None:
        self._queue = queue
        self._ttl = ttl
        self._renewing: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ListenerAnnouncement:
        if self._queue.settings.redis.cluster:
            await self.announce()
            self._renewing = asyncio.create_task(self._renew())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # The keys are left to expire: another listener may hold them too.
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing

    async def announce(self) -> None:
        """Set the announcement in every partition, for ``ttl`` seconds."""
        ttl_ms = int(self._ttl * 1000)
        with translated_errors():
            await self._queue.connection.execute_many(
                *(("SET", keys.listeners, "1", "PX", ttl_ms) for keys in self._queue.partitions)
            )

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                await self.announce()
            except QueueError as exc:  # the subscription reports the outage; retried next time
                logger.warning("이벤트 수신 알림을 갱신하지 못함: %s", exc)
