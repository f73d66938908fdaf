"""Wake idle consumers when tasks become claimable, without polling Redis.

The enqueue, release and requeue scripts publish on their partition's wake
channel (``in:<ms>`` when a retry becomes claimable after its backoff). A
subscription that stays open is race-free: a message published while the
consumer was busy claiming is buffered and wakes its next wait. With several
partitions, one subscription hears them all and remembers which woke
(``take_woken``), so a consumer asks those first.
"""

from __future__ import annotations

import asyncio
import contextlib

from actors.connection import open_subscription
from actors.subscription import Message
from config.settings import Settings


class Wakeup:
    """One subscription to the wake channels of a queue's partitions, shared by a
    process's consumers."""

    def __init__(self, settings: Settings, channels: list[str]) -> None:
        self._channels = list(channels)
        self._partition_of = {channel.encode(): index for index, channel in enumerate(channels)}
        self._event = asyncio.Event()
        self._woken: set[int] = set()
        # An outage wakes consumers too: they fall back to claiming.
        self._subscription = open_subscription(
            settings, "작업 알림 구독", self._on_message, on_outage=self._wake_all
        )
        self._started = False

    async def start(self) -> None:
        await self._subscription.subscribe(*self._channels)
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

    def take_woken(self) -> set[int]:
        """The partitions told of claimable tasks since the last call (then forgotten)."""
        woken, self._woken = self._woken, set()
        return woken

    def poke(self) -> None:
        """Wake the waiter now (e.g. the actor was asked to stop)."""
        self._event.set()

    async def close(self) -> None:
        await self._subscription.close()

    def _wake(self, partition: int) -> None:
        self._woken.add(partition)
        self._event.set()

    def _wake_all(self) -> None:
        self._woken.update(range(len(self._channels)))
        self._event.set()

    def _on_message(self, message: Message) -> None:
        partition = self._partition_of.get(message.get("channel", b""))
        if partition is None:
            # A renewed subscription (after a reconnect) wakes too: tasks may
            # have come while it was down.
            self._wake_all()
            return
        data = message.get("data")
        if isinstance(data, bytes) and data.startswith(b"in:"):
            # A retry becomes due later: wake then, not at the next idle poll.
            asyncio.get_running_loop().call_later(int(data[3:]) / 1000, self._wake, partition)
        else:
            self._wake(partition)
