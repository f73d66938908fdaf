"""One pub/sub connection, read by a background task that survives reconnects.

redis-py resubscribes a dropped connection by itself; this loop backs off
(with jitter, logging little) while Redis is away and hands every message,
including each subscription confirmation, to a callback. A confirmation that
arrives again after a reconnect is how users learn that messages published
during the outage may have been missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from actors.backoff import Outage

logger = logging.getLogger(__name__)

Message = dict[str, Any]

#: How long one read blocks; also how soon a closing loop notices.
READ_TIMEOUT = 1.0
#: A close never waits longer than this for the reader.
CLOSE_TIMEOUT = 2.0


class Subscription:
    def __init__(
        self,
        client: Redis,
        what: str,
        on_message: Callable[[Message], None],
        on_outage: Callable[[], None] | None = None,
    ) -> None:
        self._pubsub = client.pubsub()
        self._outage = Outage(what, logger)
        self._on_message = on_message
        self._on_outage = on_outage
        self._reader: asyncio.Task[None] | None = None
        self._closing = False

    async def subscribe(self, *channels: str) -> None:
        await self._pubsub.subscribe(*channels)
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_loop())

    async def unsubscribe(self, *channels: str) -> None:
        with contextlib.suppress(redis_errors.ConnectionError, redis_errors.TimeoutError):
            await self._pubsub.unsubscribe(*channels)

    async def close(self) -> None:
        # The flag as well as the cancel: on Python 3.11 a cancellation that
        # lands as redis-py's internal wait_for completes is swallowed.
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait({self._reader}, timeout=CLOSE_TIMEOUT)
            self._reader = None
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _read_loop(self) -> None:
        while not self._closing:
            try:
                message = await self._pubsub.get_message(timeout=READ_TIMEOUT)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                if self._on_outage is not None:
                    self._on_outage()
                await self._outage.failed(exc)
                continue
            self._outage.succeeded()
            if message is not None:
                self._on_message(message)
