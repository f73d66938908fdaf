"""Wake idle consumers when tasks become claimable, without polling Redis.

The enqueue, release and requeue scripts publish on the queue's wake channel
(``in:<ms>`` when a retry becomes claimable after its backoff).
A subscription that stays open is race-free: a message published while the
consumer was busy claiming is buffered and wakes its next wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

logger = logging.getLogger(__name__)


class Wakeup:
    """One subscription to the wake channel, shared by a process's consumers."""

    def __init__(self, client: Redis, channel: str) -> None:
        self._client = client
        self._channel = channel
        self._event = asyncio.Event()
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self._channel)
        self._reader = asyncio.create_task(self._read_loop(self._pubsub))

    async def wait(self, timeout: float) -> bool:
        """Wait until woken or ``timeout`` passes; True if woken."""
        if self._reader is None:
            await self.start()
        try:
            async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                await self._event.wait()
        except TimeoutError:
            return False
        self._event.clear()
        return True

    def poke(self) -> None:
        """Wake the waiter now (e.g. the actor was asked to stop)."""
        self._event.set()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            self._pubsub = None

    async def _read_loop(self, pubsub: PubSub) -> None:
        failures = 0
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                failures += 1
                if failures == 1:
                    logger.warning("작업 알림 구독 연결 끊김, 재연결 시도: %s", exc)
                self._event.set()  # let consumers fall back to claiming
                await asyncio.sleep(min(5.0, 0.05 * 2**failures))
                continue
            failures = 0
            if message is None:
                continue
            data = message.get("data")
            if isinstance(data, bytes) and data.startswith(b"in:"):
                # A retry becomes due later: wake then, not at the next idle poll.
                loop = asyncio.get_running_loop()
                loop.call_later(int(data[3:]) / 1000, self._event.set)
            else:
                # Tasks are claimable now. A renewed subscription (after a
                # reconnect) wakes too: tasks may have come while it was down.
                self._event.set()
