"""Wake idle consumers when tasks become claimable, without polling Redis.

The enqueue, release and requeue scripts publish on the queue's wake channel
(``in:<ms>`` when a retry becomes claimable after its backoff). A
subscription that stays open is race-free: a message published while the
consumer was busy claiming is buffered and wakes its next wait.
"""

from __future__ import annotations

import asyncio
import contextlib

from actors.connection import open_subscription
from actors.subscription import Message
from config.settings import Settings


class Wakeup:
    """One subscription to the wake channel, shared by a process's consumers."""

    def __init__(self, settings: Settings, channel: str) -> None:
        self._channel = channel
        self._event = asyncio.Event()
        # An outage wakes consumers too: they fall back to claiming.
        self._subscription = open_subscription(
            settings, "작업 알림 구독", self._on_message, on_outage=self._event.set
        )
        self._started = False

    async def start(self) -> None:
        await self._subscription.subscribe(self._channel)
        self._started = True

    async def wait(self, timeout: float) -> bool:
        """Wait until woken or ``timeout`` passes; True if woken."""
        if not self._started:
            await self.start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                await self._event.wait()
        woken = self._event.is_set()
        self._event.clear()
        return woken

    def poke(self) -> None:
        """Wake the waiter now (e.g. the actor was asked to stop)."""
        self._event.set()

    async def close(self) -> None:
        await self._subscription.close()

    def _on_message(self, message: Message) -> None:
        data = message.get("data")
        if isinstance(data, bytes) and data.startswith(b"in:"):
            # A retry becomes due later: wake then, not at the next idle poll.
            asyncio.get_running_loop().call_later(int(data[3:]) / 1000, self._event.set)
        else:
            # Tasks are claimable now. A renewed subscription (after a
            # reconnect) wakes too: tasks may have come while it was down.
            self._event.set()
